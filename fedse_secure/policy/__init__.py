"""The institution's node policy: what it accepts from a coordinator (:mod:`.model`, :func:`decide`) and what
may leave it (:mod:`.exports`). The same policy object is applied by a simulated institution and by a deployed
one, so the same rules hold in one process and across machines."""

from fedse_secure.policy.decide import (
    Decision,
    PolicyRefused,
    Violation,
    check_model,
    decide,
    experiment_hash,
    model_hash,
)
from fedse_secure.policy.model import NodePolicy, PolicyError, load_policy

__all__ = ["Decision", "NodePolicy", "PolicyError", "PolicyRefused", "Violation", "check_model", "decide",
           "experiment_hash", "load_policy", "model_hash"]
