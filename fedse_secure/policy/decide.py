"""The institution decides: every privacy-relevant setting it uses is computed from its node policy and the
coordinator's request, and a request that is weaker than the policy is refused before any data is touched,
with one line per violated field.

Where the institution can be stricter on its own without changing the shared protocol, the stricter side wins
silently and is recorded as an adjustment (the ε budget is lowered to the policy's cap). Everything else that
is weaker — a mechanism the policy does not allow, too little noise, too large a δ, an accountant or relation
it does not accept, an aggregation rule, backend or protocol parameter below its minimums, an experiment or
model it did not approve — is a violation, and the institution takes no part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fedse_secure.config import ExperimentConfig
from fedse_secure.errors import FedseError
from fedse_secure.policy.model import NodePolicy


class PolicyRefused(FedseError, RuntimeError):
    """The institution's node policy refuses the coordinator's request; one line per violated field."""

    exit_code = 1

    def __init__(self, institution: str, policy_source: str, lines: list[str]):
        self.lines = list(lines)
        super().__init__(f"{institution} refuses the request under its node policy {policy_source}:\n  "
                         + "\n  ".join(self.lines))


@dataclass(frozen=True)
class Violation:
    field: str
    requested: str
    required: str

    @property
    def line(self) -> str:
        return f"{self.field}: the request has {self.requested}; the policy requires {self.required}"


@dataclass
class Decision:
    institution: str
    policy: NodePolicy
    experiment_hash: str
    violations: list[Violation] = field(default_factory=list)
    #: Where the stricter side (the policy) won without refusing: "field: before -> after (why)".
    adjustments: list[str] = field(default_factory=list)
    #: The experiment as this institution runs it (None when refused).
    effective: ExperimentConfig | None = None

    @property
    def accepted(self) -> bool:
        return not self.violations

    @property
    def lines(self) -> list[str]:
        return [v.line for v in self.violations]

    def refusal(self) -> PolicyRefused:
        return PolicyRefused(self.institution, self.policy.source, self.lines)

    def raise_if_refused(self) -> ExperimentConfig:
        if self.violations:
            raise self.refusal()
        assert self.effective is not None
        return self.effective


def experiment_hash(experiment_json: str) -> str:
    """SHA-256 of the experiment exactly as the coordinator sends it (what a policy approves)."""
    return hashlib.sha256(experiment_json.encode()).hexdigest()


def model_hash(model) -> str:
    """SHA-256 over the base model's weights (names, dtypes, shapes, bytes; LoRA tensors excluded), i.e. what
    the institution actually loaded, whatever file format or cache it came from."""
    import numpy as np
    import torch

    digest = hashlib.sha256()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft wraps each adapted layer (its weight becomes ``<layer>.base_layer.weight``): names are taken as the
    # bare model has them, so the hash of a loaded-and-wrapped model equals that of the files.
    weights = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if "lora_" not in name}
    for name, tensor in sorted(weights.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        data = t.view(torch.uint8) if t.dtype == torch.bfloat16 else t
        digest.update(np.ascontiguousarray(data.numpy()).tobytes())
    return digest.hexdigest()


def _fmt(x) -> str:
    return "none" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def decide(policy: NodePolicy, experiment: ExperimentConfig, institution: str, *, experiment_json: str | None = None,
           epsilon_cap: float | None = None) -> Decision:
    """Check the coordinator's ``experiment`` against ``policy`` for ``institution``; ``epsilon_cap`` is a further
    cap from the institution's own deployment config (the smaller cap wins)."""
    text = experiment_json if experiment_json is not None else experiment.model_dump_json()
    decision = Decision(institution, policy, experiment_hash(text))
    v = decision.violations.append
    p, rules = experiment.privacy, policy.privacy

    approved = policy.approvals.experiments
    if approved != "any" and decision.experiment_hash not in approved:
        v(Violation("experiment", f"hash {decision.experiment_hash}",
                    f"one of the {len(approved)} approved experiment hashes (approvals.experiments)"))

    if p.mode not in rules.mechanisms:
        v(Violation("privacy.mode", p.mode, f"one of {', '.join(rules.mechanisms)} (privacy.mechanisms)"))
    private = p.mode != "none"
    if private:
        if p.noise_multiplier == 0.0 and not rules.allow_non_private:
            v(Violation("privacy.noise_multiplier", "0 (no noise: epsilon is infinite)",
                        "noise (privacy.allow_non_private is false)"))
        elif rules.min_noise_multiplier is not None and 0.0 < p.noise_multiplier < rules.min_noise_multiplier:
            v(Violation("privacy.noise_multiplier", _fmt(p.noise_multiplier),
                        f">= {rules.min_noise_multiplier:g} (privacy.min_noise_multiplier)"))
        if p.delta > rules.max_delta:
            v(Violation("privacy.delta", _fmt(p.delta), f"<= {rules.max_delta:g} (privacy.max_delta)"))
        if p.accountant not in rules.accountants:
            v(Violation("privacy.accountant", p.accountant, f"one of {', '.join(rules.accountants)} "
                                                            "(privacy.accountants)"))
        if rules.neighbouring == "replace-one" and p.neighbouring != "replace-one":
            v(Violation("privacy.neighbouring", p.neighbouring, "replace-one (privacy.neighbouring)"))
        if p.mode == "client-dp":
            _check_honest_fraction(policy, experiment, v)

    fed = experiment.federation
    from fedse_secure.config import FEDERATED_MODES

    if fed.mode not in FEDERATED_MODES:
        pass  # a baseline that never aggregates: nothing leaves, no aggregation or protocol to check
    elif fed.aggregation not in policy.aggregation.rules:
        v(Violation("federation.aggregation", fed.aggregation,
                    f"one of {', '.join(policy.aggregation.rules)} (aggregation.rules)"))
    else:
        from fedse_secure.aggregation.rules import RULES

        if RULES.get(fed.aggregation).payload_carries_counts and not (private and p.neighbouring == "replace-one"):
            v(Violation("federation.aggregation", f"{fed.aggregation} (its payload carries a count of private "
                        "trajectories, released as a sum)", "a rule without counts, or privacy.neighbouring "
                        "replace-one under DP"))
    if fed.mode in FEDERATED_MODES:
        _check_secure_aggregation(policy, experiment, v)

    if decision.violations:
        return decision
    caps = [c for c in (rules.max_epsilon, epsilon_cap) if c is not None]
    privacy = p
    if private and caps:
        cap = min(caps)
        if p.epsilon_budget is None or p.epsilon_budget > cap:
            privacy = p.model_copy(update={"epsilon_budget": cap})
            decision.adjustments.append(f"privacy.epsilon_budget: {_fmt(p.epsilon_budget)} -> {cap:g} (the "
                                        "institution's epsilon cap)")
    decision.effective = experiment.model_copy(update={"privacy": privacy})
    return decision


