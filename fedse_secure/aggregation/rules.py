"""Aggregation rules expressed over *sums*, so that they run unchanged under secure aggregation.

Each rule has two halves:

* ``client_payload(local, global_, weight)``: what one institution contributes, as one flat float vector;
* ``finalize(total, num_survivors, global_)``: the new global adapter, computed from the *sum* of payloads
  only (the coordinator never sees an individual payload).

Which rules are exact:

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
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import OrderedDict

import numpy as np
import torch

from fedse_secure.aggregation.adapter_state import FlatSpec, flatten, state_delta, unflatten

State = "OrderedDict[str, torch.Tensor]"


class AggregationRule(ABC):
    name: str
    exact: bool
    #: Regex of adapter tensor names the local trainer must keep frozen (FFA-LoRA freezes A).
    frozen_pattern: str | None = None

    @abstractmethod
    def client_payload(self, local: State, global_: State, weight: float = 1.0) -> np.ndarray: ...

    @abstractmethod
    def finalize(self, total: np.ndarray, num_survivors: int, global_: State) -> State: ...

    def payload_size(self, global_: State) -> int:
        return self.client_payload(global_, global_, 1.0).size


def _check_survivors(num_survivors: int) -> None:
    if num_survivors < 1:
        raise ValueError("cannot average over zero survivors; the round must be abandoned instead")


class FedAvg(AggregationRule):
    name = "fedavg"
    exact = True

    def client_payload(self, local, global_, weight=1.0):
        return flatten(state_delta(local, global_))[0]

    def finalize(self, total, num_survivors, global_):
        _check_survivors(num_survivors)
        mean_delta = unflatten(total / num_survivors, FlatSpec.of(global_))
        return OrderedDict((k, global_[k] + mean_delta[k]) for k in global_)


class WeightedAvg(AggregationRule):
    name = "weighted"
    exact = True
    #: Weights are divided by this before they enter the payload: secure aggregation clips every value to its
    #: clip range (8 by default), and a raw count such as 20 trajectories would be clipped, corrupting the mean.
    #: The mean is invariant to a common scale, so nothing else changes.
    max_weight: float = 1024.0

    def client_payload(self, local, global_, weight=1.0):
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"aggregation weight must be a positive finite number, got {weight}")
        if weight > self.max_weight:
            raise ValueError(f"aggregation weight {weight} exceeds max_weight {self.max_weight}; raise max_weight")
        scaled = weight / self.max_weight
        delta = flatten(state_delta(local, global_))[0]
        # The weight rides along as the last element so its sum is recovered from the same secure sum.
        return np.concatenate([scaled * delta, [scaled]])

    def finalize(self, total, num_survivors, global_):
        total_weight = float(total[-1])
        if total_weight <= 0:
            raise ValueError(f"sum of aggregation weights is {total_weight}; cannot form a weighted mean")
        mean_delta = unflatten(total[:-1] / total_weight, FlatSpec.of(global_))
        return OrderedDict((k, global_[k] + mean_delta[k]) for k in global_)


def _is_lora_a(name: str) -> bool:
    return ".lora_A." in name or name.endswith("lora_A.weight")


class FfaLora(AggregationRule):
    name = "ffa"
    exact = True
    frozen_pattern = r"lora_A"

    def client_payload(self, local, global_, weight=1.0):
        for k in local:
            if _is_lora_a(k) and not torch.equal(local[k], global_[k]):
                raise ValueError(f"FFA-LoRA keeps A frozen, but {k} changed; freeze lora_A in local training")
        b_only = OrderedDict((k, local[k] - global_[k]) for k in local if not _is_lora_a(k))
        return flatten(b_only)[0]

    def finalize(self, total, num_survivors, global_):
        _check_survivors(num_survivors)
        b_keys = OrderedDict((k, v) for k, v in global_.items() if not _is_lora_a(k))
        mean_delta = unflatten(total / num_survivors, FlatSpec.of(b_keys))
        return OrderedDict((k, global_[k] + mean_delta[k]) if k in mean_delta else (k, global_[k]) for k in global_)


_A_KEY = re.compile(r"^(?P<prefix>.*)\.lora_A(?P<suffix>.*)$")


def _lora_pairs(state: State) -> list[tuple[str, str]]:
    pairs = []
    for k in state:
        m = _A_KEY.match(k)
        if m:
            b = f"{m['prefix']}.lora_B{m['suffix']}"
            if b not in state:
                raise ValueError(f"adapter has {k} but no matching {b}")
            pairs.append((k, b))
    if not pairs:
        raise ValueError("adapter state has no lora_A/lora_B pairs; the svd rule needs a LoRA adapter")
    return pairs


class SvdProduct(AggregationRule):
    name = "svd"
    exact = True

    def client_payload(self, local, global_, weight=1.0):
        parts = []
        for a, b in _lora_pairs(global_):
            product_delta = local[b].double() @ local[a].double() - global_[b].double() @ global_[a].double()
            parts.append(product_delta.reshape(-1))
        return torch.cat(parts).numpy()

    def finalize(self, total, num_survivors, global_):
        _check_survivors(num_survivors)
        pairs = _lora_pairs(global_)
        expected = sum(global_[b].shape[0] * global_[a].shape[1] for a, b in pairs)
        if total.size != expected:
            raise ValueError(f"svd payload has {total.size} values, expected {expected}; were all payloads made by "
                             "the svd rule for this adapter?")
        out = OrderedDict(global_)
        offset = 0
        for a, b in pairs:
            rank, d_in = global_[a].shape
            d_out = global_[b].shape[0]
            n = d_out * d_in
            mean_delta = torch.from_numpy(total[offset : offset + n] / num_survivors).reshape(d_out, d_in)
            offset += n
            product = global_[b].double() @ global_[a].double() + mean_delta
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            root = s[:rank].sqrt()
            out[b] = (u[:, :rank] * root).to(torch.float32)
            out[a] = (root[:, None] * vh[:rank]).to(torch.float32)
        return out


RULES: dict[str, type[AggregationRule]] = {r.name: r for r in (FedAvg, WeightedAvg, FfaLora, SvdProduct)}


def get_rule(name: str) -> AggregationRule:
    try:
        return RULES[name]()
    except KeyError:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(RULES)}") from None
