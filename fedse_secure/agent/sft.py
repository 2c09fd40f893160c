"""Multi-turn SFT on trajectories: loss on the agent's own tokens (thought + action) only; LoRA only.

A conversation is tokenised segment by segment with the tokenizer's chat template, so the tokens the model is
trained on are the tokens it sees when it acts. Labels are -100 everywhere except the content of assistant
turns and their end-of-turn token (the model must learn to stop).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedse_secure.agent.rollout import TokenCounter, fit_history
from fedse_secure.config import TrainingConfig
from fedse_secure.envs.trajectory import Trajectory, conversation_head
from fedse_secure.memory import release_freed_memory

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_messages(
    tokenizer, messages: Sequence[dict[str, str]], max_seq_len: int, last_turn_only: bool = False
) -> EncodedExample:
    """Tokenise a chat; the agent's turns (content and end-of-turn marker) are the only targets. The "OK" that
    answers the instruction in AgentGym's layout is context, as AgentGym trains it (``loss: False``).

    If the conversation is longer than ``max_seq_len``, whole later turns are dropped (the system prompt, the
    task and the earliest turns are kept), so no example ends in the middle of an action. With
    ``last_turn_only`` earlier assistant turns are context, not targets (one example per turn).
    """
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    first_target = conversation_head(messages)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        seg_ids: list[int]
        seg_labels: list[int]
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full = _render(tokenizer, messages[: i + 1])
            if not header.startswith(rendered) or not full.startswith(header):
                raise ValueError("the tokenizer's chat template is not prefix-stable; multi-turn SFT cannot mask it")
            head_ids = tokenizer(header[len(rendered) :], add_special_tokens=False)["input_ids"]
            body_ids = tokenizer(full[len(header) :], add_special_tokens=False)["input_ids"]
            seg_ids = head_ids + body_ids
            # Targets end at the end-of-turn token: what the template adds after it (a newline) is not the
            # agent's output, and generation stops at that token anyway.
            body_labels = list(body_ids)
            eos = tokenizer.eos_token_id
            if eos in body_ids:
                last = len(body_ids) - 1 - body_ids[::-1].index(eos)
                body_labels[last + 1 :] = [IGNORE_INDEX] * (len(body_ids) - last - 1)
            if (last_turn_only and i != last_assistant) or i < first_target:
                body_labels = [IGNORE_INDEX] * len(body_ids)
            seg_labels = [IGNORE_INDEX] * len(head_ids) + body_labels
            rendered = full
        else:
            full = _render(tokenizer, messages[: i + 1])
            if not full.startswith(rendered):
                raise ValueError("the tokenizer's chat template is not prefix-stable; multi-turn SFT cannot mask it")
            seg_ids = tokenizer(full[len(rendered) :], add_special_tokens=False)["input_ids"]
            seg_labels = [IGNORE_INDEX] * len(seg_ids)
            rendered = full
        if message["role"] == "assistant" and labels_has_target(labels) and len(ids) + len(seg_ids) > max_seq_len:
            # Stop before this turn rather than cut a target in half; the dangling observation is trimmed below.
            break
        ids.extend(seg_ids)
        labels.extend(seg_labels)
    if len(ids) > max_seq_len:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    # Trailing observations after the last kept assistant turn carry no targets: trim them.
    while labels and labels[-1] == IGNORE_INDEX:
        labels.pop()
        ids.pop()
    return EncodedExample(input_ids=ids, labels=labels)


def labels_has_target(labels: Sequence[int]) -> bool:
    return any(t != IGNORE_INDEX for t in labels)


def encode_trajectory(tokenizer, trajectory: Trajectory, max_seq_len: int) -> EncodedExample:
    return encode_messages(tokenizer, trajectory.messages, max_seq_len)


def encode_for_training(
    tokenizer, trajectories, max_seq_len: int, history_turns: int | None = None, context_budget: int | None = None
) -> list[EncodedExample]:
    """The SFT examples for a buffer: whole conversations, or one example per turn under a history window.

    Per turn, identical examples are kept once, as the buffer keeps identical trajectories once: under a short
    window every path through a state yields the same (prompt, action) pair, and the copies would only tilt
    training towards the states all paths share (near the goal) and away from the rare ones that decide
    success. Measured on the Maze learning test: 7/12 held-out starts solved with this, 5/12 without.
    """
    if history_turns is None:
        examples = [encode_trajectory(tokenizer, t, max_seq_len) for t in trajectories]
    else:
        count = TokenCounter(tokenizer)  # one cache for the whole buffer: the system prompt is counted once
        distinct: dict[tuple[tuple[int, ...], tuple[int, ...]], EncodedExample] = {}
        for t in trajectories:
            for e in encode_turns(tokenizer, t, max_seq_len, history_turns, context_budget, count):
                distinct.setdefault((tuple(e.input_ids), tuple(e.labels)), e)
        examples = list(distinct.values())
    return [e for e in examples if e.num_target_tokens > 0]


def encode_for_experiment(tokenizer, trajectories, exp) -> list[EncodedExample]:
    """``encode_for_training`` with the window an experiment's agent acts on (``model.history_turns`` within the
    prompt budget its rollouts use: ``model.max_context_tokens`` less the tokens a reply may take)."""
    return encode_for_training(
        tokenizer, trajectories, exp.training.max_seq_len, exp.model.history_turns,
        exp.model.max_context_tokens - exp.exploration.max_new_tokens,
    )


def encode_turns(
    tokenizer,
    trajectory: Trajectory,
    max_seq_len: int,
    history_turns: int,
    context_budget: int | None = None,
    count: TokenCounter | None = None,
) -> list[EncodedExample]:
    """One example per agent turn, each with exactly the prompt the agent acts on under a history window.

    An agent that keeps only the last ``history_turns`` (action, observation) pairs (``RolloutSettings.
    history_turns``) never sees the whole conversation, so training on the whole conversation would teach it
    in a context it never meets. Each turn here is rebuilt by the rollout's own ``fit_history``.
    """
    count = count or TokenCounter(tokenizer)
    budget = context_budget if context_budget is not None else max_seq_len
    messages = trajectory.messages
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < conversation_head(messages):
            continue
        window = fit_history(list(messages[:i]), budget, count, history_turns) + [m]
        example = encode_messages(tokenizer, window, max_seq_len, last_turn_only=True)
        if example.num_target_tokens:
            out.append(example)
    return out


def collate_examples(examples: Sequence[EncodedExample], pad_token_id: int):
    """Right-padded ``(input_ids, attention_mask, labels)`` tensors for training."""
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        L = len(e.input_ids)
        input_ids[row, :L] = torch.tensor(e.input_ids, dtype=torch.long)
        attention[row, :L] = 1
        labels[row, :L] = torch.tensor(e.labels, dtype=torch.long)
    return input_ids, attention, labels


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier on the base learning rate at optimiser step ``step`` (0-based); cosine decays to 0."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= 1:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def freeze_matching(model, pattern: str | None) -> list[str]:
    """Freeze trainable parameters whose name matches ``pattern`` (FFA-LoRA freezes ``lora_A``)."""
    if not pattern:
        return []
    frozen = []
    rx = re.compile(pattern)
    for name, p in model.named_parameters():
        if p.requires_grad and rx.search(name):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    target_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


def planned_steps(num_examples: int, cfg: TrainingConfig) -> int:
    per_epoch = math.ceil(num_examples / cfg.batch_size) if num_examples else 0
    steps = per_epoch * cfg.epochs_per_round
    if cfg.max_steps_per_round is not None:
        steps = min(steps, cfg.max_steps_per_round)
    return steps


def decoder_and_head(model):
    """``(decoder, lm_head)`` of a causal LM (through peft and Opacus wrappers), or None when the model does not
    split that way or rescales its logits after the head (softcapping, logit scale)."""
    base = model
    while True:
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        elif hasattr(base, "_module") and not hasattr(base, "lm_head"):  # opacus GradSampleModule
            base = base._module
        else:
            break
    decoder = getattr(base, "model", None)
    head = getattr(base, "lm_head", None)
    config = getattr(base, "config", None)
    if decoder is None or head is None or any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    return decoder, head


def target_token_loss(
    model,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    frozen: FrozenPrefix | None = None,
    batch: Sequence[EncodedExample] | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens, with the LM head applied to those positions only.

    The agent's tokens are a small share of a multi-turn example (the observations are context), and over a
    49k vocabulary the LM head on every position is most of a step's time and memory. Equal to the model's own
    ``labels=`` loss (tested). Falls back to it for models without the usual decoder/lm_head split. With
    ``frozen`` (and ``batch``, the examples these tensors hold) the frozen lower blocks are not run again; with
    ``share_prefix`` the leading tokens every row shares run once (``decode_sharing_prefix``).
    """
    parts = decoder_and_head(model)
    # No KV cache while training (but for a shared prefix's): it would hold every layer's keys and values.
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention, labels=labels, use_cache=False).loss
    decoder, head = parts
    shared = shared_prefix_length(input_ids, attention) if share_prefix else 0
    if frozen is None:
        hidden = decode_sharing_prefix(decoder, attention, shared, input_ids=input_ids)
    else:
        hidden = frozen.top_hidden(batch, attention, shared)
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][picked]).float()
    return torch.nn.functional.cross_entropy(logits, targets[picked])