def _check_honest_fraction(policy: NodePolicy, experiment: ExperimentConfig, v) -> None:
    """Client-dp noise shares are sized so that honest_fraction x t of them make the noise of a sum of t
    contributors (t: the fewest the backend releases). The colluders assumed may all be among those t and remove
    their own shares, so at most t - c of them are honest: honest_fraction must not exceed (t - c) / t."""
    n = len(experiment.clients)
    if n < 2:
        return  # nothing is summed; the experiment's own validation names the problem
    try:
        contributors = experiment.federation.backend().min_contributors(n)
    except ValueError:
        return  # the experiment's own validation names the problem
    colluders = min(contributors, policy.secure_aggregation.masking_requirements().colluders(n))
    honest_max = (contributors - colluders) / contributors
    honest = experiment.privacy.honest_fraction
    if honest > honest_max + 1e-12:
        v(Violation("privacy.honest_fraction", _fmt(honest),
                    f"<= {honest_max:g}: a released sum may hold as few as {contributors} contributors, and "
                    f"{colluders} of them may collude (secure_aggregation.colluder_fraction "
                    f"{policy.secure_aggregation.colluder_fraction:g} of {n}) and remove their noise"))


def _check_secure_aggregation(policy: NodePolicy, experiment: ExperimentConfig, v) -> None:
    rules = policy.secure_aggregation
    fed = experiment.federation
    settings = fed.secure_aggregation
    n = len(experiment.clients)
    if settings.backend not in rules.backends:
        v(Violation("federation.secure_aggregation.backend", settings.backend,
                    f"one of {', '.join(rules.backends)} (secure_aggregation.backends)"))
        return
    if n < rules.min_participants:
        v(Violation("clients", f"{n} institutions", f"at least {rules.min_participants} "
                                                    "(secure_aggregation.min_participants)"))
        return
    parameters = getattr(settings, "parameters", None)
    if parameters is not None:
        # Masking: the setup the coordinator will propose, against the least this institution accepts for n
        # participants (its masking client checks every round's actual setup again).
        try:
            graph = parameters(n)
        except ValueError:
            return  # the experiment's own validation names the problem
        why = rules.masking_requirements().refusal(n, n, graph.degree, graph.threshold)
        if why is not None:
            field = {"degree": "federation.secure_aggregation.neighbours", "participants": "clients"}.get(
                why.parameter, f"federation.secure_aggregation.{why.parameter}")
            required = why.least or (f"more institutions: {why.problem}" if why.parameter == "participants"
                                     else why.problem)
            v(Violation(field, f"degree {graph.degree} and t={graph.threshold}", required))
        return
    # Other backends: colluders subtract their own inputs from a released sum, so at least two honest inputs
    # must remain in the smallest sum the backend releases, or one institution's update is exposed exactly.
    contributors = fed.backend().min_contributors(n)
    colluders = rules.masking_requirements().colluders(n) if n >= 2 else 0
    if colluders and contributors - colluders < 2:
        v(Violation("federation.secure_aggregation.threshold",
                    f"sums of as few as {contributors} contributors",
                    f"at least {colluders + 2}: two honest inputs beyond the {colluders} colluding institutions "
                    f"assumed (secure_aggregation.colluder_fraction {rules.colluder_fraction:g} of {n})"))


def check_model(decision: Decision, model_sha256: str) -> None:
    """Add the model-approval violation (the hash of what was loaded must be approved) and raise if refused."""
    approved = decision.policy.approvals.models
    if approved != "any" and model_sha256 not in approved:
        decision.violations.append(Violation("model.name_or_path", f"a base model with hash {model_sha256}",
                                             f"one of the {len(approved)} approved model hashes (approvals.models)"))
        decision.effective = None
