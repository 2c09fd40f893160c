"""The seams of a round: registries, the one round driver over the in-process transport, institution endpoints,
and the typed records a run folder holds (the Flower side of the same driver: tests/test_deploy_flower.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fedse_secure.config import load_config
from fedse_secure.federation.run_folder import RunFolder

pytestmark = pytest.mark.slow


def test_every_registry_finds_its_built_in_components():
    from fedse_secure.aggregation.rules import RULES
    from fedse_secure.envs import ENVIRONMENTS
    from fedse_secure.privacy.accountants import ACCOUNTANTS
    from fedse_secure.privacy.mechanisms import MECHANISMS
    from fedse_secure.secagg.backends import BACKENDS

    assert RULES.names() == ["fedavg", "ffa", "svd", "weighted"]
    assert ENVIRONMENTS.names() == ["agentgym", "babyai", "maze", "textcraft", "webshop", "wordle"]
    assert BACKENDS.names() == ["crypten", "masking", "none"]
    assert ACCOUNTANTS.names() == ["pld", "prv", "rdp"]
    assert MECHANISMS.names() == ["client-dp", "dp-sgd", "none"]
    caps = {name: cls.capabilities for name, cls in BACKENDS.items()}
    assert [n for n, c in caps.items() if c.cross_machine] == ["masking", "none"]
    assert [n for n, c in caps.items() if c.hides_inputs] == ["crypten", "masking"]


def test_a_new_module_in_a_registrys_package_is_found_without_any_other_edit(tmp_path, monkeypatch):
    from fedse_secure.registry import Registry, UnknownComponentError

    package = tmp_path / "fedse_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from fedse_secure.registry import Registry\nTHINGS = Registry('thing', __name__)\n")
    (package / "alpha.py").write_text(
        "from fedse_plugin_demo import THINGS\n@THINGS.register('alpha')\nclass Alpha:\n    pass\n")
    (package / "beta.py").write_text(
        "from fedse_plugin_demo import THINGS\n@THINGS.register('beta')\nclass Beta:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    things: Registry = importlib.import_module("fedse_plugin_demo").THINGS
    assert things.names() == ["alpha", "beta"] and things.get("beta").__name__ == "Beta"
    with pytest.raises(UnknownComponentError, match="unknown thing 'gamma'; choose one of: alpha, beta"):
        things.get("gamma")


def test_a_registry_refuses_a_second_component_under_one_name():
    from fedse_secure.registry import Registry

    reg = Registry("widget", "fedse_secure.privacy.accountants")

    @reg.register("w")
    class A:
        pass

    with pytest.raises(ValueError, match="widget 'w' is registered twice"):
        @reg.register("w")
        class B:
            pass


def test_simulated_dropouts_reach_the_round_records(repo_root, tmp_path):
    from fedse_secure.federation.simulation import simulate

    cfg = load_config(repo_root / "configs" / "smoke.yaml", [
        "federation.rounds=1", "evaluation.test_tasks=1", "federation.secure_aggregation.threshold=2",
        "federation.secure_aggregation.colluder_fraction=0.0", "federation.simulate_dropouts={wordle-lab: masked_input}"])
    summary = simulate(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary.rounds_completed == 1
    (record,) = [r for r in RunFolder(tmp_path / "run").records() if r.status == "completed"]
    assert record.survivors == ["craft-works", "maze-clinic"] and record.dropped == ["wordle-lab"]
    assert record.institutions["wordle-lab"].status == "dropped"
    # It trained (the first stage) before it went silent: its report is there, its update is not in the sum.
    assert record.institutions["wordle-lab"].report["train"]["steps"] > 0
    assert record.secure_aggregation["n_survivors"] == 2 and record.secure_aggregation["threshold"] == 2


def test_every_backend_runs_a_simulated_round_and_releases_the_same_sum(repo_root, tmp_path):
    """The same round through the plaintext and the masking backend: the same released sum, so the same adapter
    (the masked sum is the exact sum of the fixed-point inputs; fedavg divides it by 3)."""
    from fedse_secure.federation.simulation import simulate
    from fedse_secure.models.adapters import load_adapter_state

    finals = {}
    for backend in ("none", "masking"):
        cfg = load_config(repo_root / "configs" / "smoke.yaml", [
            "federation.rounds=1", "evaluation.every_round=false", "evaluation.test_tasks=1",
            f"federation.secure_aggregation={backend}"])
        simulate(cfg, tmp_path / backend)
        (record,) = [r for r in RunFolder(tmp_path / backend).records() if r.status == "completed"]
        assert record.secure_aggregation["backend"] == backend and record.survivors
        finals[backend] = load_adapter_state(tmp_path / backend / "adapters" / "final")
    for k in finals["none"]:
        np.testing.assert_allclose(finals["none"][k].numpy(), finals["masking"][k].numpy(), atol=2.0**-23)


def test_endpoint_refuses_requests_of_another_run_and_rounds_it_has_no_state_for(repo_root, tmp_path):
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.federation.endpoint import InstitutionEndpoint
    from fedse_secure.federation.institution import Institution, release_terms
    from fedse_secure.federation.wire import REFUSED, StageRequest, run_key

    cfg = load_config(repo_root / "configs" / "smoke.yaml")
    agent = AgentModel.load(cfg.model, cfg.lora, cfg.seed)
    inst = Institution(cfg, cfg.clients[0], tmp_path / "inst", agent, release_terms(cfg))
    key = run_key(cfg.model_dump_json())
    from fedse_secure.policy import NodePolicy, decide

    endpoint = InstitutionEndpoint(inst, cfg.federation.backend(), key=key,
                                   decision=decide(NodePolicy.open(), cfg, inst.name))
    other = endpoint.handle(StageRequest("advertise_keys", 1, "0" * 16, cfg.model_dump_json(), train=True))
    assert other.refusal == REFUSED and "not this institution's experiment" in other.error
    forged = endpoint.handle(StageRequest("advertise_keys", 1, key, '{"name": "forged"}', train=True))
    assert forged.refusal == REFUSED, "a request whose experiment does not hash to its run key is refused"
    stale = endpoint.handle(StageRequest("share_keys", 4, key, blobs={"request": b""}))
    assert stale.refusal == REFUSED and "no secure-aggregation state for round 4" in stale.error
    unknown = endpoint.handle(StageRequest("bogus", 1, key))
    assert "'bogus' is not a stage of masking" in unknown.error


def test_a_run_whose_every_institution_is_out_of_budget_stops(repo_root, tmp_path):
    """The driver ends the run (status budget_exhausted) when every institution refuses a round for its budget;
    the refusals are in the round's record with their reasons, and nothing was released."""
    from fedse_secure.federation.driver import BudgetExhausted
    from fedse_secure.federation.simulation import simulate

    cfg = load_config(repo_root / "configs" / "smoke.yaml", [
        "federation.rounds=2", "evaluation.every_round=false", "evaluation.test_tasks=1",
        "privacy.mode=client-dp", "privacy.noise_multiplier=0.5", "privacy.epsilon_budget=0.5",
        "federation.secure_aggregation.clip_range=64"])
    with pytest.raises(BudgetExhausted, match="every institution refused it for its privacy budget"):
        simulate(cfg, tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    summary = folder.summary()
    assert summary.status == "budget_exhausted" and summary.rounds_completed == 0
    (record,) = folder.records()
    assert record.status == "aborted" and record.released_sum_sha256 is None
    assert {i.refusal for i in record.institutions.values()} == {"budget_exhausted"}
    assert all("refused before training" in i.reason for i in record.institutions.values())


def test_institutions_sharing_an_environment_evaluate_disjoint_shares_of_its_test_tasks(repo_root, tmp_path):
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.config import apply_overrides, parse_config
    from fedse_secure.federation.institution import Institution, release_terms

    base = load_config(repo_root / "configs" / "smoke.yaml").model_dump(mode="json")
    cfg = parse_config(apply_overrides(base, ["clients.1.env=maze", "clients.2.env=wordle", "evaluation.test_tasks=7"]))
    assert [c.env for c in cfg.clients] == ["maze", "maze", "wordle"]
    agent = AgentModel.load(cfg.model, cfg.lora, cfg.seed)
    insts = [Institution(cfg, c, tmp_path / c.name, agent, release_terms(cfg)) for c in cfg.clients]
    first, second, alone = (i.evaluation_ids() for i in insts)
    assert sorted(first + second) == insts[0].test_ids[:7] and not set(first) & set(second)
    assert alone == insts[2].test_ids[:7], "an institution alone on its environment evaluates every test task"
    # Each local institution evaluates its own adapter, so on every task; so does each when tasks are too few to split.
    for overrides in (["federation.mode=local"], ["evaluation.test_tasks=1"]):
        other = parse_config(apply_overrides(cfg.model_dump(mode="json"), overrides))
        ids = [Institution(other, c, tmp_path / "x" / c.name, agent, release_terms(other)).evaluation_ids()
               for c in other.clients[:2]]
        assert ids[0] == ids[1] == insts[0].test_ids[: other.evaluation.test_tasks], overrides
