from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from fedse_cli.envs import envs_app
from fedse_secure.envs import check as check_module

runner = CliRunner()


def test_check_json_single_env():
    result = runner.invoke(envs_app, ["check", "--json", "--env", "maze"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == {"maze": {"tasks": 25, "oracle_success": 1.0, "steps_per_s": report["maze"]["steps_per_s"]}}
    assert report["maze"]["steps_per_s"] > 0


def test_check_fails_below_threshold(monkeypatch):
    monkeypatch.setattr(
        check_module, "check_oracles", lambda names, limit=None, on_task=None: {
            "babyai": {"tasks": 90, "oracle_success": 0.9, "steps_per_s": 1.0}
        }
    )
    result = runner.invoke(envs_app, ["check", "--json", "--env", "babyai"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["babyai"]["oracle_success"] == 0.9


def test_unknown_env_is_rejected():
    result = runner.invoke(envs_app, ["check", "--env", "alfworld"])
    assert result.exit_code == 2 and "alfworld" in result.output


def test_list():
    result = runner.invoke(envs_app, ["list"])
    assert result.exit_code == 0 and "maze" in result.stdout and "test=25" in result.stdout


def test_benchmark_prints_json_last_line():
    out = subprocess.run(
        [sys.executable, "benchmarks/envs.py", "--json", "--env", "maze", "--episodes", "4", "--batch", "2",
         "--seconds", "0.05"],
        capture_output=True, text=True, check=True,
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["envs"]["maze"]["single_steps_per_s"] > 0 and last["envs"]["maze"]["batched_steps_per_s"] > 0
