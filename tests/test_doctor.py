"""`fedse doctor`: what the machine offers, as text and JSON, and whether a config fits it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedse_cli.main", "doctor", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_doctor_json_describes_this_machine():
    proc = _doctor("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["torch"]["problem"] is None
    assert report["torch"]["version"].startswith("2.13.0")
    assert report["torch"]["build"] == report["torch"]["expected_build"]
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["auto"] == ({"device": "cpu", "dtype": "float32"} if not report["gpus"] else report["auto"])
    assert set(report["extras"]) == {"mpc", "quant", "audit", "dev"} and report["extras"]["dev"]["installed"]
    assert report["advice"]


def test_doctor_checks_a_config_against_the_machine():
    from fedse_secure.models.loading import prepare_tiny_model

    prepare_tiny_model()
    report = json.loads(_doctor("configs/smoke.yaml", "--json").stdout)
    config = report["config"]
    assert config["model"] == "tiny-llama" and config["device"] == report["auto"]["device"]
    # The exact element count of the tiny model's safetensors (embeddings tied: stored once).
    assert 3_000_000 < config["weights"] < 3_500_000 and config["fits"] is True
    nf4 = json.loads(_doctor("configs/smoke.yaml", "--set", "model.quantization=nf4", "--json").stdout)["config"]
    assert nf4["weights_bytes"] < config["weights_bytes"]


def test_doctor_prints_a_readable_report():
    proc = _doctor()
    assert proc.returncode == 0
    for label in ("torch 2.13.0", "matches the machine", "model.device auto", "extras"):
        assert label in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_doctor_refuses_a_gpu_config_here_in_one_line():
    proc = _doctor("configs/paper/one-gpu-small.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.device: no CUDA device" in proc.stderr
