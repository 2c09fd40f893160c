"""Record-level DP-SGD for the local LoRA fine-tuning, with Opacus (one trajectory = one privacy record).

We assemble the three objects that ``PrivacyEngine.make_private`` would build — a hooks-mode
``GradSampleModule``, a ``DPOptimizer`` and a Poisson sampler, with the accountant's step hook attached — instead
of calling ``make_private`` itself, because ``make_private`` derives the sample rate as ``1 / len(data_loader)``,
which differs from the intended ``q = expected_batch_size / num_records`` whenever the batch size does not divide
the data set (and the accountant would then be told a different rate than the sampler uses; see Opacus #813).
Here one value of ``q`` feeds the sampler, the optimiser's normaliser and the accountant, and training checks
afterwards that the accountant recorded exactly the projected event.

Pitfalls handled (known problems of Opacus with Hugging Face models):

* ``grad_sample_mode="hooks"`` — ghost clipping with HF's internal loss silently skips clipping. We compute the
  loss ourselves, as a per-sequence token mean averaged over the batch: HF's batch-wide token mean would make
  each record's gradient depend on the other records' lengths, so removing one record would change every
  other clipped term too, which breaks the sensitivity argument behind the noise.
* Empty Poisson batches (probability (1-q)^N) crash the Llama forward; they become noise-only steps, which the
  accountant still counts (skipping them would change the mechanism).
* Before every noisy step we check that every trainable parameter holds a per-sample gradient for exactly the
  sampled batch, and after it that the accountant counted the step: clipping cannot be skipped silently.
* Devices (opacus#820, where LoRA updates were silently corrupted when adapters and base layers sat on
  different devices): every parameter must be on one device, batches and noise go there, and after training
  the LoRA weights must be finite and must have moved whenever a step saw data or added noise.
* Memory: a Poisson batch may be processed in ``training.micro_batch_size`` passes: each pass's per-sample
  gradients are clipped and summed (Opacus's skip-step accumulation, as its ``BatchMemoryManager``), and the
  noise is added once per logical step, so the mechanism and the accounting are those of the whole batch.
  Gradient checkpointing is refused: Opacus's hooks miss the layers it recomputes.

Afterwards the model is the same peft model object, without Opacus hooks or per-sample attributes, ready to be
saved or aggregated.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedse_secure.config import PrivacyConfig, TrainingConfig
from fedse_secure.errors import FedseError
from fedse_secure.memory import release_freed_memory
from fedse_secure.privacy.events import DpEvent

IGNORE_INDEX = -100
# Attributes Opacus (GradSampleModule and DPOptimizer) attaches to parameters; removed after training.
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad",
                       "_processed")


class EncodedExampleLike(Protocol):
    input_ids: list[int]
    labels: list[int]


class DPTrainingError(FedseError, RuntimeError):
    """DP-SGD could not run as configured, or a DP invariant was violated; the message says which and how to fix."""


@dataclass
class DPTrainResult:
    steps: int
    # Training loss per step on private data (NaN for noise-only steps). Not differentially private: keep it at
    # the institution (logs), never send it to the coordinator.
    losses: list[float]
    sample_rate: float
    expected_batch_size: int
    batch_sizes: list[int]
    empty_batches: int
    event: DpEvent
    # ε of this round alone from the Opacus accountant attached to the optimiser (composition across rounds is
    # done from the ledger).
    round_epsilon: float
    delta: float
    accountant: str
    reproducible_noise: bool
    learning_rates: list[float] = field(default_factory=list)

    @property
    def mean_loss(self) -> float | None:
        """Mean loss over the steps that saw data (noise-only steps have no loss); None if there were none."""
        seen = [x for x in self.losses if not math.isnan(x)]
        return sum(seen) / len(seen) if seen else None


def sample_rate(num_records: int, privacy: PrivacyConfig) -> float:
    """Poisson sample rate q = expected_batch_size / num_records, capped at 1 (every record in every step)."""
    if num_records < 1:
        raise ValueError(f"num_records={num_records}: DP-SGD needs at least one record")
    return min(1.0, privacy.expected_batch_size / num_records)


def planned_steps(num_records: int, training: TrainingConfig, privacy: PrivacyConfig) -> int:
    """round(epochs_per_round / q), capped by training.max_steps_per_round (at least 1 if any epoch is planned)."""
    if training.epochs_per_round == 0:
        return 0
    q = sample_rate(num_records, privacy)
    steps = max(1, round(training.epochs_per_round / q))
    if training.max_steps_per_round is not None:
        steps = min(steps, training.max_steps_per_round)
    return steps


def dp_sgd_event(num_records: int, training: TrainingConfig, privacy: PrivacyConfig) -> DpEvent:
    """The record-level event of one round of DP-SGD on ``num_records`` trajectories (before it runs)."""
    q = sample_rate(num_records, privacy)
    return DpEvent(
        mechanism="gaussian" if q == 1.0 else "subsampled_gaussian",
        level="record",
        noise_multiplier=float(privacy.noise_multiplier),
        sample_rate=q,
        steps=planned_steps(num_records, training, privacy),
        clipping_bound=float(privacy.max_grad_norm),
        population=num_records,
        neighbouring=privacy.neighbouring,
    )


def collate(examples: Sequence[EncodedExampleLike], pad_token_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors, exactly as the non-DP SFT path builds them."""
    from fedse_secure.agent.sft import collate_examples

    return collate_examples(list(examples), pad_token_id)


