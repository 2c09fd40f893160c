"""CrypTen backend with real parties: n institution processes + 1 coordinator process, torch.distributed
over gloo, file rendezvous. Each test starts a fresh set of processes (a few seconds each)."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedse_secure.secagg.backends.crypten import CryptenBackend, CryptenSettings
from fedse_secure.secagg.base import RoundAbortedError
from fedse_secure.secagg.crypten_backend import CryptenParties, CryptenUnavailableError, compat, fixed_point
from fedse_secure.secagg.driver import aggregate

try:
    compat.check_crypten_installed()
except CryptenUnavailableError as err:
    pytest.skip(str(err), allow_module_level=True)

PARTY = "fedse_secure.secagg.crypten_backend.party"


def _party_processes(marker: str) -> list[int]:
    """Live processes running a party whose command line mentions ``marker`` (our workdir root)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split()[2]
        except OSError:
            continue
        if PARTY in cmd and marker in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def _wrapper(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the Python interpreter of the parties (to break one of them)."""
    path = tmp_path / "python-wrapper.sh"
    path.write_text(f"#!/bin/sh\n{body}\nexec {sys.executable} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_three_parties_reveal_the_plaintext_sum_including_cryptens_decode_bug_cases(tmp_path):
    bits = 16  # CrypTen's default precision, where its own decoder misreads these negatives
    scale = 2**bits
    rng = np.random.default_rng(7)
    names = ["clinic-a", "clinic-b", "clinic-c"]

    # Part 1: sums that are negative and just above an integer. Every input is a multiple of 2^-16, so the
    # ring sum is exactly -k*2^16 + r with 0 < r < k: the values CrypTen 0.4.1 decodes 1.0 too low.
    targets = np.array([-k * scale + r for k in (2, 5, 30, 300) for r in (1, k - 1)], dtype=np.int64)
    a = rng.integers(-5 * scale, 5 * scale, targets.size)
    b = rng.integers(-5 * scale, 5 * scale, targets.size)
    c = targets - a - b
    exact_part = [v.astype(np.float64) / scale for v in (a, b, c)]

    # Part 2: random weighted updates, as the aggregation rule sends them (w_i * u_i, then w_i appended).
    weights = np.array([0.5, 0.3, 0.2])
    updates = [rng.normal(0.0, 3.0, 4000) for _ in names]
    weighted = [np.concatenate([w * u, [w]]) for w, u in zip(weights, updates)]
    # One value beyond the clipping range, to check clipping is applied and counted.
    weighted[1][5] = 1000.0

    contributions = {n: np.concatenate([p, wv]) for n, p, wv in zip(names, exact_part, weighted)}
    cfg = CryptenSettings(fractional_bits=bits, clip_range=400.0, stage_timeout_s=60)
    result = aggregate(CryptenBackend(cfg, workdir_root=tmp_path), 3, contributions)

    assert result.survivors == names and result.dropped == []
    clipped = {n: np.clip(v, -400.0, 400.0) for n, v in contributions.items()}
    plain = np.sum([clipped[n] for n in names], axis=0, dtype=np.float64)
    err = np.abs(result.total - plain)
    bound = fixed_point.error_bound(3, bits)
    assert err.max() <= bound + 1e-12, (err.max(), bound)

    k = targets.size
    # The decode-bug cases are exact, not merely within the bound (and nowhere near 1.0 off).
    np.testing.assert_array_equal(result.total[:k], targets.astype(np.float64) / scale)
    assert np.all(result.total[:k] < 0) and np.all(result.total[:k] - np.floor(result.total[:k]) > 0)
    # ... and they really are the bug's cases: CrypTen's decoder on the same ring sum is off by 1.0.
    import torch

    crypten = compat.import_crypten()
    theirs = crypten.encoder.FixedPointEncoder(bits).decode(torch.from_numpy(targets)).double().numpy()
    assert np.all(np.abs(theirs - targets / scale) > 0.99)

    # The weighted sum and the sum of weights come out as the plaintext ones (weighted mean = total/weights).
    total_w = result.total[-1]
    assert abs(total_w - weights.sum()) <= bound
    mean = result.total[k:-1] / total_w
    want = (plain[k:-1]) / weights.sum()
    assert np.abs(mean - want).max() < 1e-4

    m = result.measurements
    assert m["values_clipped"] == 1
    assert m["n_participants"] == 3 and m["crypten_parties"] == 4 and m["ring_bits"] == 64
    assert m["bytes_sent_per_client"] == 8 * plain.size  # one int64 share per element, sent once
    assert m["bytes_received_coordinator"] == 3 * 8 * plain.size
    assert m["crypten_share_s"] >= 0 and m["crypten_wall_s"] > 0 and m["wall_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the round's folder (inputs, rendezvous) is removed
    assert not _party_processes(str(tmp_path))


def test_default_precision_with_float32_updates(tmp_path):
    rng = np.random.default_rng(11)
    backend = CryptenBackend(CryptenSettings(stage_timeout_s=60), workdir_root=tmp_path)
    contributions = {f"i{j}": rng.normal(0, 1e-3, 30_000).astype(np.float32) for j in range(3)}
    result = aggregate(backend, 1, contributions)
    plain = np.sum([v.astype(np.float64) for v in contributions.values()], axis=0)
    assert np.abs(result.total - plain).max() <= fixed_point.error_bound(3, 24)
    assert result.measurements["values_clipped"] == 0 and result.measurements["fractional_bits"] == 24


def test_a_party_that_never_arrives_fails_the_round_cleanly(tmp_path):
    engine = CryptenParties(CryptenSettings(stage_timeout_s=6), workdir_root=tmp_path, startup_allowance_s=60)
    t0 = time.perf_counter()
    with pytest.raises(RoundAbortedError) as err:
        engine.sum(9, list("abcd"), [np.ones(100)] * 4, absent=frozenset("b"))
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert msg.startswith("round 9: party 1 (institution 'b') never arrived")
    assert "4 other parties were waiting" in msg and "stage_timeout_s=6" in msg and "masking" in msg
    assert "Nothing was revealed" in msg
    # At least the stage timeout; at most start-up (slow on a busy machine) + the stage timeout + clean-up.
    assert 6 <= elapsed < 60 + 6 + 20
    assert not _party_processes(str(tmp_path)), "party processes were left running"
    assert list(tmp_path.iterdir()) == []


def test_a_crashing_party_is_named_and_the_others_are_stopped(tmp_path):
    # Party 2 dies at start-up with a message; the other parties are waiting at the rendezvous.
    python = _wrapper(
        tmp_path,
        'case " $* " in *" --rank 2 "*) echo "institution c: disk on fire" >&2; exit 7;; esac',
    )
    backend = CryptenBackend(CryptenSettings(stage_timeout_s=60), python=python, workdir_root=tmp_path / "rounds")
    t0 = time.perf_counter()
    with pytest.raises(RoundAbortedError) as err:
        aggregate(backend, 2, {n: np.zeros(10) for n in "abc"})
    assert time.perf_counter() - t0 < 30  # noticed at once, not after the 60 s stage timeout
    msg = str(err.value)
    assert "party 2 (institution 'c') exited with code 7: institution c: disk on fire" in msg
    assert not _party_processes(str(tmp_path))


def test_crypten_import_failure_in_a_party_says_how_to_install(tmp_path):
    fake = tmp_path / "fake"
    (fake / "crypten").mkdir(parents=True)
    (fake / "crypten" / "__init__.py").write_text("raise ImportError(\"No module named 'omegaconf'\")\n")
    python = _wrapper(tmp_path, f'export PYTHONPATH="{fake}:$PYTHONPATH"')
    backend = CryptenBackend(CryptenSettings(stage_timeout_s=60), python=python, workdir_root=tmp_path / "rounds")
    with pytest.raises(CryptenUnavailableError) as err:
        aggregate(backend, 0, {n: np.zeros(10) for n in "abc"})
    msg = str(err.value)
    assert "omegaconf" in msg and "pip install --no-deps crypten==0.4.1" in msg
    assert not _party_processes(str(tmp_path))


def test_parties_die_with_a_killed_launcher(tmp_path):
    # A launcher killed mid-round (SIGKILL: no finally blocks) must not leave parties waiting at the
    # rendezvous. Here the launcher waits forever for a party that is never started, and is then killed.
    import signal
    import subprocess

    code = (
        "import numpy as np\n"
        "from fedse_secure.secagg.backends.crypten import CryptenSettings\n"
        "from fedse_secure.secagg.crypten_backend import CryptenParties\n"
        f"engine = CryptenParties(CryptenSettings(stage_timeout_s=300), workdir_root={str(tmp_path)!r})\n"
        "engine.sum(0, list('abc'), [np.zeros(8)] * 3, absent=frozenset('c'))\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_party_processes(str(tmp_path))) < 3:
            time.sleep(0.2)
        assert len(_party_processes(str(tmp_path))) == 3, "the parties did not start"
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _party_processes(str(tmp_path)):
        time.sleep(0.1)
    assert not _party_processes(str(tmp_path)), "parties outlived their launcher"
