"""Configs fail before any work starts, with one line naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedse_secure.config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
# configs/paper asks for model.device: cuda; tests/test_paper_configs.py validates those on any machine.
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "deploy" not in p.parts and "paper" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_experiment_config_validates(path):
    cfg = load_config(path)
    assert cfg.clients


def test_paper_defaults():
    cfg = parse_config({"clients": [{"name": n, "env": "maze"} for n in "abc"]})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, "all-linear")
    assert cfg.training.learning_rate == 5e-5 and cfg.training.lr_schedule == "cosine"
    assert cfg.training.epochs_per_round == 2
    assert cfg.exploration.temperature == 1.0 and cfg.exploration.filter_success
    assert cfg.federation.aggregation == "fedavg"
    assert cfg.federation.secure_aggregation.backend == "masking", "privacy must be on by default, not opt-in"


def _base() -> dict:
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["federation"].update(roundz=2), "federation.roundz"),
        (lambda d: d["federation"].update(rounds=-1), "federation.rounds"),
        (lambda d: d["clients"][0].update(env="minecraft"), "clients.0.env"),
        (lambda d: d["training"].update(learning_rate="fast"), "training.learning_rate"),
        (lambda d: d["federation"].update(secure_aggregation="homomorphic"), "federation.secure_aggregation"),
        (lambda d: d.update(clients=[]), "clients"),
    ],
)
def test_bad_values_name_the_field(mutate, field):
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="x.yaml")
    assert f"x.yaml: {field}:" in str(err.value)


def test_cross_field_rules():
    data = _base()
    data["clients"] = data["clients"][:2]
    with pytest.raises(ConfigError, match="masking needs at least 3 institutions"):
        parse_config(data)
    data = _base()
    data["clients"][1]["name"] = data["clients"][0]["name"]
    with pytest.raises(ConfigError, match="unique"):
        parse_config(data)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federation.mode=local", "privacy.mode=client-dp"], "privacy.mode client-dp .* federation.mode local never"),
        (["federation.mode=centralized", "privacy.mode=dp-sgd"], "centralized .* set privacy.mode: none"),
        (["federation.secure_aggregation=none", "privacy.mode=client-dp"], "backend that hides inputs"),
        (["federation.aggregation=svd", "privacy.mode=client-dp"], "with federation.aggregation svd"),
        (["model.history_turns=0", "privacy.mode=dp-sgd"], "unset model.history_turns"),
        (["federation.simulate_dropouts={maze-clinic: nowhere}"], "masking has no stage 'nowhere'"),
        (["federation.simulate_dropouts={nobody: unmask}"], "unknown clients \\['nobody'\\]"),
        (["federation.secure_aggregation.threshold=9"], "threshold=9 exceeds the number of clients"),
        (["federation.aggregation=median"], "unknown aggregation rule 'median'; choose one of: fedavg"),
        (["privacy.accountant=gdp"], "unknown accountant 'gdp'; choose one of: pld, prv, rdp"),
        (["privacy.neighbouring=replace-one"], "accounts add-remove only, not privacy.neighbouring replace-one; "
                                               "use privacy.accountant pld"),
        (["privacy.mode=shuffle"], "unknown privacy mechanism 'shuffle'"),
        (["clients.0.env_options={colour: red}"], "does not accept option\\(s\\) colour; accepted: max_turns"),
    ],
)
def test_invalid_combinations_are_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(apply_overrides(_base(), overrides))
    assert len(str(err.value).splitlines()) == 1


def test_a_backend_name_or_its_settings():
    cfg = parse_config(apply_overrides(_base(), ["federation.secure_aggregation.threshold=2",
                                                 "federation.secure_aggregation.colluder_fraction=0.0"]))
    assert (cfg.federation.secure_aggregation.backend, cfg.federation.secure_aggregation.threshold) == ("masking", 2)
    # A threshold below what the declared colluder fraction needs is refused, naming the field.
    with pytest.raises(ConfigError, match="threshold=2 is below 3"):
        parse_config(apply_overrides(_base(), ["federation.secure_aggregation.threshold=2"]))
    # A name stands for that backend's defaults; settings of another backend are refused by name.
    cfg = parse_config(apply_overrides(_base(), ["federation.secure_aggregation=crypten"]))
    assert cfg.federation.secure_aggregation.backend == "crypten"
    with pytest.raises(ConfigError, match="federation.secure_aggregation.threshold: unknown field"):
        parse_config(apply_overrides(_base(), ["federation.secure_aggregation={backend: none, threshold: 2}"]))
    assert cfg.federation.backend().capabilities.cross_machine is False


def test_explain_documents_every_field_and_lists_registered_choices():
    from fedse_secure.config import explain

    top = {d.path for d in explain()}
    assert {"model", "clients", "federation", "privacy"} <= top
    for section in ("model", "lora", "clients", "federation", "exploration", "training", "evaluation", "privacy"):
        docs = explain(section)
        assert all(d.description for d in docs), [d.path for d in docs if not d.description]
    (env,) = explain("clients.0.env")
    assert set(env.choices) == {"agentgym", "babyai", "maze", "textcraft", "webshop", "wordle"}
    docs = {d.path: d for d in explain("federation.secure_aggregation")}
    assert docs["federation.secure_aggregation.backend"].choices == ("crypten", "masking", "none")
    assert "federation.secure_aggregation.threshold [backend masking]" in docs
    with pytest.raises(ConfigError, match="no field 'federation.roundz'; fields here: aggregation"):
        explain("federation.roundz")


def test_overrides_parse_yaml_values():
    data = apply_overrides(_base(), ["federation.rounds=5", "privacy.mode=dp-sgd", "exploration.temperature=0.7"])
    cfg = ExperimentConfig.model_validate(data)
    assert cfg.federation.rounds == 5 and cfg.privacy.mode == "dp-sgd" and cfg.exploration.temperature == 0.7
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["rounds"])
    data = apply_overrides(_base(), ["clients.1.seed_demos=0"])
    assert ExperimentConfig.model_validate(data).clients[1].seed_demos == 0
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(_base(), ["clients.9.seed_demos=0"])


@pytest.mark.parametrize(
    "edit, field",
    [
        ("roundz: 2", "federation.roundz"),
        ("rounds: -1", "federation.rounds"),
    ],
)
def test_cli_rejects_bad_config_before_any_work(tmp_path, edit, field):
    text = (REPO / "configs" / "smoke.yaml").read_text().replace("rounds: 2", edit, 1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", "simulate", str(cfg), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert field in lines[0]
    assert not out.exists(), "a rejected config must leave nothing behind"


def test_cli_rejects_unknown_environment(tmp_path):
    text = (REPO / "configs" / "smoke.yaml").read_text().replace("env: maze", "env: chess", 1)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", "config", "validate", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "clients.0.env" in proc.stderr and "chess" in proc.stderr


def test_invalid_yaml_is_reported_with_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: x\nclients: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)