def per_sequence_loss(model, input_ids, attention_mask, labels, reduction: str = "mean"):
    """Causal-LM loss: token mean within each sequence (labelled tokens only), then ``mean`` over the batch
    (or ``none``: one value per sequence). A sequence without labelled tokens contributes 0."""
    import torch
    import torch.nn.functional as F

    from fedse_secure.agent.sft import decoder_and_head

    shift_labels = labels[:, 1:]
    parts = decoder_and_head(model)
    if parts is not None and not any(p.requires_grad for p in parts[1].parameters()):
        # The LM head only at the labelled positions (most of the step's cost over a 49k vocabulary otherwise).
        # Only with a frozen head: Opacus's per-sample hooks on a trainable head would see the gathered rows,
        # not one row per sequence. The decoder's hooks still see [batch, time, ...] activations.
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
        picked = shift_labels != IGNORE_INDEX
        tok = hidden.new_zeros(shift_labels.shape, dtype=torch.float32)
        tok[picked] = F.cross_entropy(head(hidden[picked]).float(), shift_labels[picked], reduction="none")
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        shift_logits = logits[:, :-1, :]
        tok = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    per_seq = tok.sum(dim=1) / counts
    return per_seq if reduction == "none" else per_seq.mean()


def wrap_for_per_sample_grads(model):
    """The Opacus wrapper DP-SGD trains through: hooks mode, batch first, per-sample grads of a *mean* loss.

    ``strict=False``: frozen modules (embeddings, norms) need no grad sampler; trainable modules get per-sample
    gradients from the hooks (or functorch where Opacus has no sampler), as checked by ``ModuleValidator``.
    """
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _generator(seed: int | None, device=None):
    import torch

    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


def _check_lora_update(before, params, *, moved_expected: bool) -> None:
    """The LoRA-update sanity check (opacus#820): every adapter weight finite, and some moved when they should."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise DPTrainingError("DP-SGD left non-finite LoRA weights (an overflow in the model's dtype); do not "
                              "release this adapter; use model.dtype float32 or a lower learning rate")
    if moved_expected and all(torch.equal(b, p.detach()) for b, p in zip(before, params)):
        raise DPTrainingError(f"DP-SGD ran steps with data or noise but no LoRA weight changed on {params[0].device}; "
                              "the update was lost (opacus#820); do not release this adapter")


def _secure_poisson_batches(secure, n: int, q: float, steps: int):
    """Poisson-sampled batches (each record in each step independently with probability q), like Opacus's
    ``UniformWithReplacementSampler``, drawn from the secure generator."""
    for _ in range(steps):
        yield [int(i) for i in secure.poisson_mask(n, q).nonzero()[0]]


def _secure_noise_optimizer():
    """Opacus's DPOptimizer with its Gaussian noise drawn from :class:`SecureRandom` (secure-mode form)."""
    import torch
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SecureNoiseDPOptimizer(DPOptimizer):
        secure_random = None

        def add_noise(self):
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = torch.from_numpy(self.secure_random.normal(std, tuple(p.summed_grad.shape)))
                p.grad = (p.summed_grad + noise.to(dtype=p.summed_grad.dtype, device=p.summed_grad.device)
                          ).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecureNoiseDPOptimizer


