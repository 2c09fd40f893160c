"""Budget: a run stops *before* the round that would exceed it, the ledger intact; client-level DP noise."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from fedse_secure.config import PrivacyConfig, TrainingConfig
from fedse_secure.privacy import (
    BudgetExceededError,
    BudgetGuard,
    LedgerCorruptedError,
    PrivacyLedger,
    client_event,
    epsilon,
    noise_share_std,
    privatize_update,
    project_event,
    train_dp_sgd,
)
from fedse_secure.privacy.dpsgd import IGNORE_INDEX


class _Example:
    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels


def _examples(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(10, 24)
        ids = [rng.randrange(5, 2000) for _ in range(length)]
        cut = rng.randint(3, length - 3)
        out.append(_Example(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


@pytest.fixture(scope="module")
def tiny():
    from fedse_secure.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-llama")


def test_run_stops_before_the_round_that_would_exceed_the_budget(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    training = TrainingConfig(epochs_per_round=1, learning_rate=1e-3, max_steps_per_round=3)
    base = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    buffers = [_examples(n, seed=n) for n in (8, 12, 16, 20)]  # the trajectory buffer grows each round
    events = [project_event(len(b), training, base) for b in buffers]
    after_two, after_three = epsilon(events[:2], base.delta), epsilon(events[:3], base.delta)
    privacy = base.model_copy(update={"epsilon_budget": (after_two + after_three) / 2})

    model = get_peft_model(tiny.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    try:
        ledger = PrivacyLedger(tmp_path / "inst.jsonl")
        guard = BudgetGuard(ledger, privacy, institution="inst")
        trained = []
        with pytest.raises(BudgetExceededError) as info:
            for rnd, examples in enumerate(buffers):
                check = guard.ensure_affordable(project_event(len(examples), training, privacy))
                assert check.affordable and check.spent <= privacy.epsilon_budget
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = train_dp_sgd(model, examples, training, privacy, tiny.tokenizer.pad_token_id, seed=rnd)
                ledger.append(result.event, round=rnd, institution="inst", delta=privacy.delta)
                trained.append(rnd)
                last_trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # The refused round never reached training: the adapter is exactly as round 1 left it.
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.equal(p, last_trained[n]), n
    finally:
        model.unload()

    assert trained == [0, 1]  # round 2 was refused before training
    err = info.value
    message = str(err)
    assert "refused before training" in message and "'inst'" in message
    assert f"remaining {privacy.epsilon_budget - after_two:.4f}" in message
    assert f"would cost {after_three - after_two:.4f}" in message
    assert err.check.spent == pytest.approx(after_two)
    assert err.check.projected_total == pytest.approx(after_three)
    report = ledger.verify()
    assert report.ok and report.entries == 2 and report.sealed_entries == 2
    assert [e.round for e in ledger.entries()] == [0, 1]
    assert epsilon(ledger.events(), privacy.delta) == pytest.approx(after_two)


def test_guard_without_budget_only_reports(tmp_path):
    ledger = PrivacyLedger(tmp_path / "x.jsonl")
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=1.0)
    check = BudgetGuard(ledger, privacy).ensure_affordable(client_event(privacy))
    assert check.budget is None and check.remaining == math.inf and check.projected_total > 0


def test_guard_refuses_to_judge_a_tampered_ledger(tmp_path):
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=2.0, epsilon_budget=100.0)
    ledger = PrivacyLedger(tmp_path / "x.jsonl")
    for r in range(3):
        ledger.append(client_event(privacy), round=r, institution="a", delta=privacy.delta)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:-1]))
    with pytest.raises(LedgerCorruptedError, match="line 3"):
        BudgetGuard(ledger, privacy).ensure_affordable(client_event(privacy))


def test_prv_guard_uses_the_prv_accountant(tmp_path):
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=2.0, accountant="prv", epsilon_budget=50.0)
    check = BudgetGuard(PrivacyLedger(tmp_path / "x.jsonl"), privacy).check(client_event(privacy))
    assert check.projected_total == pytest.approx(epsilon([client_event(privacy)], privacy.delta, "prv"))
    assert check.projected_total < epsilon([client_event(privacy)], privacy.delta, "rdp")


# -- client-level DP ------------------------------------------------------------------------------------------
def test_privatize_update_clips_to_the_bound():
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=0.0, max_grad_norm=2.0)
    update = np.full(100, 1.0)  # norm 10
    out, info = privatize_update(update, privacy, num_clients=5, rng=np.random.default_rng(0))
    assert np.linalg.norm(out) == pytest.approx(2.0)
    assert info.clipped and info.clip_factor == pytest.approx(0.2) and info.original_norm == pytest.approx(10.0)
    small = np.full(4, 0.5)  # norm 1: untouched
    out, info = privatize_update(small, privacy, num_clients=5, rng=np.random.default_rng(0))
    assert np.array_equal(out, small) and not info.clipped
    assert info.event == client_event(privacy, 5)
    assert (info.event.level, info.event.sample_rate, info.event.steps) == ("client", 1.0, 1)


@pytest.mark.parametrize("honest_fraction", [1.0, 0.5])
def test_noise_shares_sum_to_the_central_noise(honest_fraction):
    sigma, c, n = 1.3, 0.7, 6
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=sigma, max_grad_norm=c, honest_fraction=honest_fraction)
    rng = np.random.default_rng(1)
    dim = 200_000
    shares = [privatize_update(np.zeros(dim), privacy, n, rng)[0] for _ in range(n)]
    per_client_std = sigma * c / math.sqrt(n * honest_fraction)
    assert noise_share_std(privacy, n) == pytest.approx(per_client_std)
    assert np.std(shares[0]) == pytest.approx(per_client_std, rel=0.01)
    # If only the assumed-honest fraction of clients add their shares, the sum still carries sigma*C.
    honest = round(n * honest_fraction)
    assert np.std(np.sum(shares[:honest], axis=0)) == pytest.approx(sigma * c, rel=0.01)


def test_client_dp_errors_are_clear():
    privacy = PrivacyConfig(mode="client-dp", honest_fraction=0.1)
    with pytest.raises(ValueError, match="fewer than one honest client"):
        privatize_update(np.zeros(3), privacy, 5, np.random.default_rng())
    with pytest.raises(ValueError, match="mode client-dp"):
        privatize_update(np.zeros(3), PrivacyConfig(mode="dp-sgd"), 5, np.random.default_rng())
    with pytest.raises(ValueError, match="NaN"):
        privatize_update(np.array([np.nan]), PrivacyConfig(mode="client-dp"), 5, np.random.default_rng())
    with pytest.raises(TypeError, match="numpy Generator"):
        privatize_update(np.zeros(3), PrivacyConfig(mode="client-dp"), 5, 0)  # type: ignore[arg-type]


def test_tensor_updates_are_accepted():
    privacy = PrivacyConfig(mode="client-dp", noise_multiplier=0.0, max_grad_norm=1.0)
    out, _ = privatize_update(torch.ones(3, 4).numpy(), privacy, 3, np.random.default_rng(0))
    assert out.shape == (3, 4)
