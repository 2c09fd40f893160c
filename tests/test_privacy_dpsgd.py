"""DP-SGD with Opacus on the tiny Llama + LoRA: per-sample gradients, clipping, empty batches, clean unwrap."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedse_secure.agent.sft import collate_examples, encode_trajectory
from fedse_secure.envs.trajectory import Trajectory
from fedse_secure.config import PrivacyConfig, TrainingConfig
from fedse_secure.privacy import (
    DpEvent,
    DPTrainingError,
    per_sequence_loss,
    planned_steps,
    project_event,
    sample_rate,
    train_dp_sgd,
)
from fedse_secure.privacy.dpsgd import wrap_for_per_sample_grads


@pytest.fixture(scope="module")
def tiny():
    from fedse_secure.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-llama")


def _peft(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    # peft initialises lora_B to zero, so the lora_A gradients would all be zero; randomise B so every LoRA
    # tensor has a non-trivial per-sample gradient to compare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


@pytest.fixture()
def peft_model(tiny):
    model = _peft(tiny)
    yield model
    model.unload()  # give the shared base model back without LoRA layers


def _examples(tokenizer, n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["north", "south", "east", "west", "door", "key", "open", "take", "look", "room"]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are an agent in a maze."}]
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 9)))})
            messages.append({"role": "assistant",
                             "content": f"Thought: {' '.join(rng.choices(words, k=3))}\nAction: go {rng.choice(words)}"})
        traj = Trajectory(env="maze", task_id=i, messages=messages, reward=1.0, success=True)
        out.append(encode_trajectory(tokenizer, traj, max_seq_len=256))
    return out


def _lora(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_per_sequence_loss_equals_the_full_logits_loss(tiny, peft_model):
    """The loss applies the (frozen) LM head to labelled positions only; it must equal the loss from all logits."""
    import torch.nn.functional as F

    from fedse_secure.agent.sft import decoder_and_head

    assert decoder_and_head(peft_model) is not None  # the gathered path is the one under test
    ids, mask, labels = collate_examples(_examples(tiny.tokenizer, 4, seed=1), tiny.tokenizer.pad_token_id)
    logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="none").view(labels[:, 1:].shape)
    expected = tok.sum(1) / (labels[:, 1:] != -100).sum(1)
    torch.testing.assert_close(per_sequence_loss(peft_model, ids, mask, labels, reduction="none"), expected,
                               rtol=1e-5, atol=1e-6)


def test_per_sample_lora_gradients_match_autograd(tiny, peft_model):
    examples = _examples(tiny.tokenizer, 5)
    assert len({len(e.input_ids) for e in examples}) > 1, "want different lengths so that padding is exercised"
    ids, mask, labels = collate_examples(examples, tiny.tokenizer.pad_token_id)
    params = _lora(peft_model)
    assert params and all("lora_" in n for n in params)

    expected = {n: [] for n in params}
    for e in examples:
        i, m, l = collate_examples([e], tiny.tokenizer.pad_token_id)
        peft_model.zero_grad(set_to_none=True)
        per_sequence_loss(peft_model, i, m, l).backward()
        for n, p in params.items():
            expected[n].append(p.grad.detach().clone())
    peft_model.zero_grad(set_to_none=True)

    gsm = wrap_for_per_sample_grads(peft_model)
    try:
        with pytest.warns(UserWarning, match="Full backward hook"):  # frozen embedding; expected (deps.md §3b)
            per_sequence_loss(gsm, ids, mask, labels).backward()
        worst = 0.0
        for n, p in params.items():
            want = torch.stack(expected[n])
            got = p.grad_sample
            assert got.shape == want.shape, n
            assert want.abs().max() > 0, f"{n}: zero gradient, the comparison would be vacuous"
            rel = ((got - want).norm() / want.norm()).item()
            worst = max(worst, rel)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{n}: per-sample gradient mismatch")
        assert worst < 1e-4
    finally:
        gsm.to_standard_module()
        peft_model.zero_grad(set_to_none=True)


def test_projection_and_sample_rate():
    training = TrainingConfig(epochs_per_round=2, max_steps_per_round=None)
    privacy = PrivacyConfig(mode="dp-sgd", expected_batch_size=4, noise_multiplier=1.1, max_grad_norm=0.5)
    assert sample_rate(10, privacy) == pytest.approx(0.4)
    assert planned_steps(10, training, privacy) == 5  # round(2 / 0.4)
    ev = project_event(10, training, privacy)
    assert ev == DpEvent("subsampled_gaussian", "record", 1.1, 0.4, 5, 0.5, population=10)
    # Fewer records than the expected batch: every record in every step, no amplification.
    ev = project_event(3, training, privacy)
    assert ev.sample_rate == 1.0 and ev.mechanism == "gaussian" and ev.steps == 2
    capped = TrainingConfig(epochs_per_round=2, max_steps_per_round=3)
    assert project_event(100, capped, privacy).steps == 3
    assert project_event(100, TrainingConfig(epochs_per_round=0), privacy).steps == 0
    with pytest.raises(ValueError, match="mode is 'none'"):
        project_event(10, training, PrivacyConfig())
    client = project_event(10, training, PrivacyConfig(mode="client-dp", noise_multiplier=0.8))
    assert (client.level, client.sample_rate, client.steps) == ("client", 1.0, 1)


def test_train_dp_sgd_matches_projection_and_unwraps(tiny, peft_model):
    examples = _examples(tiny.tokenizer, 12, seed=1)
    training = TrainingConfig(epochs_per_round=1, learning_rate=1e-3, lr_schedule="cosine")
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in _lora(peft_model).items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in peft_model.modules())

    with pytest.warns(UserWarning, match="noise derived from the seed"):
        result = train_dp_sgd(peft_model, examples, training, privacy, tiny.tokenizer.pad_token_id, seed=3,
                              reproducible_noise=True)

    assert result.event == project_event(len(examples), training, privacy)
    assert result.steps == result.event.steps == 3 and len(result.losses) == 3
    assert result.sample_rate == pytest.approx(4 / 12)
    assert result.round_epsilon > 0 and math.isfinite(result.round_epsilon)
    # Only LoRA moved; the base model is untouched.
    assert any(not torch.equal(p, lora_before[n]) for n, p in _lora(peft_model).items())
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    # A normal peft model again: no Opacus hooks or per-sample attributes, and it saves.
    from peft import PeftModel

    assert isinstance(peft_model, PeftModel)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in peft_model.modules()) == hooks_before
    for p in peft_model.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_processed"):
            assert not hasattr(p, attr)
        assert p.grad is None
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_reproducible_noise_is_deterministic_and_default_is_not(tiny):
    examples = _examples(tiny.tokenizer, 4, seed=2)  # q = 1: one step, all randomness is in the noise
    training = TrainingConfig(epochs_per_round=1, learning_rate=1e-2)
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, expected_batch_size=4)

    def run(reproducible: bool):
        model = _peft(tiny)
        try:
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                train_dp_sgd(model, examples, training, privacy, tiny.tokenizer.pad_token_id, seed=5,
                             reproducible_noise=reproducible)
            return torch.cat([p.detach().flatten() for p in _lora(model).values()])
        finally:
            model.unload()

    assert torch.equal(run(True), run(True))
    assert not torch.equal(run(False), run(False))


def test_clipping_is_applied_per_sample(tiny, peft_model, monkeypatch):
    """With q=1, no noise and plain SGD, one step must move the LoRA params by -lr * mean_i clip_C(g_i)."""
    examples = _examples(tiny.tokenizer, 4, seed=3)
    pad = tiny.tokenizer.pad_token_id
    params = _lora(peft_model)
    per_sample = []
    for e in examples:
        peft_model.zero_grad(set_to_none=True)
        per_sequence_loss(peft_model, *collate_examples([e], pad)).backward()
        per_sample.append({n: p.grad.detach().clone() for n, p in params.items()})
    peft_model.zero_grad(set_to_none=True)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in d.values())) for d in per_sample]
    clip = min(norms) / 4  # every record is clipped, by different factors
    expected_step = {n: sum(d[n] * min(1.0, clip / (norm + 1e-6)) for d, norm in zip(per_sample, norms)) / len(examples)
                     for n in params}
    before = {n: p.detach().clone() for n, p in params.items()}

    lr = 0.5
    monkeypatch.setattr(torch.optim, "AdamW", lambda ps, lr, weight_decay: torch.optim.SGD(ps, lr=lr))
    training = TrainingConfig(epochs_per_round=1, learning_rate=lr, lr_schedule="constant")
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4)
    result = train_dp_sgd(peft_model, examples, training, privacy, pad, seed=0)
    assert result.steps == 1 and result.batch_sizes == [4]
    for n, p in params.items():
        torch.testing.assert_close(before[n] - p.detach(), lr * expected_step[n], rtol=1e-3, atol=1e-7)
    # The unclipped mean would have been far larger: clipping really happened.
    unclipped = sum(float(sum(d[n] for d in per_sample).norm()) for n in params)
    clipped = sum(float(expected_step[n].norm()) * len(examples) for n in params)
    assert clipped < unclipped / 2


def test_empty_poisson_batches_become_noise_only_steps(tiny, peft_model):
    examples = _examples(tiny.tokenizer, 10, seed=4)
    training = TrainingConfig(epochs_per_round=1, learning_rate=1e-3)
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, expected_batch_size=1)  # q = 0.1, 10 steps
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_dp_sgd(peft_model, examples, training, privacy, tiny.tokenizer.pad_token_id, seed=0,
                              reproducible_noise=True)
    assert result.steps == 10
    assert result.empty_batches >= 1, result.batch_sizes  # seed 0 draws empty batches
    assert sum(math.isnan(x) for x in result.losses) == result.empty_batches
    assert result.batch_sizes.count(0) == result.empty_batches


def test_errors_are_clear(tiny, peft_model):
    training = TrainingConfig()
    with pytest.raises(DPTrainingError, match="no training examples"):
        train_dp_sgd(peft_model, [], training, PrivacyConfig(mode="dp-sgd"), 0, seed=0)
    with pytest.raises(ValueError, match="needs privacy.mode dp-sgd"):
        train_dp_sgd(peft_model, _examples(tiny.tokenizer, 2), training, PrivacyConfig(), 0, seed=0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(DPTrainingError, match="no trainable parameters"):
        train_dp_sgd(frozen, _examples(tiny.tokenizer, 2), training, PrivacyConfig(mode="dp-sgd"), 0, seed=0)
    with pytest.raises(DPTrainingError, match="LoRA adapters only"):
        train_dp_sgd(torch.nn.Linear(2, 2), _examples(tiny.tokenizer, 2), training, PrivacyConfig(mode="dp-sgd"), 0,
                     seed=0)
