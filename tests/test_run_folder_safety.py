"""Nothing the user owns is deleted, no privacy ledger is ever removed, and a dead run shows as interrupted.

``--overwrite`` removes only a folder fedse created (its marker), never the working folder or a parent of it,
never a folder holding the user's own files, and moves privacy ledgers to ``ledger-archive/`` first. A run folder
is locked by the process writing it; once that process is gone (killed, crashed), its "running" summary reads
as ``interrupted``. The same rules through the real CLI are cases of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedse_secure.config import load_config
from fedse_secure.federation.run_folder import (
    LEDGER_ARCHIVE,
    MARKER,
    RoundRecord,
    RunFolder,
    RunFolderError,
    RunSummary,
)


@pytest.fixture
def cfg(repo_root):
    return load_config(repo_root / "configs" / "smoke.yaml")


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_create_writes_the_marker_first_and_refuses_a_non_empty_folder(tmp_path, cfg):
    run = RunFolder(tmp_path / "run").create(cfg)
    assert (run.path / MARKER).is_file() and (run.path / "config.yaml").is_file()
    with pytest.raises(RunFolderError, match="--resume"):
        RunFolder(tmp_path / "run").create(cfg)


def test_overwrite_never_removes_the_working_folder_or_a_parent(tmp_path, cfg, monkeypatch):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    for folder in (work, tmp_path / "project"):
        (folder / MARKER).write_text("{}")  # even a marker does not make the working folder removable
        (folder / "config.yaml").write_text("name: mine\n")
    (work / "notes.txt").write_text("my notes")
    before = _tree(tmp_path)
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), "../work"):
        with pytest.raises(RunFolderError, match="working folder or one of its parents"):
            RunFolder(target).create(cfg, overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_refuses_a_project_folder_with_a_config_yaml(tmp_path, cfg):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "config.yaml").write_text("name: my own config\n")
    (project / "analysis.py").write_text("print('mine')\n")
    before = _tree(tmp_path)
    with pytest.raises(RunFolderError, match="was not created by fedse"):
        RunFolder(project).create(cfg, overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_refuses_a_run_folder_holding_the_users_files(tmp_path, cfg):
    run = RunFolder(tmp_path / "run").create(cfg)
    (run.path / "my-analysis.ipynb").write_text("{}")
    before = _tree(tmp_path)
    with pytest.raises(RunFolderError, match="my-analysis.ipynb"):
        RunFolder(run.path).create(cfg, overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_keeps_every_privacy_ledger(tmp_path, cfg):
    run = RunFolder(tmp_path / "run").create(cfg)
    ledger = run.institution_dir("maze-clinic") / "privacy_ledger.jsonl"
    ledger.write_text('{"seq": 0, "event": "dp-sgd"}\n')
    ledger.with_name("privacy_ledger.jsonl.head").write_text('{"entries": 1}\n')
    (run.institution_dir("maze-clinic") / "buffer.jsonl").write_text('{"round": -1}\n')
    run.save_adapter("round-001", {}, {})
    (run.path / "summary.json").write_text("{}")

    RunFolder(run.path).create(cfg, overwrite=True)

    archived = sorted(p.relative_to(run.path / LEDGER_ARCHIVE) for p in (run.path / LEDGER_ARCHIVE).rglob("*")
                      if p.is_file())
    assert [str(p.relative_to(p.parts[0])) for p in archived] == [
        "institutions/maze-clinic/privacy_ledger.jsonl", "institutions/maze-clinic/privacy_ledger.jsonl.head"]
    kept = next((run.path / LEDGER_ARCHIVE).rglob("privacy_ledger.jsonl"))
    assert kept.read_text() == '{"seq": 0, "event": "dp-sgd"}\n'
    assert not (run.path / "adapters").exists() and not (run.path / "institutions").exists()
    # A second overwrite keeps the first archive as well.
    ledger = RunFolder(run.path).institution_dir("maze-clinic") / "privacy_ledger.jsonl"
    ledger.write_text('{"seq": 0, "event": "second run"}\n')
    time.sleep(1.1)  # archive folders are named by the second
    RunFolder(run.path).create(cfg, overwrite=True)
    assert len(list((run.path / LEDGER_ARCHIVE).rglob("privacy_ledger.jsonl"))) == 2


_HOLDER = textwrap.dedent("""
    import sys, time
    from fedse_secure.federation.run_folder import RunFolder
    RunFolder(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_killed_run_reads_as_interrupted_and_a_live_one_is_protected(tmp_path, cfg):
    run = RunFolder(tmp_path / "run").create(cfg)
    summary = RunSummary.start(cfg, "in-process")
    run.write_summary(summary)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.is_active() and run.summary().status == "running"
        before = _tree(tmp_path)
        with pytest.raises(RunFolderError, match="still writing it"):
            RunFolder(run.path).create(cfg, overwrite=True)
        with pytest.raises(RunFolderError, match="still writing it"):
            RunFolder(run.path).check_resumable()
        assert _tree(tmp_path) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not run.is_active()
    read = run.summary()
    assert read.status == "interrupted" and "stopped before recording its end" in read.error
    assert json.loads(run.summary_path.read_text())["status"] == "running", "reading never rewrites the summary"
    RunFolder(run.path).check_resumable()


def test_a_damaged_summary_or_record_is_one_clear_error(tmp_path, cfg):
    run = RunFolder(tmp_path / "run").create(cfg)
    for bad in ({"name": "x", "mode": "fedse", "rounds_completed": "many"}, {"name": "x", "mode": "fedse",
                                                                              "micro_avg": {"1": "high"}}, [1]):
        run.summary_path.write_text(json.dumps(bad))
        with pytest.raises(RunFolderError, match="damaged"):
            run.summary()
    run.metrics_path.write_text(json.dumps({"round": "one", "status": "completed"}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl record: round"):
        run.records()


def test_resume_discards_only_what_unrecorded_rounds_left(tmp_path, cfg):
    import torch

    run = RunFolder(tmp_path / "run").create(cfg)
    for r in (1, 2, 3):
        run.save_adapter(f"round-{r:03d}", {"w": torch.full((2,), float(r))}, {})
    run.save_adapter("final", {"w": torch.full((2,), 3.0)}, {})
    buffer = run.institution_dir("maze-clinic") / "buffer.jsonl"
    rows = [{"round": -1, "source": "expert"}, {"round": 1}, {"round": 2}, {"round": 3}, {"round": 3, "x": 1}]
    buffer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.append_record(RoundRecord(round=1, status="completed"))

    done = run.discard_unrecorded(2, ["maze-clinic", "wordle-lab"])

    assert sorted(p.name for p in (run.path / "adapters").iterdir()) == ["final", "round-001", "round-002"]
    from fedse_secure.models.adapters import load_adapter_state

    assert torch.equal(load_adapter_state(run.path / "adapters" / "final")["w"], torch.full((2,), 2.0))
    assert [json.loads(line) for line in buffer.read_text().splitlines()] == rows[:3]
    aside = buffer.with_name("buffer.unrecorded.jsonl")
    assert [json.loads(line) for line in aside.read_text().splitlines()] == rows[3:], "kept aside, not deleted"
    assert any("round 3 was never recorded" in line for line in done)
