"""configs/paper: the paper's hyperparameters, refused without a GPU, and the GPU check in its reduced CPU form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedse_secure.config import ConfigError, ExperimentConfig, load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
TURN_LIMITS = {"babyai": 20, "webshop": 10, "textcraft": 20, "maze": 15, "wordle": 8}


def _validate_for_a_gpu_machine(path: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(yaml.safe_load(path.read_text()), context={"check_local_device": False})


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct.yaml", "one-gpu-small.yaml"])
def test_paper_configs_carry_the_paper_hyperparameters(name):
    cfg = _validate_for_a_gpu_machine(PAPER / name)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, "all-linear")
    assert (cfg.training.learning_rate, cfg.training.lr_schedule, cfg.training.warmup_steps) == (5e-5, "cosine", 0)
    assert cfg.training.epochs_per_round == 2 and cfg.training.max_steps_per_round is None
    assert cfg.model.max_context_tokens == 4096 and cfg.training.max_seq_len == 4096
    assert cfg.exploration.temperature == 1.0 and cfg.exploration.max_turns is None
    assert cfg.federation.mode == "fedse" and cfg.federation.aggregation == "fedavg"
    assert sorted(c.env for c in cfg.clients) == sorted(TURN_LIMITS)
    assert cfg.model.device == "cuda"


def test_the_7b_config_is_the_papers_run():
    cfg = _validate_for_a_gpu_machine(PAPER / "qwen2.5-7b-instruct.yaml")
    assert cfg.federation.rounds == 20 and cfg.model.dtype == "bfloat16"
    assert "Qwen2.5-7B-Instruct" in cfg.model.name_or_path
    assert {c.env: c.seed_demos for c in cfg.clients} == {"babyai": 810, "webshop": 3930, "textcraft": 374,
                                                          "maze": 215, "wordle": 955}
    assert cfg.evaluation.test_tasks is None  # the AgentEval-sized splits: 90/200/100/25/25


def test_the_environments_turn_limits_are_the_papers():
    from fedse_secure.envs import ENVIRONMENTS

    assert {env: ENVIRONMENTS.get(env).make().max_turns for env in TURN_LIMITS} == TURN_LIMITS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct.yaml", "one-gpu-small.yaml"])
def test_paper_configs_are_refused_without_a_gpu_and_run_on_the_cpu_when_asked(name):
    with pytest.raises(ConfigError, match="model.device: no CUDA device on this machine"):
        load_config(PAPER / name)
    assert load_config(PAPER / name, ["model.device=cpu"]).model.device == "cpu"


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_reduced_form_and_prints_its_json(tmp_path):
    # The 8-minute bound is the GPU form's; on a shared CI CPU the reduced form gets room (about 2 minutes idle).
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--reduced", "--budget-s", "1500",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (result, proc.stderr[-2000:])
    assert result["mode"] == "cpu-reduced" and result["ok"] is True
    assert result["machine"]["torch"]["problem"] is None
    assert result["sft"]["cpu_step_s"] > 0 and result["sft"]["gpu_step_s"] is None
    assert result["rollouts"]["hf"]["tokens_per_s"] > 0 and result["rollouts"]["vllm"]["available"] is False
    assert result["dp_sgd"]["lora_update_ok"] is True and result["dp_sgd"]["noisy"]["finite"] is True
    fedse = result["fedse"]
    assert fedse["status"] == "completed" and fedse["rounds_completed"] == 2
    assert set(fedse["success_by_env"]) == set(TURN_LIMITS)


@pytest.mark.slow
def test_the_gpu_hours_estimate_reads_the_config_and_measured_trajectories():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_estimate.py"),
                           str(PAPER / "qwen2.5-7b-instruct.yaml"), "--sample", "3", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 20 and result["params"] == pytest.approx(7.62e9)
    assert 0 < result["gpu_hours_low"] < result["gpu_hours_high"]
    assert set(result["per_environment"]) == set(TURN_LIMITS)


def test_the_gpu_check_runs_only_the_sections_asked_for_and_refuses_unknown_ones(tmp_path):
    run = [str(REPO / "benchmarks" / "gpu_check.sh"), "--reduced", "--budget-s", "600", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([*run, "--sections", "rollouts"], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"] is True, (result, proc.stderr[-2000:])
    assert result["rollouts"]["hf"]["tokens_per_s"] > 0
    assert not {"sft", "sft_memory", "dp_sgd", "fedse"} & set(result)
    bad = subprocess.run([*run, "--sections", "rollouts,vllm"], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=env)
    assert bad.returncode == 2 and "--sections takes some of sft, sft_memory, rollouts, dp_sgd, fedse" in bad.stderr
    assert "Traceback" not in bad.stderr