#: Decoders whose forward hands ``inputs_embeds`` to the first block unchanged and take a 4D attention mask as given
#: (some scale the embeddings first, which would rescale cached hidden states fed back in as ``inputs_embeds``).
PLAIN_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


#: A batch's rows share a prefix this long at least before it is run once for all of them (below it, the second
#: forward call costs more than it saves).
MIN_SHARED_PREFIX = 16


def shared_prefix_length(input_ids: torch.Tensor, attention: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch has in common (the chat template, the
    environment's instructions), leaving every row at least one token of its own; 0 for a single row."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0).long().cumprod(dim=0)
    return min(int(same.sum()), int(attention.sum(dim=1).min()) - 1)


def decode_sharing_prefix(decoder, attention: torch.Tensor, shared: int, *, input_ids: torch.Tensor | None = None,
                          inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden state for a right-padded batch whose rows all begin with the same ``shared``
    positions: those run once, and every row's own tokens attend to their keys and values.

    Every example an environment yields starts with the same chat template and instructions (200 of a WebShop
    example's ~390 tokens), so a batch of B rows runs that part once instead of B times. Equal to one pass over
    the whole batch (tested). Under gradient checkpointing, which drops KV caches, and for a short common
    prefix, it is one pass over the whole batch.
    """
    x, name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
    checkpointing = decoder.training and any(getattr(b, "gradient_checkpointing", False) for b in decoder.layers)
    if shared < MIN_SHARED_PREFIX or checkpointing or not _causal_everywhere(decoder, attention.shape[1]):
        return decoder(**{name: x}, attention_mask=attention, use_cache=False).last_hidden_state
    from transformers import DynamicCache

    rows, width = attention.shape
    cache = DynamicCache(config=decoder.config)
    head = decoder(**{name: x[:1, :shared]}, cache=cache, use_cache=True).last_hidden_state
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
    # The rows' own tokens see the whole prefix and, causally, each other within their row. Under right padding
    # no real token reads a pad, so the mask needs no padding term; a 4D mask is used as given, positions too.
    own = width - shared
    blocked = torch.finfo(head.dtype).min
    mask = head.new_zeros((1, 1, own, width))
    mask[0, 0, :, shared:] = torch.triu(head.new_full((own, own), blocked), 1)
    positions = torch.arange(shared, width, device=attention.device)[None].expand(rows, own)
    tail = decoder(**{name: x[:, shared:]}, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True).last_hidden_state
    return torch.cat([head.expand(rows, -1, -1), tail], dim=1)


def _causal_everywhere(decoder, width: int) -> bool:
    """Whether every block attends causally over the whole width (no sliding window cuts it), as the 4D mask
    that ``decode_sharing_prefix`` passes assumes; only for decoders known to take such a mask unchanged."""
    config = decoder.config
    window = getattr(config, "sliding_window", None)
    # Flash-attention kernels take no 4D mask; sdpa and eager apply it as given.
    return (config.model_type in PLAIN_DECODERS and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and (window is None or window >= width))


#: Bytes of hidden states the frozen-prefix cache keeps per model. Past it, examples take the same split path but
#: their lower pass is recomputed at every step, so results never depend on what was cached.
FROZEN_PREFIX_CACHE_BYTES = 1 << 30


@contextmanager
def _only_blocks(decoder, blocks: slice, final_norm: bool):
    """The decoder runs only ``decoder.layers[blocks]`` (and its final norm only with ``final_norm``): its own
    forward then builds the mask and the rotary embeddings exactly as it does for the whole stack."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[blocks])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def frozen_block_count(decoder) -> int:
    """How many of the decoder's lowest blocks a training step can skip: those below the lowest block with a
    trainable parameter, provided nothing in them is random in train mode and every block is of one kind (a
    decoder whose blocks differ, e.g. sliding-window layers, finds a block's kind by its index). 0: none."""
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "norm") or not hasattr(decoder, "embed_tokens"):
        return 0
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    config = getattr(decoder, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_DECODERS:
        return 0
    if len(set(getattr(config, "layer_types", None) or ())) > 1 or getattr(config, "attention_dropout", 0.0):
        return 0
    split = next((i for i, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())), 0)
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for block in list(layers)[:split] for m in block.modules()):
        return 0
    return split


class FrozenPrefix:
    """The hidden states of examples after the frozen lower blocks, computed once per example.

    With ``lora.top_layers`` the blocks below the adapter are frozen and untouched by it, so what they make of an
    example depends on its tokens alone: it stays valid across steps, rounds and the institutions that share a
    model in simulation. Each example's lower pass runs on that example alone, so its value never depends on
    the batch it lands in or on whether it was cached (a resumed run, with an empty cache, trains the same).
    """

    def __init__(self, decoder, split: int, max_bytes: int = FROZEN_PREFIX_CACHE_BYTES):
        self.decoder = decoder
        self.split = split
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self._hidden: dict[tuple[int, ...], torch.Tensor] = {}

    def hidden(self, example: EncodedExample) -> torch.Tensor:
        """``(len(example), hidden_size)``: the example after blocks ``[0, split)``."""
        key = tuple(example.input_ids)
        found = self._hidden.get(key)
        if found is not None:
            return found
        device = self.decoder.embed_tokens.weight.device
        ids = torch.tensor([example.input_ids], dtype=torch.long, device=device)
        with torch.no_grad(), _only_blocks(self.decoder, slice(0, self.split), final_norm=False):
            out = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        value = out.last_hidden_state[0]
        size = value.numel() * value.element_size()
        if self.cached_bytes + size <= self.max_bytes:
            self._hidden[key] = value
            self.cached_bytes += size
        return value

    def top_hidden(self, batch: Sequence[EncodedExample], attention: torch.Tensor, shared: int = 0) -> torch.Tensor:
        """The decoder's last hidden state for ``batch`` (right-padded as ``collate_examples`` pads it), with
        only the blocks from ``split`` up run, and the ``shared`` leading positions common to every row once.
        Padding positions hold zeros: under right padding and a causal mask no real position reads them."""
        rows = [self.hidden(e) for e in batch]
        lower = rows[0].new_zeros((len(rows), attention.shape[1], rows[0].shape[-1]))
        for i, row in enumerate(rows):
            lower[i, : row.shape[0]] = row
        with _only_blocks(self.decoder, slice(self.split, None), final_norm=True):
            return decode_sharing_prefix(self.decoder, attention, shared, inputs_embeds=lower)


def frozen_prefix(model) -> FrozenPrefix | None:
    """The model's frozen-prefix cache, or None when no lower block can be skipped: LoRA in every block, or a
    model that does not split that way. The cache lives on the decoder, so it goes when the model goes (a
    module-level table would keep every model it ever saw alive)."""
    parts = decoder_and_head(model)
    if parts is None:
        return None
    decoder = parts[0]
    split = frozen_block_count(decoder)
    if split == 0:
        return None
    found = getattr(decoder, "_fedse_frozen_prefix", None)
    if found is None or found.split != split:
        found = FrozenPrefix(decoder, split)
        decoder._fedse_frozen_prefix = found
    return found


def micro_batches(batch: Sequence[EncodedExample], micro_batch_size: int | None) -> list[list[EncodedExample]]:
    """``batch`` in consecutive passes of at most ``micro_batch_size`` sequences (one pass without a size)."""
    size = micro_batch_size or len(batch)
    return [list(batch[i : i + size]) for i in range(0, len(batch), size)]


@contextmanager
def training_mode(model, cfg: TrainingConfig):
    """The model in train mode, with gradient checkpointing if configured; back in eval mode without it after.

    Checkpointing is non-reentrant: it needs no gradient on the (frozen) inputs, and HF applies it only in train
    mode, so rollouts and evaluation never pay for it.
    """
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()


def train_lora(
    model,
    examples: Sequence[EncodedExample],
    cfg: TrainingConfig,
    pad_token_id: int,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainStats:
    """Non-private SFT of the trainable (LoRA) parameters: AdamW, the configured schedule, shuffled epochs.

    The base model stays frozen: only parameters with ``requires_grad`` (the LoRA tensors) are optimised, on the
    model's device. A batch is processed in ``cfg.micro_batch_size`` passes whose losses are weighted by their
    share of the batch's target tokens, so the accumulated gradient is the whole batch's. A float16 base model
    trains with loss scaling (its activation gradients would underflow otherwise); float32 and bfloat16 need none.
    """
    import time

    from fedse_secure.models.device import model_device

    start = time.perf_counter()
    stats = TrainStats(examples=len(examples))
    examples = [e for e in examples if e.num_target_tokens > 0]
    total_steps = planned_steps(len(examples), cfg)
    if total_steps == 0:
        return stats
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is this a peft LoRA model?")
    frozen = frozen_prefix(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, total_steps, cfg.warmup_steps))
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    scaler = torch.amp.GradScaler(device.type, enabled=getattr(model, "dtype", None) == torch.float16)
    step = 0
    with training_mode(model, cfg):
        while step < total_steps:
            order = torch.randperm(len(examples), generator=generator).tolist()
            for i in range(0, len(order), cfg.batch_size):
                if step >= total_steps:
                    break
                batch = [examples[j] for j in order[i : i + cfg.batch_size]]
                chunks = micro_batches(batch, cfg.micro_batch_size)
                passes = [collate_examples(chunk, pad_token_id) for chunk in chunks]
                counts = [int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, _, labels in passes]
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for chunk, (input_ids, attention, labels), count in zip(chunks, passes, counts):
                    if count == 0:
                        continue
                    loss = target_token_loss(model, input_ids.to(device), attention.to(device), labels.to(device),
                                             frozen, chunk)
                    loss = loss * (count / sum(counts))
                    scaler.scale(loss).backward()
                    batch_loss += float(loss.detach())
                if cfg.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                release_freed_memory()  # batches differ in length: see fedse_secure.memory
                step += 1
                stats.losses.append(batch_loss)
                stats.target_tokens += sum(e.num_target_tokens for e in batch)
                if on_step is not None:
                    on_step(step, total_steps, stats.losses[-1])
    stats.steps = step
    stats.seconds = time.perf_counter() - start
    return stats
