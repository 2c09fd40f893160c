"""``svd``: the mean of the products B_k A_k (the true mean update), re-factorised to rank r by truncated SVD
(the best rank-r approximation, Eckart-Young); the payload is d_out x d_in per layer, not r(d_in + d_out)."""

from __future__ import annotations

import re
from collections import OrderedDict

from fedse_secure.aggregation.rules import RULES, AggregationRule, check_survivors

_A_KEY = re.compile(r"^(?P<prefix>.*)\.lora_A(?P<suffix>.*)$")


def _lora_pairs(state: dict) -> list[tuple[str, str]]:
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


@RULES.register("svd")
class SvdProduct(AggregationRule):
    name = "svd"
    # The payload is d_out x d_in products per layer, not the adapter update: client-level DP cannot clip it.
    payload_is_update = False

    def client_payload(self, local, global_, weight=1.0):
        import torch

        parts = []
        for a, b in _lora_pairs(global_):
            product_delta = local[b].double() @ local[a].double() - global_[b].double() @ global_[a].double()
            parts.append(product_delta.reshape(-1))
        return torch.cat(parts).numpy()

    def finalize(self, total, num_survivors, global_):
        import torch

        check_survivors(num_survivors)
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
