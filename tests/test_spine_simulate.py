"""`fedse simulate configs/smoke.yaml` end to end: run folder, summary, adapters loadable by plain peft."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_smoke_run_exits_zero(smoke_run):
    # Its wall time is reported in the summary (wall_s); speed is measured by benchmarks, not asserted here.
    proc = smoke_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_summary_has_per_environment_success_for_every_round(smoke_run):
    summary = json.loads((smoke_run["out"] / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 2
    assert set(summary["success_by_env"]) == {"maze", "wordle", "textcraft"}
    for env, by_round in summary["success_by_env"].items():
        assert set(by_round) == {"1", "2"}, env
        assert all(0.0 <= v <= 1.0 for v in by_round.values())


def test_metrics_hold_a_typed_record_per_round_and_per_evaluation(smoke_run):
    from fedse_secure.federation.run_folder import RunFolder

    records = RunFolder(smoke_run["out"]).records()
    assert [(r.round, r.status) for r in records] == [(1, "completed"), (1, "evaluated"), (2, "completed"),
                                                      (2, "evaluated")]
    names = {"maze-clinic", "wordle-lab", "craft-works"}
    for r in records:
        assert set(r.institutions) == names
        if r.status == "completed":
            assert r.survivors == sorted(names) and r.released_sum_sha256
            sa = r.secure_aggregation
            assert sa["backend"] == "masking" and sa["bytes_sent_per_client"] > 0 and sa["n_survivors"] == 3
            assert {"round_s", "first_stage_s", "secure_aggregation_s"} <= set(r.timing)
            for inst in r.institutions.values():
                assert inst.status == "survivor"
                assert {"env", "explore", "train", "privacy", "timing"} <= set(inst.report)
                assert inst.report["train"]["steps"] > 0 and "explore_s" in inst.report["timing"]
        else:
            assert all(0.0 <= i.evaluation["success_rate"] <= 1.0 for i in r.institutions.values())


def test_final_adapter_loads_with_plain_peft(smoke_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    from fedse_secure.models import prepare_tiny_model

    summary = json.loads((smoke_run["out"] / "summary.json").read_text())
    adapter = smoke_run["out"] / summary["final_adapter"]
    base = AutoModelForCausalLM.from_pretrained(str(prepare_tiny_model()))
    model = PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    # Every saved tensor landed in the model (peft inserts the adapter name into the key).
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), value), key
    # Training moved the adapter away from its initialisation (B starts at zero).
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())


def test_config_is_recorded_as_resolved(smoke_run):
    from fedse_secure.config import load_config

    cfg = load_config(smoke_run["out"] / "config.yaml")
    assert cfg.federation.rounds == 2 and len(cfg.clients) == 3


def test_report_prints_table_and_writes_plot(smoke_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", "report", str(smoke_run["out"]),
                           "--plots", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "maze" in proc.stdout + proc.stderr
    assert (tmp_path / "success_per_round.png").stat().st_size > 1000


def test_existing_run_folder_is_not_clobbered(smoke_run):
    from fedse_secure.config import load_config
    from fedse_secure.federation.run_folder import RunFolder, RunFolderError

    with pytest.raises(RunFolderError, match="--overwrite"):
        RunFolder(smoke_run["out"]).create(load_config(smoke_run["out"] / "config.yaml"))
