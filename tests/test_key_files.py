"""Key files: never written through a symbolic link, modes exact whatever the umask, and a second `keys init`
adds to the identity registry instead of replacing it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedse_secure.federation.flower import pki


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_modes_do_not_depend_on_the_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = pki.init_keys(tmp_path / "keys", ["maze-clinic"])
        pki.merge_registry(tmp_path / "keys" / "registry.json", {"maze-clinic": b"\x01" * 32})
    finally:
        os.umask(old)
    private, public = paths.identity["maze-clinic"]
    node_private, node_public = paths.node_auth["maze-clinic"]
    assert _mode(private) == _mode(node_private) == 0o600
    assert _mode(public) == _mode(node_public) == _mode(tmp_path / "keys" / "registry.json") == 0o644
    for folder in (tmp_path / "keys", tmp_path / "keys" / "institutions", private.parent):
        assert _mode(folder) == 0o755, folder


@pytest.mark.parametrize("force", [False, True])
def test_a_symlink_at_a_key_path_is_refused_and_never_followed(tmp_path, force):
    folder = tmp_path / "keys" / "institutions" / "maze-clinic"
    folder.mkdir(parents=True)
    target = tmp_path / "where-the-attacker-reads"
    os.symlink(target, folder / "node_auth")  # dangling: exists() is False for it
    with pytest.raises(pki.PkiError, match="symbolic link"):
        pki.init_keys(tmp_path / "keys", ["maze-clinic"], force=force)
    assert not target.exists() and os.path.islink(folder / "node_auth")


def test_a_second_keys_init_keeps_the_registry_entries(tmp_path):
    from typer.testing import CliRunner

    from fedse_cli.main import app

    runner = CliRunner()
    for name in ("maze-clinic", "wordle-lab"):
        result = runner.invoke(app, ["keys", "init", "--out", str(tmp_path), "-i", name])
        assert result.exit_code == 0, result.output
    registry = json.loads((tmp_path / "registry.json").read_text())
    assert sorted(registry) == ["maze-clinic", "wordle-lab"]
    loaded = pki.load_identity_public(tmp_path / "institutions" / "maze-clinic" / "identity_ed25519.pub")
    assert registry["maze-clinic"] == pki.raw_public_bytes(loaded).hex()
