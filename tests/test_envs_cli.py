from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedse_cli.envs import envs_app
from fedse_secure.envs import check as check_module

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
#: Every shipped config that evaluates here: experiment configs (the CPU-evidence ones in their folder too) and the
#: deployment's coordinator. configs/paper/ asks for a CUDA device, so this CPU suite cannot load it.
SHIPPED = sorted(
    str(p.relative_to(ROOT))
    for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/experiments/**/*.yaml"),
              ROOT / "configs/deploy/coordinator.yaml"]
)


def test_check_json_single_env():
    result = runner.invoke(envs_app, ["check", "--json", "--env", "maze"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == {"maze": {"tasks": 25, "max_turns": 15, "oracle_success": 1.0,
                               "steps_per_s": report["maze"]["steps_per_s"]}}
    assert report["maze"]["steps_per_s"] > 0


def test_check_fails_below_threshold(monkeypatch):
    monkeypatch.setattr(
        check_module, "check_oracles", lambda names, limit=None, on_task=None: {
            "babyai": {"tasks": 90, "max_turns": 20, "oracle_success": 0.7, "steps_per_s": 1.0}
        }
    )
    result = runner.invoke(envs_app, ["check", "--json", "--env", "babyai"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["babyai"]["oracle_success"] == 0.7


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_is_solvable_at_its_limits(config):
    """No shipped config evaluates under a turn cap the expert cannot meet: on the test tasks it evaluates, the
    oracle reaches 95% at the config's limits, or its ceiling at the paper's limits where that is lower."""
    result = runner.invoke(envs_app, ["check", "--config", str(ROOT / config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report
    for key, row in report.items():
        assert row["oracle_success"] >= row["required"] >= min(0.95, row["ceiling"]) - 1e-9, (config, key, row)


def test_check_config_fails_under_a_cap_the_oracle_cannot_meet(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    data["exploration"]["max_turns"] = 3  # the first Maze test starts are 11-12 moves from the goal
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(envs_app, ["check", "--config", str(path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["maze"]["oracle_success"] == 0.0 and report["maze"]["ceiling"] == 1.0
    assert report["wordle"]["oracle_success"] == 1.0  # 3 guesses are enough for its first two tasks
    result = runner.invoke(envs_app, ["check", "--config", str(path)])
    assert result.exit_code == 1 and "raise exploration.max_turns" in result.output


def test_check_config_errors_are_one_line(tmp_path):
    result = runner.invoke(envs_app, ["check", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "no such config file" in result.output
    result = runner.invoke(envs_app, ["check", "--config", str(ROOT / "configs/smoke.yaml"), "--env", "maze"])
    assert result.exit_code == 2 and "drop --env" in result.output


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
