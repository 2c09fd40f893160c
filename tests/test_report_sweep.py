"""`fedse sweep`: seed parsing and resume detection (the runs themselves are `fedse simulate`'s, tested there)."""

from __future__ import annotations

import json

import pytest

from fedse_cli.sweep import _completed, _parse_seeds


def test_parse_seeds():
    assert _parse_seeds("0,1,2") == [0, 1, 2]
    assert _parse_seeds("3-5, 9") == [3, 4, 5, 9]
    for bad in ("", "a", "1,1", "5-3", "-1"):
        with pytest.raises(ValueError, match="seed"):
            _parse_seeds(bad)


def test_completed_runs_are_skipped(tmp_path):
    assert not _completed(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert not _completed(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert _completed(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    assert not _completed(tmp_path)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_experiment_configs_differ_from_fedse_only_where_intended(repo_root):
    from fedse_secure.config import load_config

    base = load_config(repo_root / "configs" / "fedse.yaml").model_dump()
    expected = {
        "fedit.yaml": {"federation.mode": "fedit"},
        "experiments/pretrained.yaml": {"federation.mode": "pretrained"},
        "experiments/local.yaml": {"federation.mode": "local"},
        "experiments/centralized.yaml": {"federation.mode": "centralized"},
        "experiments/ablation-no-filter.yaml": {"exploration.filter_success": False},
        "experiments/ablation-no-history.yaml": {"exploration.keep_history": False},
        "experiments/ablation-weighted.yaml": {"federation.aggregation": "weighted"},
    }

    fb = _flat(base)
    assert [c["env"] for c in base["clients"]] == ["babyai", "webshop", "textcraft", "maze", "wordle"]
    assert base["federation"]["aggregation"] == "fedavg" and base["lora"]["r"] == 8 and base["lora"]["alpha"] == 16
    for rel, changes in expected.items():
        cfg = _flat(load_config(repo_root / "configs" / rel).model_dump())
        diff = {k: cfg[k] for k in fb if cfg[k] != fb[k] and k != "name"}
        assert diff == changes, rel
    load_config(repo_root / "configs" / "experiments" / "multiseed-smoke.yaml")


@pytest.mark.parametrize("base, others", [
    ("fedse.yaml", {"fedit.yaml": "fedit", "pretrained.yaml": "pretrained"}),
    ("webshop-fedse.yaml", {"webshop-fedit.yaml": "fedit"}),
    ("webshop-fedse-rounds8.yaml", {"webshop-fedit-rounds8.yaml": "fedit"}),
    ("webshop-fedse-rounds8-epoch1.yaml", {"webshop-fedit-rounds8-epoch1.yaml": "fedit"}),
    ("webshop-fedse-rounds8-epoch2.yaml", {"webshop-fedit-rounds8-epoch2.yaml": "fedit"}),
])
def test_cpu_evidence_methods_differ_only_in_their_mode(repo_root, base, others):
    """The CPU-evidence comparisons are fair only if each method's config is its Fed-SE twin but for the mode."""
    from fedse_secure.config import load_config

    folder = repo_root / "configs" / "experiments" / "cpu-evidence"
    fb = _flat(load_config(folder / base).model_dump())
    assert fb["federation.mode"] == "fedse"
    for rel, mode in others.items():
        cfg = _flat(load_config(folder / rel).model_dump())
        diff = {k: cfg[k] for k in fb if cfg[k] != fb[k] and k != "name"}
        assert diff == {"federation.mode": mode}, rel


def test_the_exploration_lever_changes_only_the_episodes_so_fedit_stays_its_baseline(repo_root):
    """webshop-fedse-explore16 is compared with webshop-fedit's runs: fair only if it is webshop-fedse but for the
    number of exploration episodes, which fedit mode never reads (federation/institution.py, explore)."""
    from fedse_secure.config import load_config

    folder = repo_root / "configs" / "experiments" / "cpu-evidence"
    base = _flat(load_config(folder / "webshop-fedse.yaml").model_dump())
    lever = _flat(load_config(folder / "webshop-fedse-explore16.yaml").model_dump())
    diff = {k: (base[k], lever[k]) for k in base if lever[k] != base[k] and k != "name"}
    assert diff == {"exploration.episodes_per_round": (4, 16)}


def test_the_rounds_lever_changes_only_the_rounds_in_both_methods(repo_root):
    """webshop-{fedse,fedit}-rounds8 are the 4-round pair run for 8 rounds; nothing else may differ, or the lever's
    result would mix two changes."""
    from fedse_secure.config import load_config

    folder = repo_root / "configs" / "experiments" / "cpu-evidence"
    for method in ("fedse", "fedit"):
        base = _flat(load_config(folder / f"webshop-{method}.yaml").model_dump())
        lever = _flat(load_config(folder / f"webshop-{method}-rounds8.yaml").model_dump())
        diff = {k: (base[k], lever[k]) for k in base if lever[k] != base[k] and k != "name"}
        assert diff == {"federation.rounds": (4, 8)}, method


@pytest.mark.parametrize("before, lever, changes, steps", [
    # One pass over the buffer a round instead of 15 steps: 36 examples (8 demonstrations) in batches of 3 are 12
    # steps, 72 (a grown Fed-SE buffer) are 24, so the step count follows the buffer.
    ("rounds8", "rounds8-epoch1",
     {"training.epochs_per_round": (100, 1), "training.max_steps_per_round": (15, None)}, [12, 14, 24]),
    # The paper's two passes a round instead of one: the step count doubles.
    ("rounds8-epoch1", "rounds8-epoch2", {"training.epochs_per_round": (1, 2)}, [24, 28, 48]),
])
def test_an_epoch_lever_changes_only_how_many_steps_a_round_trains(repo_root, before, lever, changes, steps):
    """webshop-{fedse,fedit}-<lever> are the <before> pair but for the training-length settings; nothing else may
    differ, or the lever's result would mix two changes."""
    from fedse_secure.agent.sft import planned_steps
    from fedse_secure.config import load_config

    folder = repo_root / "configs" / "experiments" / "cpu-evidence"
    for method in ("fedse", "fedit"):
        base = _flat(load_config(folder / f"webshop-{method}-{before}.yaml").model_dump())
        lever_cfg = load_config(folder / f"webshop-{method}-{lever}.yaml")
        lever_flat = _flat(lever_cfg.model_dump())
        diff = {k: (base[k], lever_flat[k]) for k in base if lever_flat[k] != base[k] and k != "name"}
        assert diff == changes, method
        assert [planned_steps(n, lever_cfg.training) for n in (36, 41, 72)] == steps
