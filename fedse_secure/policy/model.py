"""The node policy: one file per institution, written by its compliance office, that says what the institution
accepts from a coordinator and what may leave it. The format (YAML, every field documented here and printed
by ``fedse policy explain``)::

    version: 1
    privacy:            # which privacy mechanisms, and their minimums
      mechanisms: [dp-sgd, client-dp]
      min_noise_multiplier: 0.8
      max_delta: 1.0e-5
      max_epsilon: 8.0
      accountants: [rdp, prv, pld]
      neighbouring: add-remove
      allow_non_private: false
    aggregation:
      rules: [fedavg, ffa, svd]
    secure_aggregation: # backends and, for masking, what the institution assumes (the degree and threshold
      backends: [masking] #  it accepts are derived from it every round; see MaskingRequirements)
      min_participants: 3
      colluder_fraction: 0.1
      dropout_fraction: 0.1
      security_bits: 40
      correctness_bits: 20
      min_degree: null
      min_threshold: null
      one_input_per_round: true
    exports:            # what may leave besides the DP-protected update (see fedse_secure.policy.exports)
      allow: []
    approvals:          # which experiments and base models this institution signed off ("any", or hashes)
      experiments: any
      models: any
    adapters:
      require_signature: true

A field left out takes the default below. The defaults are the conservative choice where one exists (DP
required with epsilon <= 8 over the ledger, no statistic leaves, signed adapters only); approvals default to ``any`` so that a policy without
hash lists is usable, and a compliance office that approves runs one by one lists their hashes
(``fedse policy hash``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, Field, PrivateAttr, ValidationError, field_validator

from fedse_secure.config import (
    AccountantName,
    ConfigError,
    MechanismName,
    RuleName,
    format_validation_error,
    not_a_mapping,
    read_yaml,
)
from fedse_secure.schema import StrictModel
from fedse_secure.secagg.masking.requirements import MaskingRequirements

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _backend_name(name: str) -> str:
    from fedse_secure.secagg.backends import BACKENDS

    if name not in BACKENDS:
        raise ValueError(BACKENDS.unknown(name))
    return name


BackendName = Annotated[str, AfterValidator(_backend_name)]


def _approval_list(value):
    if value == "any":
        return value
    if not isinstance(value, list):
        raise ValueError("must be 'any' or a list of SHA-256 hashes (64 hex digits; `fedse policy hash` prints them)")
    bad = [v for v in value if not isinstance(v, str) or not _SHA256.match(v)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a SHA-256 hash (64 lowercase hex digits); `fedse policy hash` prints them")
    return value


Approvals = Annotated[Literal["any"] | list[str], AfterValidator(_approval_list)]


class PrivacyRules(StrictModel):
    mechanisms: list[MechanismName] = Field(
        default_factory=lambda: ["dp-sgd", "client-dp"],
        description="Privacy mechanisms (privacy.mode) this institution accepts; add none to accept runs without "
                    "differential privacy.",
    )
    min_noise_multiplier: float | None = Field(
        None, gt=0.0, description="The smallest privacy.noise_multiplier accepted under a DP mechanism (None: any "
                                  "positive value).",
    )
    max_delta: float = Field(1e-5, gt=0.0, lt=1.0, description="The largest privacy.delta accepted.")
    max_epsilon: float | None = Field(
        8.0, gt=0.0, description="This institution's epsilon cap over its whole ledger; the coordinator's "
                                 "privacy.epsilon_budget is lowered to it (the stricter side wins), and a round "
                                 "whose projected cost would pass it is refused before training. Without a cap "
                                 "(null) any positive noise is accepted, however large its epsilon.",
    )
    accountants: list[AccountantName] = Field(
        default_factory=lambda: ["rdp", "prv", "pld"],
        description="Accountants (privacy.accountant) whose epsilon this institution accepts.",
    )
    neighbouring: Literal["add-remove", "replace-one"] = Field(
        "add-remove",
        description="The weakest neighbouring relation accepted: replace-one refuses add-remove requests (use it "
                    "when the record count may be disclosed); add-remove accepts both.",
    )
    allow_non_private: bool = Field(
        False, description="Accept a DP mechanism with noise_multiplier 0 (a non-private run: epsilon infinite, "
                           "labelled non-private in every report).",
    )


class AggregationRules(StrictModel):
    rules: list[RuleName] = Field(
        default_factory=lambda: ["fedavg", "ffa", "svd"],
        description="Aggregation rules (federation.aggregation) accepted; weighted sends a count of private "
                    "trajectories inside the sum and is refused under add-remove accounting anyway.",
    )


class SecureAggregationRules(MaskingRequirements):
    """The backends an institution accepts and, for masking, the weakest protocol it accepts: the fields of
    :class:`MaskingRequirements`, from which its secure-aggregation client derives the least degree and threshold
    for the participants a setup lists and refuses anything weaker (the coordinator's settings never count)."""

    backends: list[BackendName] = Field(
        default_factory=lambda: ["masking"],
        description="Secure-aggregation backends accepted (federation.secure_aggregation.backend).",
    )
    # Below 3 only for backends other than masking (masking never runs with fewer than 3).
    min_participants: int = Field(3, ge=1, description="The fewest institutions (experiment clients) a round may "
                                                       "have.")
    one_input_per_round: bool = Field(
        True,
        description="Send this institution's input for a round of a run at most once. Its round is deterministic in "
                    "the round id, so a coordinator that re-runs a round with other participants could subtract the "
                    "sums and read its update. The cost: a round lost after the inputs were sent (a coordinator that "
                    "crashed before recording it) cannot be re-run, and the run must start anew.",
    )

    def masking_requirements(self) -> MaskingRequirements:
        """What this institution's masking client holds every round's setup to."""
        fields = self.model_dump(exclude={"backends", "one_input_per_round"})
        fields["min_participants"] = max(3, self.min_participants)
        return MaskingRequirements(**fields)


class ExportRules(StrictModel):
    allow: list[str] = Field(
        default_factory=list,
        description="Statistics computed from private data without DP that may nevertheless leave (coarse, "
                    "documented exceptions; `fedse policy explain exports` lists them). Default: none.",
    )

    @field_validator("allow")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from fedse_secure.policy.exports import CATALOGUE

        unknown = [name for name in v if name not in CATALOGUE]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an exportable statistic; choose from {', '.join(sorted(CATALOGUE))}")
        return v


class ApprovalRules(StrictModel):
    experiments: Approvals = Field(
        "any", description="SHA-256 hashes of the experiments (as the coordinator sends them) this institution "
                           "approved, or any.",
    )
    models: Approvals = Field(
        "any", description="SHA-256 hashes of the base models (their weights) this institution approved, or any.",
    )


class AdapterRules(StrictModel):
    require_signature: bool = Field(
        True, description="Load a global adapter only if the coordinator's Ed25519 signature over it (with the round "
                          "and the experiment hash) verifies.",
    )


class NodePolicy(StrictModel):
    version: Literal[1] = Field(1, description="Policy format version.")
    privacy: PrivacyRules = Field(default_factory=PrivacyRules, description="Privacy mechanisms and their minimums.")
    aggregation: AggregationRules = Field(default_factory=AggregationRules, description="Aggregation rules.")
    secure_aggregation: SecureAggregationRules = Field(
        default_factory=SecureAggregationRules, description="Secure-aggregation backends and protocol minimums.",
    )
    exports: ExportRules = Field(default_factory=ExportRules, description="What may leave besides the update.")
    approvals: ApprovalRules = Field(default_factory=ApprovalRules, description="Approved experiments and models.")
    adapters: AdapterRules = Field(default_factory=AdapterRules, description="Global adapters.")
    #: Where it was read from (not part of the file).
    _source: str = PrivateAttr("(built-in defaults)")

    @property
    def source(self) -> str:
        return self._source

    @classmethod
    def open(cls) -> NodePolicy:
        """What a simulated institution without a ``policy:`` file applies: every mechanism, rule and backend,
        every statistic leaves (a research run). Zero noise under a DP mode is still refused."""
        from fedse_secure.aggregation.rules import RULES
        from fedse_secure.policy.exports import CATALOGUE
        from fedse_secure.privacy.accountants import ACCOUNTANTS
        from fedse_secure.privacy.mechanisms import MECHANISMS
        from fedse_secure.secagg.backends import BACKENDS

        policy = cls(
            privacy=PrivacyRules(mechanisms=MECHANISMS.names(), max_delta=0.999999, max_epsilon=None,
                                 accountants=ACCOUNTANTS.names()),
            aggregation=AggregationRules(rules=RULES.names()),
            # Research runs: any setup the experiment itself considers safe (its own colluder assumption).
            # One operator runs coordinator and institutions, so a round lost before it was recorded is re-run.
            secure_aggregation=SecureAggregationRules(backends=BACKENDS.names(), min_participants=1,
                                                      colluder_fraction=0.0, dropout_fraction=0.0,
                                                      one_input_per_round=False),
            exports=ExportRules(allow=sorted(CATALOGUE)),
            adapters=AdapterRules(require_signature=True),
        )
        policy._source = "(no policy file: the simulation's open default)"
        return policy

    def sha256(self) -> str:
        """Hash of the policy's content (what the audit log records as the policy in force)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class PolicyError(ConfigError):
    """A policy file that cannot be read or does not validate; the message names the field and the fix."""


def load_policy(path: str | Path | None) -> NodePolicy:
    """Read and validate a policy file; ``None`` gives the defaults (``NodePolicy()``)."""
    if path is None:
        return NodePolicy()
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise PolicyError(f"{path}: no such policy file; see configs/deploy/policy.yaml for the format")
    try:
        # The experiment's reader: a key given twice is refused, never silently the last one.
        data = read_yaml(path, example="configs/deploy/policy.yaml")
    except ConfigError as err:
        raise PolicyError(str(err)) from None
    if data is None:  # an empty policy: every field takes its conservative default
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(not_a_mapping(str(path), data, "write `version: 1` and the sections you need (see "
                                        "configs/deploy/policy.yaml)"))
    try:
        policy = NodePolicy.model_validate(data)
    except ValidationError as err:
        raise PolicyError(format_validation_error(err, str(path))) from None
    policy._source = str(path)
    return policy
