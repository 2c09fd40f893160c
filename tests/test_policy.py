"""The institution decides: a coordinator's request weaker than the node policy is refused before any data is
touched, with one line per violated field; the stricter side wins where the institution can tighten alone; only
the statistics the policy allows leave. In process through the institution's endpoint (the same code a
deployed worker runs); over Flower in tests/test_deploy_flower.py."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from fedse_cli.main import app
from fedse_secure.config import load_config
from fedse_secure.policy import NodePolicy, PolicyError, decide, experiment_hash, load_policy
from fedse_secure.policy.exports import CATALOGUE, PUBLIC, filter_evaluation, filter_round_report

runner = CliRunner()


@pytest.fixture(scope="module")
def strict(repo_root):
    return load_policy(repo_root / "configs/deploy/policy-strict.yaml")


def _smoke(repo_root, *overrides):
    return load_config(repo_root / "configs" / "smoke.yaml", list(overrides))


def _policy(tmp_path, **sections) -> NodePolicy:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_policy(path)


# The five refusals the issue names, each with the field the refusal line must name.
REFUSALS = [
    ("no DP", ["privacy.mode=none"], {}, "privacy.mode"),
    ("delta 0.5", ["privacy.mode=dp-sgd", "privacy.delta=0.5"], {}, "privacy.delta"),
    ("noise below the minimum", ["privacy.mode=dp-sgd", "privacy.noise_multiplier=0.5"], {}, "privacy.noise_multiplier"),
    ("threshold below the minimum", ["privacy.mode=dp-sgd", "federation.secure_aggregation.colluder_fraction=0.0",
                                     "federation.secure_aggregation.threshold=2"],
     {"secure_aggregation": {"min_threshold": 3}}, "federation.secure_aggregation.threshold"),
    ("unapproved experiment", ["privacy.mode=dp-sgd"], {"approvals": {"experiments": ["ab" * 32]}}, "experiment"),
]


@pytest.mark.parametrize("case, overrides, extra, field", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_weaker_request_is_refused_naming_the_field(repo_root, tmp_path, case, overrides, extra, field):
    base = yaml.safe_load((repo_root / "configs/deploy/policy-strict.yaml").read_text())
    for section, values in extra.items():
        base[section].update(values)
    policy = _policy(tmp_path, **base)
    decision = decide(policy, _smoke(repo_root, *overrides), "maze-clinic")
    assert not decision.accepted and decision.effective is None
    assert [v.field for v in decision.violations] == [field]
    assert decision.lines[0].startswith(f"{field}: the request has ")
    message = str(decision.refusal())
    assert message.splitlines()[0].startswith("maze-clinic refuses the request under its node policy")
    assert message.splitlines()[1].strip().startswith(field)


def test_every_violated_field_gets_its_own_line(repo_root, strict):
    exp = _smoke(repo_root, "privacy.mode=dp-sgd", "privacy.delta=0.5", "privacy.noise_multiplier=0.5",
                 "privacy.accountant=prv", "federation.aggregation=svd")
    policy = strict.model_copy(update={"privacy": strict.privacy.model_copy(update={"accountants": ["rdp"]})})
    decision = decide(policy, exp, "x")
    assert [v.field for v in decision.violations] == [
        "privacy.noise_multiplier", "privacy.delta", "privacy.accountant", "federation.aggregation"]


def test_the_stricter_side_wins_where_the_institution_can_tighten_alone(repo_root, strict):
    exp = _smoke(repo_root, "privacy.mode=dp-sgd", "privacy.epsilon_budget=20", "privacy.delta=1e-6")
    decision = decide(strict, exp, "x", epsilon_cap=6.0)
    assert decision.accepted
    p = decision.effective.privacy
    assert p.epsilon_budget == 6.0 and p.delta == 1e-6  # the cap of the deployment config, the request's smaller δ
    assert decision.adjustments == ["privacy.epsilon_budget: 20 -> 6 (the institution's epsilon cap)"]
    assert decide(strict, _smoke(repo_root, "privacy.mode=dp-sgd"), "x").effective.privacy.epsilon_budget == 8.0
    assert exp.privacy.epsilon_budget == 20  # the coordinator's experiment is never modified in place


def test_zero_noise_is_refused_unless_the_policy_allows_a_non_private_run(repo_root, strict):
    exp = _smoke(repo_root, "privacy.mode=dp-sgd", "privacy.noise_multiplier=0")
    assert [v.field for v in decide(NodePolicy.open(), exp, "x").violations] == ["privacy.noise_multiplier"]
    assert "no noise" in decide(strict, exp, "x").lines[0]
    allowing = NodePolicy.open()
    allowing.privacy.allow_non_private = True
    assert decide(allowing, exp, "x").accepted


def test_counts_in_the_payload_are_refused_under_add_remove_accounting(repo_root):
    policy = NodePolicy.open()
    exp = _smoke(repo_root, "privacy.mode=dp-sgd", "federation.aggregation=weighted")
    assert [v.field for v in decide(policy, exp, "x").violations] == ["federation.aggregation"]
    replace_one = _smoke(repo_root, "privacy.mode=dp-sgd", "federation.aggregation=weighted",
                         "privacy.neighbouring=replace-one", "privacy.accountant=pld")
    assert decide(policy, replace_one, "x").accepted


def test_replace_one_policies_refuse_add_remove_and_colluders_bound_the_threshold(repo_root, tmp_path):
    policy = _policy(tmp_path, privacy={"mechanisms": ["client-dp"], "neighbouring": "replace-one"},
                     secure_aggregation={"colluder_fraction": 0.3})
    exp = _smoke(repo_root, "privacy.mode=client-dp", "federation.secure_aggregation.colluder_fraction=0.0",
                 "federation.secure_aggregation.threshold=2")
    fields = [v.field for v in decide(policy, exp, "x").violations]
    # The experiment assumes no colluder; the institution assumes 1 of 3, under which t=2 exposes an honest update.
    assert fields == ["privacy.neighbouring", "privacy.honest_fraction", "federation.secure_aggregation.threshold"]
    # Assuming 2 of 3, no threshold helps: the sum of all three minus the colluders' inputs is the third's update.
    policy = _policy(tmp_path, privacy={"mechanisms": ["client-dp"], "neighbouring": "replace-one"},
                     secure_aggregation={"colluder_fraction": 0.45})
    lines = decide(policy, exp, "x").lines
    assert [line.split(":")[0] for line in lines] == ["privacy.neighbouring", "privacy.honest_fraction", "clients"]
    assert "more institutions: a sum of 3 listed institutions cannot hold two honest inputs" in lines[2]


def test_experiment_approval_uses_the_hash_of_what_the_coordinator_sends(repo_root, tmp_path):
    exp = _smoke(repo_root, "privacy.mode=dp-sgd")
    approved = experiment_hash(exp.model_dump_json())
    policy = _policy(tmp_path, approvals={"experiments": [approved]})
    assert decide(policy, exp, "x").accepted
    assert not decide(policy, _smoke(repo_root, "privacy.mode=dp-sgd", "seed=1"), "x").accepted


def test_model_approval_hashes_the_loaded_weights(repo_root, tmp_path):
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.models import load_model_and_tokenizer
    from fedse_secure.policy import check_model, model_hash

    exp = _smoke(repo_root, "privacy.mode=dp-sgd")
    bare = model_hash(load_model_and_tokenizer("tiny-llama").model)
    wrapped = model_hash(AgentModel.load(exp.model, exp.lora, exp.seed).model)
    assert bare == wrapped, "the peft-wrapped model hashes as its files do"
    decision = decide(_policy(tmp_path, approvals={"models": ["cd" * 32]}), exp, "x")
    check_model(decision, bare)
    assert [v.field for v in decision.violations] == ["model.name_or_path"]
    ok = decide(_policy(tmp_path, approvals={"models": [bare]}), exp, "x")
    check_model(ok, bare)
    assert ok.accepted


@pytest.mark.parametrize("content, message", [
    ("privacy: {mechanisms: [shuffle]}", "unknown privacy mechanism 'shuffle'"),
    ("exports: {allow: [train.gradients]}", "'train.gradients' is not an exportable statistic"),
    ("approvals: {experiments: [abc]}", "'abc' is not a SHA-256 hash"),
    ("privacy: {max_delta: 2}", "privacy.max_delta"),
    ("colour: red", "colour: unknown field"),
    ("[1, 2", "not valid YAML"),
])
def test_a_bad_policy_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


# -- what leaves --------------------------------------------------------------------------------------------------
def _round_report():
    return {
        "env": "maze", "payload_values": 1234,
        "explore": {"episodes": 2, "successes": 1, "success_rate": 0.5, "buffer_size": 9, "kept": 1},
        "train": {"examples": 9, "steps": 5, "loss": 1.25},
        "privacy": {"mechanism": "dp-sgd", "private": True, "epsilon_spent": 3.2, "delta": 1e-5, "accountant": "rdp",
                    "neighbouring": "add-remove", "ledger_head": "ab" * 32, "noise_multiplier": 1.0,
                    "sample_rate": 0.44, "update_norm": float("inf")},
        "timing": {"explore_s": 1.0, "train_s": float("nan")},
        "future_statistic": 7,
    }


def test_nothing_computed_from_private_data_leaves_by_default():
    out = filter_round_report(_round_report(), [])
    assert out == {
        "env": "maze", "payload_values": 1234,
        "privacy": {"mechanism": "dp-sgd", "private": True, "delta": 1e-5, "accountant": "rdp",
                    "neighbouring": "add-remove", "ledger_head": "ab" * 32, "noise_multiplier": 1.0},
        "withheld": ["explore.buffer_size", "explore.episodes", "explore.kept", "explore.success_rate",
                     "explore.successes", "future_statistic", "privacy.epsilon_spent", "privacy.sample_rate",
                     "privacy.update_norm", "timing.explore_s", "timing.train_s", "train.examples", "train.loss",
                     "train.steps"],
    }
    assert set(CATALOGUE).isdisjoint(PUBLIC)


def test_allowed_statistics_leave_as_strict_json():
    out = filter_round_report(_round_report(), ["train.loss", "privacy.update_norm", "timing.train_s"])
    assert out["train"] == {"loss": 1.25}
    assert out["privacy"]["update_norm"] is None and out["timing"] == {"train_s": None}  # inf/NaN never leave
    json.loads(json.dumps(out, allow_nan=False))
    evaluation = {"env": "maze", "test_tasks": 4, "successes": 1, "success_rate": 0.25, "seconds": 3.0,
                  "agent_steps": 40}
    assert filter_evaluation(evaluation, ["evaluation.success_rate"]) == {
        "env": "maze", "test_tasks": 4, "successes": 1, "success_rate": 0.25,
        "withheld": ["evaluation.agent_steps", "evaluation.seconds"]}


# -- the endpoint: refusal before any data is touched, recorded in the audit log ------------------------------------
@pytest.mark.parametrize("case, overrides, extra, field", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_the_institution_refuses_in_process_before_touching_data(repo_root, tmp_path, case, overrides, extra, field):
    from fedse_secure.audit import AuditLog
    from fedse_secure.federation.endpoint import InstitutionEndpoint
    from fedse_secure.federation.wire import REFUSED, StageReply, StageRequest, pack, run_key, unpack

    base = yaml.safe_load((repo_root / "configs/deploy/policy-strict.yaml").read_text())
    for section, values in extra.items():
        base[section].update(values)
    exp = _smoke(repo_root, *overrides)
    text = exp.model_dump_json()
    decision = decide(_policy(tmp_path, **base), exp, "maze-clinic", experiment_json=text)
    audit = AuditLog(tmp_path / "inst" / "audit.jsonl")
    # No Institution exists for a refused experiment: nothing could have been explored, trained or recorded.
    endpoint = InstitutionEndpoint(None, exp.federation.backend(), key=run_key(text), decision=decision, audit=audit)
    endpoint.record_session(exp, tmp_path / "inst" / "privacy_ledger.jsonl")
    req = StageRequest("advertise_keys", 1, run_key(text), text, train=True, blobs={"request": b""})
    reply = endpoint.handle(StageRequest.from_parts(*unpack(pack(req.header(), req.blobs))))
    reply = StageReply.from_parts(*unpack(pack(reply.header(), reply.blobs)))
    assert reply.refusal == REFUSED and not reply.blobs and not reply.report
    assert f"\n  {field}: the request has" in reply.error
    kinds = [(e["kind"], e["data"].get("accepted")) for e in audit.records()]
    assert kinds == [("session", False), ("refusal", None)]
    assert audit.records()[1]["data"]["reason"] == reply.error
    assert not (tmp_path / "inst" / "privacy_ledger.jsonl").exists()


# -- fedse policy check ---------------------------------------------------------------------------------------------
def test_policy_check_cli_on_the_smoke_experiment(repo_root):
    strict, smoke = str(repo_root / "configs/deploy/policy-strict.yaml"), str(repo_root / "configs/smoke.yaml")
    refused = runner.invoke(app, ["policy", "check", "--policy", strict, "--experiment", smoke])
    assert refused.exit_code == 1, refused.output
    assert "privacy.mode: the request has none" in refused.output
    accepted = runner.invoke(app, ["policy", "check", "--policy", strict, "--experiment", smoke,
                                   "--set", "privacy.mode=dp-sgd"])
    assert accepted.exit_code == 0, accepted.output
    assert "ACCEPTED" in accepted.output and "epsilon_budget=8" in accepted.output
    data = json.loads(runner.invoke(app, ["policy", "check", "-p", strict, "-e", smoke, "--json"]).output)
    assert data["accepted"] is False and data["violations"][0]["field"] == "privacy.mode"
    bad = runner.invoke(app, ["policy", "check", "--policy", smoke, "--experiment", smoke])
    assert bad.exit_code == 2 and "unknown field" in bad.output
    missing = runner.invoke(app, ["policy", "check", "--policy", strict, "--experiment", "nope.yaml"])
    assert missing.exit_code == 2 and "no such config file" in missing.output
    hashed = runner.invoke(app, ["policy", "hash", "--experiment", smoke, "--set", "privacy.mode=dp-sgd"])
    assert hashed.exit_code == 0 and data["experiment_hash"] != hashed.output.split()[1]
    explained = runner.invoke(app, ["policy", "explain", "exports"])
    assert explained.exit_code == 0 and "train.loss" in explained.output and "privacy.ledger_head" in explained.output
    assert not math.isnan(0.0)


def _federation_of(repo_root, n: int, *overrides):
    """The smoke experiment with ``n`` institutions (Maze beyond the first three)."""
    exp = _smoke(repo_root, *overrides)
    extra = [exp.clients[0].model_copy(update={"name": f"maze-{i:02d}"}) for i in range(n - len(exp.clients))]
    return exp.model_copy(update={"clients": [*exp.clients, *extra]})


def test_client_dp_rounds_must_hold_the_contributors_its_noise_was_sized_for(repo_root, tmp_path):
    """Client-dp noise shares are sized for the t(N) contributors an N-institution sum is guaranteed; a round the
    coordinator sets up over fewer institutions, with the smaller threshold derived for them, is refused."""
    from fedse_secure.federation.endpoint import institution_backend
    from fedse_secure.federation.institution import release_terms

    policy = _policy(tmp_path, privacy={"mechanisms": ["client-dp"]})
    exp = _federation_of(repo_root, 40, "privacy.mode=client-dp", "privacy.honest_fraction=0.5")
    assert decide(policy, exp, "maze-clinic").accepted
    sized_for = release_terms(exp).min_contributors
    requirements = institution_backend(exp, policy).requirements
    assert requirements.min_threshold == sized_for and len(requirements.roster) == 40
    # Without client-dp the same institution accepts a round of 20 of the 40 at the least it requires for them.
    plain = institution_backend(_federation_of(repo_root, 40, "privacy.mode=dp-sgd"), policy).requirements
    graph = plain.parameters(20)
    assert plain.refusal(20, 20, graph.degree, graph.threshold) is None and graph.threshold < sized_for
    why = requirements.refusal(20, 20, graph.degree, graph.threshold)
    assert why is not None and why.parameter == "threshold" and why.least.startswith(f"{sized_for},")


def test_honest_fraction_leaves_the_noise_of_a_sum_after_its_colluders_remove_theirs(repo_root, tmp_path):
    """Three institutions, t = 3, one colluder assumed (10%, rounded up): of a sum of three noise shares two are
    honest, so honest_fraction may be at most 2/3 (the policy once allowed 1 - 10% = 0.9)."""
    policy = _policy(tmp_path, privacy={"mechanisms": ["client-dp"]})
    refused = decide(policy, _smoke(repo_root, "privacy.mode=client-dp", "privacy.honest_fraction=0.9"), "x")
    assert [v.field for v in refused.violations] == ["privacy.honest_fraction"]
    assert "<= 0.666667" in refused.lines[0] and "1 of them may collude" in refused.lines[0]
    assert decide(policy, _smoke(repo_root, "privacy.mode=client-dp", "privacy.honest_fraction=0.6"), "x").accepted


def test_the_default_policy_caps_epsilon_so_that_a_token_noise_is_not_called_private(repo_root, tmp_path):
    """A node without a policy file requires DP; a noise multiplier of 1e-6 is still a DP mode, so the default
    caps epsilon at 8: the budget is lowered to it and the round's projected cost is refused before training."""
    from fedse_secure.privacy.budget import BudgetExceededError, BudgetGuard
    from fedse_secure.privacy.dpsgd import dp_sgd_event
    from fedse_secure.privacy.ledger import PrivacyLedger

    exp = _smoke(repo_root, "privacy.mode=dp-sgd", "privacy.noise_multiplier=1e-6")
    decision = decide(NodePolicy(), exp, "x")
    assert decision.accepted and decision.effective.privacy.epsilon_budget == 8.0
    assert decision.adjustments == ["privacy.epsilon_budget: none -> 8 (the institution's epsilon cap)"]
    privacy = decision.effective.privacy
    guard = BudgetGuard(PrivacyLedger(tmp_path / "ledger.jsonl"), privacy, institution="x")
    with pytest.raises(BudgetExceededError):
        guard.ensure_affordable(dp_sgd_event(8, exp.training, privacy))
    assert NodePolicy.open().privacy.max_epsilon is None, "research simulations keep their own budget"
