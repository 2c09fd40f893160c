"""Each aggregation rule against a direct computation, and the payload/finalize round trip under dropouts.

Rules only ever see the *sum* of payloads (that is what secure aggregation releases), so every test forms the
sum itself and checks the finalized adapter against the textbook definition of the rule.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse_secure.aggregation.flat import flatten, unflatten
from fedse_secure.aggregation.rules import RULES, get_rule
from fedse_secure.aggregation.rules.ffa import FfaLora

LAYERS = {"q": (6, 5), "v": (4, 5)}  # name -> (d_out, d_in)
R = 2


def _state(gen: torch.Generator, a_scale=1.0, b_scale=1.0, shared_a=None) -> OrderedDict[str, torch.Tensor]:
    s = OrderedDict()
    for name, (d_out, d_in) in LAYERS.items():
        a_key = f"base_model.model.layers.0.{name}.lora_A.weight"
        s[a_key] = shared_a[a_key].clone() if shared_a is not None else a_scale * torch.randn(R, d_in, generator=gen)
        s[f"base_model.model.layers.0.{name}.lora_B.weight"] = b_scale * torch.randn(d_out, R, generator=gen)
    return OrderedDict(sorted(s.items()))


def _aggregate(rule, locals_, global_, weights=None):
    weights = weights or [1.0] * len(locals_)
    total = sum(rule.client_payload(loc, global_, w) for loc, w in zip(locals_, weights))
    return rule.finalize(total, len(locals_), global_)


@pytest.fixture
def clients():
    gen = torch.Generator().manual_seed(0)
    global_ = _state(gen)
    return global_, [_state(gen) for _ in range(4)]


def test_registry_and_unknown_rule():
    assert set(RULES) == {"fedavg", "weighted", "ffa", "svd"}
    with pytest.raises(ValueError, match="unknown aggregation rule 'median'.*fedavg"):
        get_rule("median")


def test_fedavg_is_elementwise_mean_of_a_and_b(clients):
    global_, locals_ = clients
    out = _aggregate(get_rule("fedavg"), locals_, global_)
    for k in global_:
        expected = torch.stack([loc[k] for loc in locals_]).mean(0)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_weighted_mean(clients):
    global_, locals_ = clients
    w = [1.0, 3.0, 0.5, 7.0]
    out = _aggregate(get_rule("weighted"), locals_, global_, w)
    for k in global_:
        expected = sum(wi * loc[k] for wi, loc in zip(w, locals_)) / sum(w)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="positive finite"):
        get_rule("weighted").client_payload(locals_[0], global_, 0.0)


def test_ffa_keeps_a_and_averages_b():
    gen = torch.Generator().manual_seed(1)
    global_ = _state(gen)
    locals_ = [_state(gen, shared_a=global_) for _ in range(3)]
    rule = get_rule("ffa")
    assert rule.frozen_pattern and all(("lora_A" in k) == bool(__import__("re").search(rule.frozen_pattern, k))
                                       for k in global_)
    out = _aggregate(rule, locals_, global_)
    for k in global_:
        if "lora_A" in k:
            assert torch.equal(out[k], global_[k])
        else:
            torch.testing.assert_close(out[k], torch.stack([loc[k] for loc in locals_]).mean(0), rtol=0, atol=1e-6)
    # With a shared A the mean of B·A is exactly mean(B)·A: the rule is exact on the products too.
    for name in LAYERS:
        a = f"base_model.model.layers.0.{name}.lora_A.weight"
        b = a.replace("lora_A", "lora_B")
        mean_product = torch.stack([loc[b] @ loc[a] for loc in locals_]).mean(0)
        torch.testing.assert_close(out[b] @ out[a], mean_product, rtol=0, atol=1e-5)
    # A client that (wrongly) trained A is refused, naming the fix.
    bad = OrderedDict((k, v + 1 if "lora_A" in k else v) for k, v in locals_[0].items())
    with pytest.raises(ValueError, match="freeze lora_A"):
        FfaLora().client_payload(bad, global_)


def _mean_products(locals_):
    out = {}
    for name in LAYERS:
        a = f"base_model.model.layers.0.{name}.lora_A.weight"
        b = a.replace("lora_A", "lora_B")
        out[name] = torch.stack([loc[b].double() @ loc[a].double() for loc in locals_]).mean(0)
    return out


def test_svd_is_truncated_svd_of_mean_product(clients):
    global_, locals_ = clients
    out = _aggregate(get_rule("svd"), locals_, global_)
    for name, target in _mean_products(locals_).items():
        a = f"base_model.model.layers.0.{name}.lora_A.weight"
        b = a.replace("lora_A", "lora_B")
        assert out[a].shape == global_[a].shape and out[b].shape == global_[b].shape
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :R] * s[:R]) @ vh[:R]
        torch.testing.assert_close(out[b].double() @ out[a].double(), best, rtol=0, atol=1e-5)
        # Eckart-Young: the error is exactly the discarded singular values.
        err = torch.linalg.matrix_norm(out[b].double() @ out[a].double() - target)
        assert abs(float(err) - float(s[R:].norm())) < 1e-5


def test_svd_exact_when_mean_product_has_rank_le_r():
    # Clients that share A have mean product mean(B)·A of rank <= r: svd must reproduce it exactly.
    gen = torch.Generator().manual_seed(2)
    global_ = _state(gen)
    locals_ = [_state(gen, shared_a=global_) for _ in range(3)]
    out = _aggregate(get_rule("svd"), locals_, global_)
    for name, target in _mean_products(locals_).items():
        a = f"base_model.model.layers.0.{name}.lora_A.weight"
        b = a.replace("lora_A", "lora_B")
        torch.testing.assert_close(out[b].double() @ out[a].double(), target, rtol=0, atol=1e-5)


def test_fedavg_product_is_not_mean_product(clients):
    # Documented inexactness: mean(B)·mean(A) != mean(B·A) in general; svd fixes that.
    global_, locals_ = clients
    fed = _aggregate(get_rule("fedavg"), locals_, global_)
    a = "base_model.model.layers.0.q.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    assert not torch.allclose(fed[b].double() @ fed[a].double(), _mean_products(locals_)["q"], atol=1e-3)


@pytest.mark.parametrize("name", ["fedavg", "weighted", "ffa", "svd"])
def test_dropouts_give_mean_over_survivors(name):
    gen = torch.Generator().manual_seed(3)
    global_ = _state(gen)
    shared = global_ if name == "ffa" else None
    locals_ = [_state(gen, shared_a=shared) for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    survivors = [0, 2, 3]  # clients 1 and 4 dropped: their payloads never reach the sum
    rule = get_rule(name)
    total = sum(rule.client_payload(locals_[i], global_, weights[i]) for i in survivors)
    out = rule.finalize(total, len(survivors), global_)
    # Same as aggregating the survivors alone.
    direct = _aggregate(get_rule(name), [locals_[i] for i in survivors], global_, [weights[i] for i in survivors])
    for k in global_:
        torch.testing.assert_close(out[k], direct[k], rtol=0, atol=1e-6)
    if name == "fedavg":
        for k in global_:
            torch.testing.assert_close(out[k], torch.stack([locals_[i][k] for i in survivors]).mean(0), rtol=0, atol=1e-6)


def test_full_participation_of_identical_clients_is_identity(clients):
    global_, locals_ = clients
    for name in ("fedavg", "weighted", "svd"):
        out = _aggregate(get_rule(name), [locals_[0]] * 3, global_)
        if name == "svd":
            for n in LAYERS:
                a = f"base_model.model.layers.0.{n}.lora_A.weight"
                b = a.replace("lora_A", "lora_B")
                torch.testing.assert_close(out[b] @ out[a], locals_[0][b] @ locals_[0][a], rtol=0, atol=1e-5)
        else:
            for k in global_:
                torch.testing.assert_close(out[k], locals_[0][k], rtol=0, atol=1e-6)


def test_payload_sizes_and_errors(clients):
    global_, _ = clients
    n = sum(v.numel() for v in global_.values())
    assert get_rule("fedavg").payload_size(global_) == n
    assert get_rule("weighted").payload_size(global_) == n + 1
    assert get_rule("ffa").payload_size(global_) == sum(v.numel() for k, v in global_.items() if "lora_B" in k)
    assert get_rule("svd").payload_size(global_) == sum(d_out * d_in for d_out, d_in in LAYERS.values())
    with pytest.raises(ValueError, match="zero survivors"):
        get_rule("fedavg").finalize(np.zeros(n), 0, global_)
    with pytest.raises(ValueError, match="sum of aggregation weights"):
        get_rule("weighted").finalize(np.zeros(n + 1), 2, global_)
    with pytest.raises(ValueError, match="svd payload has"):
        get_rule("svd").finalize(np.zeros(3), 2, global_)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4), st.integers(0, 2**16))
def test_flatten_unflatten_round_trip(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict((f"t{i}", torch.randn(*s, generator=gen)) for i, s in enumerate(shapes))
    vec, spec = flatten(state)
    back = unflatten(vec, spec)
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k])
    with pytest.raises(ValueError, match="values, the adapter needs"):
        unflatten(np.zeros(vec.size + 1), spec)


def test_weighted_payload_stays_inside_the_secure_aggregation_clip_range(clients):
    """Raw counts (e.g. 40 successful trajectories) must not be clipped by secagg's ±8 range."""
    from fedse_secure.secagg.backends.masking import MaskingBackend
    from fedse_secure.secagg.driver import aggregate
    from fedse_secure.secagg.masking import MaskingSettings

    global_, locals_ = clients
    locals_ = locals_[:3]
    weights = [40.0, 3.0, 17.0]
    rule = get_rule("weighted")
    payloads = {f"c{i}": rule.client_payload(l, global_, w) for i, (l, w) in enumerate(zip(locals_, weights))}
    assert max(float(np.abs(p).max()) for p in payloads.values()) < 8.0
    agg = aggregate(MaskingBackend(MaskingSettings(on_out_of_range="refuse")), 1, payloads, seed=0)
    out = rule.finalize(agg.total, len(agg.survivors), global_)
    expected = {k: global_[k] + sum(w * (l[k] - global_[k]) for l, w in zip(locals_, weights)) / sum(weights)
                for k in global_}
    for k in global_:
        assert torch.allclose(out[k], expected[k], atol=1e-5), k
    with pytest.raises(ValueError, match="max_weight"):
        rule.client_payload(locals_[0], global_, 5000.0)
