"""``weighted``: element-wise mean of A and B weighted by each institution's number of successful
trajectories (the paper's ablation); the weights travel inside the securely summed vector."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fedse_secure.aggregation.rules import RULES, AggregationRule


@RULES.register("weighted")
class WeightedAvg(AggregationRule):
    name = "weighted"
    # The payload is the scaled update with the weight appended, not the update: client-level DP cannot clip it.
    payload_is_update = False
    payload_carries_counts = True
    #: Weights are divided by this before they enter the payload: secure aggregation clips every value to its
    #: clip range (8 by default), and a raw count such as 20 trajectories would be clipped, corrupting the mean.
    #: The mean is invariant to a common scale, so nothing else changes.
    max_weight: float = 1024.0

    def client_payload(self, local, global_, weight=1.0):
        from fedse_secure.aggregation.flat import flatten, state_delta

        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"aggregation weight must be a positive finite number, got {weight}")
        if weight > self.max_weight:
            raise ValueError(f"aggregation weight {weight} exceeds max_weight {self.max_weight}; raise max_weight")
        scaled = weight / self.max_weight
        delta = flatten(state_delta(local, global_))[0]
        # The weight rides along as the last element so its sum is recovered from the same secure sum.
        return np.concatenate([scaled * delta, [scaled]])

    def finalize(self, total, num_survivors, global_):
        from fedse_secure.aggregation.flat import FlatSpec, unflatten

        total_weight = float(total[-1])
        if total_weight <= 0:
            raise ValueError(f"sum of aggregation weights is {total_weight}; cannot form a weighted mean")
        mean_delta = unflatten(total[:-1] / total_weight, FlatSpec.of(global_))
        return OrderedDict((k, global_[k] + mean_delta[k]) for k in global_)
