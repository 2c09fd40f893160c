"""What the CLI writes never costs the user a file: an output option never replaces a privacy ledger or an audit log
(nor any file of another kind), ``--overwrite`` takes back exactly the run folder fedse made, a rerun of
``fedse certs init`` / ``fedse keys init`` keeps the keys it finds (or says why it cannot), and a bad registry,
policy, host name or key is one line with the fix, before anything starts or is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from fedse_secure.config import load_config

REPO = Path(__file__).resolve().parents[1]
NAMES = ["maze-clinic", "wordle-lab", "craft-works"]


def _cli(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    from typer.testing import CliRunner

    from fedse_cli.main import app

    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    finally:
        os.chdir(here)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout + result.stderr


def _refused(*args: str, says: str, cwd: Path | None = None) -> str:
    """The command fails with exactly one ``error:`` line holding ``says``, and no traceback."""
    code, out = _cli(*args, cwd=cwd)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert says in errors[0], errors[0]
    return errors[0]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    """configs/deploy copied into a sandbox, with the pki its configs name (runs/deploy/pki) made by the CLI."""
    root = tmp_path_factory.mktemp("deploy")
    shutil.copytree(REPO / "configs" / "deploy", root / "configs" / "deploy")
    institutions = [a for n in NAMES for a in ("-i", n)]
    for command in ("certs", "keys"):
        code, out = _cli(command, "init", "--out", "runs/deploy/pki", *institutions, cwd=root)
        assert code == 0, out
    return root


@pytest.fixture
def institution(tmp_path) -> Path:
    """An institution folder: an audit log and a privacy ledger, each with its sealed head."""
    from fedse_secure.audit import AuditLog

    folder = tmp_path / "maze-clinic"
    AuditLog(folder / "audit.jsonl").record("session", "maze-clinic", accepted=True)
    for name in ("privacy_ledger.jsonl", "eps.jsonl"):  # eps.jsonl: a ledger under a name of the user's choosing
        (folder / name).write_text('{"seq": 1}\n')
        (folder / f"{name}.head").write_text('{"entries": 1}\n')
    return folder


# -- 1. output options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["audit.jsonl", "privacy_ledger.jsonl", "eps.jsonl", "audit.jsonl.head"])
def test_audit_report_never_replaces_a_ledger_or_audit_log(institution, target):
    before = _digest(institution)
    _refused("audit", "report", institution, "-o", institution / target, says="never replaced")
    assert _digest(institution) == before


def test_audit_report_replaces_only_an_earlier_report(institution, tmp_path):
    folder = institution
    for name in ("privacy_ledger.jsonl", "eps.jsonl"):
        (folder / name).unlink()
        (folder / f"{name}.head").unlink()
    page = tmp_path / "report.html"
    for _ in range(2):
        code, out = _cli("audit", "report", folder, "-o", page)
        assert code == 0, out
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file\n")
    _refused("audit", "report", folder, "-o", notes, says="is not an HTML report")
    assert notes.read_text() == "the user's own file\n"


def test_keys_registry_never_replaces_a_ledger_and_an_existing_registry_only_with_force(deploy, institution):
    before = _digest(institution)
    config = deploy / "configs/deploy/coordinator.yaml"
    _refused("keys", "registry", "--config", config, "--out", institution / "audit.jsonl", says="never replaced")
    assert _digest(institution) == before
    registry = deploy / "runs/deploy/pki/registry.json"
    kept = registry.read_bytes()
    _refused("keys", "registry", "--config", config, "--out", registry, says="pass --force")
    assert registry.read_bytes() == kept
    code, out = _cli("keys", "registry", "--config", config, "--out", registry, "--force")
    assert code == 0 and sorted(yaml.safe_load(registry.read_text())) == sorted(NAMES), out


# -- 2. --overwrite -----------------------------------------------------------------------------------------------
def test_overwrite_takes_back_a_simulated_run_folder_and_keeps_its_audit_log(tmp_path):
    from fedse_secure.federation.run_folder import LEDGER_ARCHIVE, RunFolder

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    run = RunFolder(tmp_path / "run").create(cfg)
    # What a simulation writes beside the records (fedse_secure/federation/simulation.py).
    for name in ("registry.json", "coordinator_identity.pem", "coordinator_identity.pub"):
        (run.path / name).write_text("{}\n")
    audit = run.institution_dir("maze-clinic") / "audit.jsonl"
    audit.write_text('{"seq": 1}\n')
    audit.with_name("audit.jsonl.head").write_text('{"entries": 1}\n')

    RunFolder(run.path).create(cfg, overwrite=True)

    assert not (run.path / "registry.json").exists()
    kept = list((run.path / LEDGER_ARCHIVE).rglob("audit.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == '{"seq": 1}\n'


# -- 3. policy and deploy-config files ----------------------------------------------------------------------------
def test_a_policy_key_given_twice_is_refused(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nprivacy:\n  max_epsilon: 8.0\n  max_epsilon: 1000.0\n")
    _refused("policy", "check", "--policy", policy, "--experiment", REPO / "configs/smoke.yaml",
             says="'max_epsilon' appears twice")


def test_a_policy_or_deploy_config_that_is_not_a_mapping_names_the_fix(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- version: 1\n")
    _refused("policy", "check", "--policy", listed, "--experiment", REPO / "configs/smoke.yaml",
             says="holds a list, not a mapping of settings (field: value lines); write `version: 1`")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    _refused("node", "start", "--config", empty, says="is empty (no settings, or only comments); start from "
                                                      "configs/deploy/institution-")
    _refused("keys", "registry", "--config", listed, "--out", tmp_path / "registry.json",
             says="holds a list, not a mapping of settings (field: value lines); start from "
                  "configs/deploy/coordinator.yaml")


# -- 4. a bad registry stops `fedse node start` in one line -------------------------------------------------------
@pytest.fixture
def bad_registry(deploy):
    registry = deploy / "runs/deploy/pki/registry.json"
    kept = registry.read_bytes()
    yield registry
    registry.write_bytes(kept)


@pytest.mark.parametrize("content, says", [
    ("{bad", "identity registry"),
    ('{"wordle-lab": "' + "ab" * 32 + '"}\n', "does not list 'maze-clinic'"),
])
def test_node_start_with_a_bad_registry_is_one_line(deploy, bad_registry, content, says):
    bad_registry.write_text(content)
    _refused("node", "start", "--config", deploy / "configs/deploy/institution-maze-clinic.yaml", says=says)


def test_the_worker_itself_reports_a_bad_registry_in_one_line(deploy, bad_registry):
    from fedse_secure.federation.deploy_config import load_institution_config
    from fedse_secure.federation.flower.processes import DeployError, start_worker

    bad_registry.write_text("{bad")
    config = deploy / "configs/deploy/institution-maze-clinic.yaml"
    with pytest.raises(DeployError) as err:
        start_worker(load_institution_config(config), config, ready_timeout_s=120)
    assert "\n" not in str(err.value) and "identity registry" in str(err.value), str(err.value)


# -- 9. audit verify --run ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["missing", "."])
def test_audit_verify_with_a_run_that_is_not_a_run_folder_fails(institution, tmp_path, run):
    _refused("audit", "verify", institution, "--run", tmp_path / run, says="not a run folder")


# -- 11-14, 17: certs init / keys init ----------------------------------------------------------------------------
def test_certs_init_refuses_a_ca_key_of_another_ca(tmp_path):
    for out in ("mine", "other"):
        assert _cli("certs", "init", "--out", tmp_path / out, "-i", "a")[0] == 0
    shutil.copy(tmp_path / "other/ca/ca.key", tmp_path / "mine/ca/ca.key")
    before = _digest(tmp_path / "mine")
    _refused("certs", "init", "--out", tmp_path / "mine", "-i", "a", says="does not belong to")
    assert _digest(tmp_path / "mine") == before


@pytest.mark.parametrize("host", ["", "bad host!", "-lead.example.org"])
def test_certs_init_refuses_a_bad_host_name(tmp_path, host):
    _refused("certs", "init", "--out", tmp_path / "pki", "-i", "a", "--host", host, says="neither an IP address")
    assert not (tmp_path / "pki").exists()


def test_certs_init_rerun_keeps_the_tls_keys_unless_force(tmp_path):
    from fedse_secure.federation.flower import pki

    out = tmp_path / "pki"
    assert _cli("certs", "init", "--out", out, "-i", "a", "--host", "coord.example.org")[0] == 0
    keys = [out / "coordinator/superlink.key", out / "institutions/a/supernode.key"]
    before = [k.read_bytes() for k in keys]
    code, text = _cli("certs", "init", "--out", out, "-i", "a", "-i", "b", "--host", "10.0.0.5")
    assert code == 0, text
    assert [k.read_bytes() for k in keys] == before
    pki.check_server_cert(out / "ca/ca.pem", out / "coordinator/superlink.pem", keys[0], "10.0.0.5")
    for name in "ab":
        pki.check_server_cert(out / "ca/ca.pem", out / f"institutions/{name}/supernode.pem",
                              out / f"institutions/{name}/supernode.key", "127.0.0.1")
    keys[1].write_text("junk\n")
    _refused("certs", "init", "--out", out, "-i", "a", says="pass --force")
    assert _cli("certs", "init", "--out", out, "-i", "a", "--force")[0] == 0
    assert keys[0].read_bytes() != before[0]


def test_keys_init_refuses_a_damaged_coordinator_key(tmp_path):
    out = tmp_path / "pki"
    assert _cli("keys", "init", "--out", out, "-i", "d")[0] == 0
    (out / "coordinator/identity_ed25519.pem").write_text("junk\n")
    before = _digest(out)
    _refused("keys", "init", "--out", out, "-i", "e", says="coordinator/identity_ed25519.pem is damaged")
    assert _digest(out) == before


def test_keys_init_with_a_name_given_twice_makes_it_once(tmp_path):
    code, out = _cli("keys", "init", "--out", tmp_path / "pki", "-i", "a", "-i", "a")
    assert code == 0, out
    assert list(yaml.safe_load((tmp_path / "pki/registry.json").read_text())) == ["a"]


# -- 24. a private key where a public one belongs -----------------------------------------------------------------
def test_adapter_verify_with_a_private_key_says_to_pass_the_public_one(tmp_path):
    assert _cli("keys", "init", "--out", tmp_path / "pki", "-i", "a")[0] == 0
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "signature.json").write_text("{}")
    line = _refused("adapter", "verify", adapter, "--public-key", tmp_path / "pki/coordinator/identity_ed25519.pem",
                    says="is a private key")
    assert "identity_ed25519.pub" in line
