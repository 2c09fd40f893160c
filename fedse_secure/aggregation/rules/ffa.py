"""``ffa``: FFA-LoRA, A frozen at its shared initialisation and B averaged (exact: mean(B_k)·A = mean(B_k·A))."""

from __future__ import annotations

from collections import OrderedDict

from fedse_secure.aggregation.rules import RULES, AggregationRule, check_survivors


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name or name.endswith("lora_A.weight")


@RULES.register("ffa")
class FfaLora(AggregationRule):
    name = "ffa"
    frozen_pattern = r"lora_A"

    def client_payload(self, local, global_, weight=1.0):
        import torch

        from fedse_secure.aggregation.flat import flatten

        for k in local:
            if is_lora_a(k) and not torch.equal(local[k], global_[k]):
                raise ValueError(f"FFA-LoRA keeps A frozen, but {k} changed; freeze lora_A in local training")
        b_only = OrderedDict((k, local[k] - global_[k]) for k in local if not is_lora_a(k))
        return flatten(b_only)[0]

    def finalize(self, total, num_survivors, global_):
        from fedse_secure.aggregation.flat import FlatSpec, unflatten

        check_survivors(num_survivors)
        b_keys = OrderedDict((k, v) for k, v in global_.items() if not is_lora_a(k))
        mean_delta = unflatten(total / num_survivors, FlatSpec.of(b_keys))
        return OrderedDict((k, global_[k] + mean_delta[k]) if k in mean_delta else (k, global_[k]) for k in global_)
