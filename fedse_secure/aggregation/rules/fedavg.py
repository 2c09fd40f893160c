"""``fedavg``: the paper's unweighted element-wise mean of A and of B (FedIT / Fed-SE)."""

from __future__ import annotations

from collections import OrderedDict

from fedse_secure.aggregation.rules import RULES, AggregationRule, check_survivors


@RULES.register("fedavg")
class FedAvg(AggregationRule):
    name = "fedavg"

    def client_payload(self, local, global_, weight=1.0):
        from fedse_secure.aggregation.flat import flatten, state_delta

        return flatten(state_delta(local, global_))[0]

    def finalize(self, total, num_survivors, global_):
        from fedse_secure.aggregation.flat import FlatSpec, unflatten

        check_survivors(num_survivors)
        mean_delta = unflatten(total / num_survivors, FlatSpec.of(global_))
        return OrderedDict((k, global_[k] + mean_delta[k]) for k in global_)
