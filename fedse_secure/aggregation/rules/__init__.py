"""Aggregation rules expressed over *sums*, so that they run unchanged under secure aggregation.

Each rule has two halves:

* ``client_payload(local, global_, weight)``: what one institution contributes, as one flat float vector;
* ``finalize(total, num_survivors, global_)``: the new global adapter, computed from the *sum* of payloads
  only (the coordinator never sees an individual payload).

========== ============================================================ ==========================================
rule       what it computes                                              exact?
========== ============================================================ ==========================================
fedavg     the paper's unweighted element-wise mean of A and of B        exact (it *is* the definition), but the
           (FedIT / Fed-SE)                                              mean of the products B_k A_k is *not*
                                                                         mean(B)·mean(A)
weighted   element-wise mean of A and B weighted by each institution's   exact weighted mean; the weights travel
           number of successful trajectories (paper ablation)            inside the masked vector, so the
                                                                         coordinator learns only their sum
ffa        FFA-LoRA: A frozen at its shared initialisation, B averaged    exact: with a shared A,
                                                                         mean(B_k)·A = mean(B_k·A)
svd        mean of the products B_k A_k (the true mean update), then      exact mean of the updates; rank-r
           re-factorised to rank r by truncated SVD                       truncation is the best rank-r
                                                                         approximation (Eckart-Young); payload is
                                                                         d_out×d_in per layer, not r(d_in+d_out)
========== ============================================================ ==========================================

Payloads are *deltas* from the current global adapter: with full participation the fedavg result equals the
paper's average of parameters, and with dropouts it is the mean over survivors. Deltas are also small, which
suits fixed-point quantisation with a clipping range.

Each rule is one module of this package that registers its class with ``@RULES.register(name)``
(``federation.aggregation`` in a config). Rule modules import torch inside their methods, so validating a
config does not load it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from fedse_secure.registry import Registry

if TYPE_CHECKING:
    from collections import OrderedDict

    import numpy as np
    import torch

    State = OrderedDict[str, torch.Tensor]


class AggregationRule(ABC):
    name: ClassVar[str]
    #: Regex of adapter tensor names the local trainer must keep frozen (FFA-LoRA freezes A).
    frozen_pattern: ClassVar[str | None] = None
    #: The payload is the institution's update itself (so client-level DP can clip and noise it as one vector).
    payload_is_update: ClassVar[bool] = True
    #: The payload carries a count computed from the institution's private data (its sum is released): the
    #: record count then leaves, which an add/remove-one DP guarantee does not cover (node policies refuse it).
    payload_carries_counts: ClassVar[bool] = False

    @abstractmethod
    def client_payload(self, local: State, global_: State, weight: float = 1.0) -> np.ndarray: ...

    @abstractmethod
    def finalize(self, total: np.ndarray, num_survivors: int, global_: State) -> State: ...

    def payload_size(self, global_: State) -> int:
        return self.client_payload(global_, global_, 1.0).size


def check_survivors(num_survivors: int) -> None:
    if num_survivors < 1:
        raise ValueError("cannot average over zero survivors; the round must be abandoned instead")


RULES: Registry[type[AggregationRule]] = Registry("aggregation rule", __name__)


def get_rule(name: str) -> AggregationRule:
    return RULES.get(name)()


__all__ = ["RULES", "AggregationRule", "check_survivors", "get_rule"]
