"""`fedse simulate --resume`: a run killed with SIGKILL in the middle of a round continues after its last recorded
round and ends with exactly the adapters, buffers and records of an uninterrupted run of the same seed; a full
disk is one line and a resumable run; a run in which no round completed fails with its reason."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Explored episodes enter the buffer even when they fail (the tiny model rarely succeeds), so a round leaves
# buffer lines behind when it is killed: the resumed run must not train on them twice.
SETTINGS = ["--set", "federation.rounds=3", "--set", "exploration.filter_success=false"]


def _fedse(*args, **kw):
    return [sys.executable, "-m", "fedse_cli.main", *args]


def _wait_for(predicate, proc, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"{what} never happened")


def _round_two_started(run: Path) -> bool:
    return any('"round": 2' in p.read_text() for p in run.glob("institutions/*/buffer.jsonl"))


def _adapters(run: Path) -> dict[str, dict]:
    from fedse_secure.models.adapters import load_adapter_state

    return {p.parent.name: load_adapter_state(p.parent)
            for p in sorted(run.glob("adapters/*/adapter_model.safetensors"))}


def _records(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["status"], r["survivors"], sorted(r["institutions"])) for r in rows]


def test_sigkill_mid_round_then_resume_gives_the_uninterrupted_run(tmp_path):
    import torch

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    smoke = str(REPO / "configs" / "smoke.yaml")
    reference = subprocess.Popen(_fedse("simulate", smoke, "--out", str(whole), "-q", *SETTINGS), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_fedse("simulate", smoke, "--out", str(killed), "-q", *SETTINGS), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _round_two_started(killed), victim, 600, "round 2 explored")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running" and summary["rounds_completed"] == 1, "killed inside round 2"

    shown = subprocess.run(_fedse("report", str(killed), "--json"), cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    (run,) = json.loads(shown.stdout)["runs"]
    assert run["status"] == "interrupted" and f"fedse simulate --resume {killed}" in shown.stderr

    resumed = subprocess.run(_fedse("simulate", "--resume", str(killed), "-q"), cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-3000:]

    final = json.loads((killed / "summary.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == 3
    assert [r["after_round"] for r in final["resumes"]] == [1]
    expected, got = _adapters(whole), _adapters(killed)
    assert sorted(got) == ["final", "round-001", "round-002", "round-003"] == sorted(expected)
    for label, state in expected.items():
        assert all(torch.equal(state[k], got[label][k]) for k in state), f"adapter {label} differs"
    for buffer in whole.glob("institutions/*/buffer.jsonl"):
        assert (killed / buffer.relative_to(whole)).read_text() == buffer.read_text(), f"{buffer.parent.name} buffer"
    assert _records(killed) == _records(whole)
    whole_summary = json.loads((whole / "summary.json").read_text())
    assert final["success_by_client"] == whole_summary["success_by_client"]
    aside = list(killed.glob("institutions/*/buffer.unrecorded.jsonl"))
    assert aside, "the killed round's buffer lines were kept aside"
    assert not list(killed.rglob(".*.tmp*"))


def test_a_full_disk_is_one_line_then_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    limit = 40_000  # bytes per file: the config, buffers and records fit, an adapter (about 69 kB) does not

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_fedse("simulate", str(REPO / "configs" / "smoke.yaml"), "--out", str(run), "-q",
                                 "--set", "federation.rounds=1"), cwd=REPO, capture_output=True, text=True,
                          preexec_fn=full_disk, timeout=900)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "the disk is full" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "the disk is full" in summary["error"]
    for path in run.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)  # every line of every record file still parses
    assert not list(run.rglob(".*.tmp*"))

    resumed = subprocess.run(_fedse("simulate", "--resume", str(run), "-q"), cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1 and summary["error"] is None
    assert (run / "adapters" / "final" / "adapter_model.safetensors").is_file()


def test_a_run_whose_every_round_aborts_fails_with_the_reason(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(_fedse("simulate", str(REPO / "configs" / "smoke.yaml"), "--out", str(run), "-q",
                                 "--set", "federation.rounds=1", "--set",
                                 "federation.simulate_dropouts={wordle-lab: masked_input}"),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "no round completed" in line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert "no round completed" in summary["error"] and summary["aborted_rounds"][0]["reason"] in summary["error"]
    shown = subprocess.run(_fedse("report", str(run), "--json"), cwd=REPO, capture_output=True, text=True)
    assert json.loads(shown.stdout)["runs"][0]["status"] == "failed"