def train_dp_sgd(
    model,
    examples: Sequence[EncodedExampleLike],
    training: TrainingConfig,
    privacy: PrivacyConfig,
    pad_token_id: int,
    seed: int,
    *,
    reproducible_noise: bool = False,
) -> DPTrainResult:
    """Train the trainable (LoRA) parameters of the peft ``model`` in place with DP-SGD; return what happened.

    ``seed`` seeds everything that is not a privacy mechanism (e.g. LoRA dropout). The Poisson sampling and the
    Gaussian noise come from a cryptographically secure generator keyed from OS entropy
    (:class:`~fedse_secure.privacy.noise.SecureRandom`, with Opacus's secure-mode noise), because anyone who can
    regenerate the noise can subtract it; pass ``reproducible_noise=True`` (tests, debugging only) to derive
    them from ``seed`` with torch's generator instead.
    """
    import torch
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator
    from torch.optim.lr_scheduler import LambdaLR

    from fedse_secure.agent.sft import lr_lambda

    if privacy.mode != "dp-sgd":
        raise ValueError(f"train_dp_sgd needs privacy.mode dp-sgd, got {privacy.mode!r}")
    n = len(examples)
    if n == 0:
        raise DPTrainingError("no training examples this round; skip training (no privacy is spent) instead of "
                              "calling train_dp_sgd")
    event = dp_sgd_event(n, training, privacy)
    q, steps = event.sample_rate, event.steps
    expected_batch = max(1, round(q * n))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise DPTrainingError("the model has no trainable parameters; wrap it with peft.get_peft_model first")
    not_lora = [name for name, _ in named if "lora_" not in name]
    if not_lora:
        # Per-sample gradients of a full model cost batch x model size in memory, and the federation only
        # aggregates adapters: training anything else would be a configuration mistake.
        raise DPTrainingError(
            f"train_dp_sgd trains LoRA adapters only, but {len(not_lora)} other parameters are trainable "
            f"(e.g. {not_lora[:3]}); wrap the model with peft.get_peft_model or freeze them"
        )
    params = [p for _, p in named]
    if getattr(model, "is_gradient_checkpointing", False):
        raise DPTrainingError("gradient checkpointing is on, and Opacus's per-sample hooks miss the layers it "
                              "recomputes; set training.gradient_checkpointing: false (training.micro_batch_size "
                              "cuts memory instead)")
    if getattr(model, "dtype", None) == torch.float16:
        raise DPTrainingError("DP-SGD on a float16 model would need loss scaling inside the per-sample clipping; use "
                              "model.dtype bfloat16 or float32")
    from fedse_secure.models.device import check_single_device

    check_single_device(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPTrainingError(f"Opacus cannot compute per-sample gradients for this model: {errors}")
    # Opacus's accountant here only counts the noisy steps through the optimiser's hook (its history is checked
    # against the projected event below); what the round costs comes from the configured accountant.
    step_counter = create_accountant("rdp")
    result = DPTrainResult(
        steps=0, losses=[], sample_rate=q, expected_batch_size=expected_batch, batch_sizes=[], empty_batches=0,
        event=event, round_epsilon=0.0, delta=privacy.delta, accountant=privacy.accountant,
        reproducible_noise=reproducible_noise,
    )
    if steps == 0:
        return result
    if reproducible_noise:
        warnings.warn("DP-SGD noise derived from the seed: anyone who knows the seed can remove it; "
                      "use only for tests", stacklevel=2)
    if reproducible_noise:
        sample_gen = _generator(seed * 2 + 1)
        # The noise is drawn on the parameters' device (Opacus samples it like the gradient it is added to).
        noise_gen = _generator(seed * 2 + 2, device=params[0].device)
        secure = None
    else:
        from fedse_secure.privacy.noise import SecureRandom

        sample_gen = noise_gen = None
        secure = SecureRandom()
    device = params[0].device
    before = [p.detach().clone() for p in params]

    was_training = model.training
    hooks_before = _hook_count(model)
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    # The same schedule as non-DP SFT, so that DP and non-DP rounds differ only in clipping and noise.
    scheduler = LambdaLR(optimizer, lr_lambda(training.lr_schedule, steps, training.warmup_steps))
    gsm = None
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            gsm = wrap_for_per_sample_grads(model)
            gsm.forbid_grad_accumulation()
            optimizer_class = DPOptimizer if secure is None else _secure_noise_optimizer()
            dp_optimizer = optimizer_class(
                optimizer, noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                expected_batch_size=expected_batch, loss_reduction="mean", generator=noise_gen,
            )
            if secure is not None:
                dp_optimizer.secure_random = secure
            dp_optimizer.attach_step_hook(step_counter.get_optimizer_hook_fn(sample_rate=q))
            if secure is None:
                sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=sample_gen,
                                                        steps=steps)
                if sampler.sample_rate != event.sample_rate:
                    raise DPTrainingError(f"sampler rate {sampler.sample_rate} != accounted rate {event.sample_rate}")
            else:
                sampler = _secure_poisson_batches(secure, n, q, steps)
            gsm.train()
            for step, indices in enumerate(sampler):
                dp_optimizer.zero_grad(set_to_none=True)
                if not indices:
                    # Noise-only step: an empty batch contributes a zero sum, the optimiser still adds noise.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    result.losses.append(math.nan)
                    result.empty_batches += 1
                else:
                    size = training.micro_batch_size or len(indices)
                    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
                    batch_loss = 0.0
                    for k, chunk in enumerate(chunks):
                        batch = [examples[i] for i in chunk]
                        input_ids, attention_mask, labels = collate(batch, pad_token_id)
                        loss = per_sequence_loss(gsm, input_ids.to(device), attention_mask.to(device),
                                                 labels.to(device))
                        with warnings.catch_warnings():
                            # The frozen embedding output needs no grad, so the first LoRA layer's full backward
                            # hook fires on module outputs only; Opacus needs exactly that (deps.md §3b).
                            warnings.filterwarnings("ignore", message="Full backward hook is firing")
                            loss.backward()
                        batch_loss += float(loss.detach()) * len(chunk) / len(indices)
                        for p in params:
                            gs = getattr(p, "grad_sample", None)
                            if not isinstance(gs, torch.Tensor) or gs.shape[0] != len(chunk):
                                raise DPTrainingError(
                                    f"step {step}: a trainable parameter of shape {tuple(p.shape)} has no per-sample "
                                    f"gradient for the {len(chunk)} sampled records, so it would not be clipped; "
                                    "the model must be wrapped in hooks mode and trained through the wrapper"
                                )
                        if k + 1 < len(chunks):
                            # Clip this pass's per-sample gradients into the running sum; no noise, no step yet.
                            dp_optimizer.signal_skip_step(do_skip=True)
                            dp_optimizer.step()
                            dp_optimizer.zero_grad(set_to_none=True)
                    result.losses.append(batch_loss)
                result.batch_sizes.append(len(indices))
                result.learning_rates.append(float(scheduler.get_last_lr()[0]))
                dp_optimizer.step()
                counted = sum(s for _, _, s in step_counter.history)
                if counted != step + 1:
                    raise DPTrainingError(f"step {step}: the accountant counted {counted} steps; the noisy step was "
                                          "skipped or double-counted")
                scheduler.step()
                release_freed_memory()  # batches differ in length: see fedse_secure.memory
                result.steps += 1
            dp_optimizer.zero_grad(set_to_none=True)
        finally:
            if gsm is not None:
                gsm.to_standard_module()
            for p in model.parameters():
                for attr in _OPACUS_PARAM_ATTRS:
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None
            model.train(was_training)
    if _hook_count(model) != hooks_before:
        raise DPTrainingError("Opacus hooks were left on the model after training; do not save this adapter")
    _check_lora_update(before, params, moved_expected=privacy.noise_multiplier > 0
                       or len(result.batch_sizes) > result.empty_batches)
    if step_counter.history != [(privacy.noise_multiplier, q, steps)]:
        raise DPTrainingError(
            f"the Opacus accountant recorded {step_counter.history}, but the projected event is "
            f"{(privacy.noise_multiplier, q, steps)}; the ledger would be wrong"
        )
    from fedse_secure.privacy.accounting import epsilon

    result.round_epsilon = epsilon([event], privacy.delta, privacy.accountant)
    return result
