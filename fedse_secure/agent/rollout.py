"""Batched rollouts: many episodes step together and the model acts for all of them in one batch.

This is the hot path of self-evolution. Episodes are packed into slots; every turn, the prompts of all active
slots are left-padded into one batch and generated together (with the KV cache inside ``generate``). When an
episode ends its slot is refilled with the next pending task (continuous batching), so the batch stays full.

Three action modes:

* ``generate`` — free-text ReAct ("Thought:\\n...\\n\\nAction:\\n..."), sampled at the exploration temperature
  (1.0, as the paper) or greedy for evaluation (as AgentGym evaluates);
* ``score`` — the environment's valid actions are ranked by the model's log-likelihood of ``SCORE_TEMPLATE`` (an
  empty thought, then the action), sampled from the softmax at the temperature, or argmax when greedy. Useful for
  very small models;
* ``constrained`` — the thought is generated freely and the action is decoded under the environment's valid
  actions (``constrained.py``): the paper's ReAct format, and never an invalid action.

Every local environment enumerates its valid actions, so all three modes run on all five.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from fedse_secure.agent.merged import merged_adapter
from fedse_secure.envs.base import ACTION_MARKER, TextEnv, react
from fedse_secure.envs.trajectory import Trajectory, conversation_head
from fedse_secure.memory import release_freed_memory
from fedse_secure.models.device import model_device


@dataclass
class RolloutSettings:
    max_turns: int
    max_new_tokens: int = 48
    temperature: float = 1.0
    greedy: bool = False
    batch_size: int = 8
    max_context_tokens: int = 1024
    #: generate | score | constrained (see the module docstring).
    action_mode: str = "generate"
    # Past (action, observation) pairs the prompt may keep after the task; None = as many as the budget allows.
    history_turns: int | None = None


@dataclass
class RolloutStats:
    episodes: int = 0
    agent_steps: int = 0
    generated_tokens: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    #: Real tokens run through the model (prompt tokens not found in a cache, candidate tokens, generated tokens).
    encoded_tokens: int = 0
    #: Prompt tokens whose keys and values came from a cache instead (the shared template or the slot's own).
    reused_tokens: int = 0
    #: Positions whose logits went through the LM head.
    head_positions: int = 0
    #: Seconds inside the model's forward passes (the rest is tokenising, sampling and the environments).
    forward_seconds: float = 0.0


class TokenCounter:
    """Caches each message's token count so history fitting does not re-tokenise the whole chat per turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            # +6 covers the chat template's per-message markers (<|im_start|>role\n ... <|im_end|>\n).
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 6
            if len(self.cache) < 50_000:
                self.cache[text] = n
        return n


def fit_history(
    messages: list[dict[str, str]], budget: int, count: Callable[[str], int], max_pairs: int | None = None
) -> list[dict[str, str]]:
    """Keep the conversation's head (the instruction and its "OK", or a system prompt, then the first
    observation) and as many of the latest turns as fit ``budget``.

    Older (assistant, observation) pairs are dropped first; the latest pair (the agent's last action and the
    observation it must answer) is always kept, even over budget. Dropping whole pairs keeps the roles
    alternating, as in training: a dangling observation would put two user messages in a row. ``max_pairs``
    caps the kept pairs (at least the latest is kept) for agents that act on a short window; ``max_pairs=0``
    is a memoryless agent, which sees the instruction (with its "OK") and the current observation only (enough
    where the observation is the whole state, as in Maze).
    """
    n_head = conversation_head(messages)
    if max_pairs == 0:
        if messages[-1]["role"] != "user":
            raise ValueError("a memoryless prompt needs the current observation as the last message")
        return [*messages[: n_head - 1], messages[-1]]
    head = messages[:n_head]
    tail = messages[n_head:]
    used = sum(count(m["content"]) for m in head)
    kept: list[dict[str, str]] = []
    i = len(tail)
    while i >= 2:
        pair = tail[i - 2 : i]
        cost = sum(count(m["content"]) for m in pair)
        if kept and (used + cost > budget or (max_pairs is not None and len(kept) // 2 >= max_pairs)):
            break
        kept = list(pair) + kept
        used += cost
        i -= 2
    return head + kept


def prompt_texts(tokenizer, chats: Sequence[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


# ---------------------------------------------------------------------------------------------------------------
# Generation engine: per-slot prefix KV caching and one hand-written batched decode loop.
#
# Why not ``model.generate``: every turn of an episode re-sends the whole conversation, and ``generate`` would
# re-encode all of it (the prefill) on every turn; on a CPU that prefill, not decoding, dominates and does not get
# cheaper with batching. Each slot therefore keeps the KV cache of the tokens it has already seen; a new turn
# reuses the longest common token prefix (the system prompt, the task, earlier turns) and encodes only the rest.
# The cached tokens are the tokenised prompt itself, never the model's raw output ids, so what the model
# conditions on is exactly what one-at-a-time generation conditions on.
# ---------------------------------------------------------------------------------------------------------------


class _BufferLayer(DynamicLayer):
    """A layer cache in a preallocated buffer: decoding writes in place instead of re-concatenating the whole
    cache for every new token (which made each decode step cost O(context) in memory traffic)."""

    def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 length: int = 0):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.kbuf = self.vbuf = None
        if keys is not None:
            self.kbuf, self.vbuf, self.length = keys, values, length
            self._expose()

    def _expose(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]
        self.device = self.kbuf.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self.kbuf = key_states.new_zeros((b, h, self.capacity, d))
        self.vbuf = value_states.new_zeros((b, h, self.capacity, d))
        self._expose()

    def update(self, key_states, value_states, *args, **kwargs):
        if self.kbuf is None:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer overflow ({end} > {self.capacity} positions); this is a bug in rollout.py")
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        return self.length


@dataclass
class _SlotCache:
    """The token ids a slot has already encoded and their per-layer (keys, values), each ``(heads, len, dim)``."""

    ids: list[int] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Template:
    """The KV of the token prefix every prompt of this rollout has shared so far: the chat template and the
    environment's system prompt. It seeds a slot whose own cache shares less with its prompt (every new episode),
    so the system prompt is encoded once per rollout instead of once per episode. It only ever shrinks: after each
    batch it is cut to the prefix common to every prompt seen."""

    ids: list[int] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def seed(self, cache: _SlotCache, ids: Sequence[int]) -> None:
        if self.kv is None:
            return
        n = _common_prefix(self.ids, ids)
        if n > (_common_prefix(cache.ids, ids) if cache.kv is not None else 0):
            cache.ids, cache.kv = self.ids[:n], [(k[:, :n], v[:, :n]) for k, v in self.kv]

    def learn(self, cache: _SlotCache, prompt_len: int) -> None:
        """Fold in a slot's freshly encoded prompt (its first ``prompt_len`` cached tokens)."""
        if self.kv is None:
            self.ids = list(cache.ids[:prompt_len])
            self.kv = [(k[:, :prompt_len], v[:, :prompt_len]) for k, v in cache.kv]
            return
        n = _common_prefix(self.ids, cache.ids[:prompt_len])
        if n < len(self.ids):
            self.ids, self.kv = self.ids[:n], [(k[:, :n], v[:, :n]) for k, v in self.kv]


def _reuse(prompt_ids: list[list[int]], caches: list[_SlotCache], template: _Template | None) -> list[int]:
    """Per row, how many leading prompt tokens come from its cache (seeded from the template); at least one
    token is always left to encode, because its logits start the next step."""
    reuse = []
    for ids, cache in zip(prompt_ids, caches):
        if template is not None:
            template.seed(cache, ids)
        p = _common_prefix(cache.ids, ids) if cache.kv is not None else 0
        reuse.append(min(p, len(ids) - 1))
    return reuse


def _stacked_cache(model, caches: list[_SlotCache], reuse: list[int], capacity: int) -> list[_BufferLayer]:
    """One batch cache: row i holds its slot's first ``reuse[i]`` cached tokens, right-aligned at ``max(reuse)``."""
    C = max(reuse)
    if C == 0:
        return [_BufferLayer(capacity) for _ in range(_num_layers(model))]
    layers = []
    ref = next(c.kv for c, p in zip(caches, reuse) if p > 0)
    for layer, (k_ref, v_ref) in enumerate(ref):
        heads, _, dim = k_ref.shape
        kbuf = k_ref.new_zeros((len(caches), heads, capacity, dim))
        vbuf = v_ref.new_zeros((len(caches), heads, capacity, dim))
        for row, (cache, p) in enumerate(zip(caches, reuse)):
            if p:
                kbuf[row, :, C - p : C] = cache.kv[layer][0][:, :p]
                vbuf[row, :, C - p : C] = cache.kv[layer][1][:, :p]
        layers.append(_BufferLayer(capacity, kbuf, vbuf, length=C))
    return layers


def _keep(layers: list[_BufferLayer], row: int, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row ``row``'s keys and values at the cache positions ``index`` (its real tokens, in order)."""
    return [(layer.kbuf[row].index_select(1, index), layer.vbuf[row].index_select(1, index)) for layer in layers]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


def _pick(logits: torch.Tensor, settings: RolloutSettings, generator: torch.Generator) -> torch.Tensor:
    if settings.greedy:
        return logits.argmax(-1)
    # Plain temperature sampling over the full vocabulary (no top-k/top-p), as the paper's exploration.
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _num_layers(model) -> int:
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


@torch.no_grad()
def _generate_cached(model, tokenizer, prompt_ids: list[list[int]], caches: list[_SlotCache],
                     settings: RolloutSettings, stats: RolloutStats, generator: torch.Generator,
                     eos: set[int], template: _Template | None = None, *, max_new_tokens: int | None = None,
                     stop_text: str | None = None, constraints: Sequence | None = None) -> list[list[int]]:
    """Generate for every prompt in one batch; update each slot's cache; return each row's new token ids.

    Layout of row i: ``[pad | reused cache (p_i) | pad | new prompt tokens (d_i) | generated]``. The attention
    mask hides the pads and explicit position ids count only real tokens, so each row computes what it would
    compute alone (up to floating-point summation order).

    A row stops at an end-of-turn token, once its text contains ``stop_text``, or when its constraint (an object
    with ``mask()``, ``advance(token)`` and ``finished``, see ``constrained.py``) says its action is complete.
    """
    n_rows = len(prompt_ids)
    device = model_device(model)
    reuse = _reuse(prompt_ids, caches, template)
    fresh = [ids[p:] for ids, p in zip(prompt_ids, reuse)]
    C, D = max(reuse), max(len(f) for f in fresh)
    T = max_new_tokens if max_new_tokens is not None else settings.max_new_tokens
    capacity = C + D + T
    pad = tokenizer.pad_token_id
    layers = _stacked_cache(model, caches, reuse, capacity)
    kv_cache = Cache(layers=layers)
    mask = torch.zeros((n_rows, capacity), dtype=torch.long)
    input_ids = torch.full((n_rows, D), pad, dtype=torch.long)
    positions = torch.zeros((n_rows, D), dtype=torch.long)
    for row, (p, f) in enumerate(zip(reuse, fresh)):
        d = len(f)
        mask[row, C - p : C] = 1
        mask[row, C + D - d : C + D] = 1
        input_ids[row, D - d :] = torch.tensor(f, dtype=torch.long)
        positions[row, D - d :] = torch.arange(p, p + d)
    next_pos = torch.tensor([p + len(f) for p, f in zip(reuse, fresh)], dtype=torch.long, device=device)
    mask, input_ids, positions = mask.to(device), input_ids.to(device), positions.to(device)
    t_forward = time.perf_counter()
    logits = model(input_ids=input_ids, attention_mask=mask[:, : C + D], position_ids=positions,
                   past_key_values=kv_cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    for t in range(T):
        if constraints is not None:
            logits = logits.clone()
            for row, constraint in enumerate(constraints):
                if constraint is not None and not done[row]:
                    allowed = constraint.mask()
                    n = min(allowed.shape[0], logits.shape[-1])
                    blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    blocked[:n] = ~allowed[:n].to(logits.device)
                    logits[row, blocked] = float("-inf")
        token = _pick(logits, settings, generator)
        picked = token.tolist()  # one device-to-host copy per step, not one per row
        for row in range(n_rows):
            if not done[row]:
                tok = picked[row]
                generated[row].append(tok)
                if constraints is not None and constraints[row] is not None:
                    constraints[row].advance(tok)
                    done[row] = constraints[row].finished
                else:
                    done[row] = tok in eos
                if not done[row] and stop_text is not None and stop_text in tokenizer.decode(generated[row]):
                    done[row] = True
        if all(done) or t == T - 1:
            break
        # Finished rows keep stepping (outputs discarded): dropping them would copy the whole cache each time.
        feed = torch.where(torch.tensor(done, device=device), torch.full_like(token, pad), token)
        mask[:, C + D + t] = 1
        logits = model(input_ids=feed[:, None], attention_mask=mask[:, : C + D + t + 1],
                       position_ids=(next_pos + t)[:, None], past_key_values=kv_cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    stats.forward_seconds += time.perf_counter() - t_forward
    stats.generate_calls += 1
    # Keep, per row, the KV of its real tokens: the prompt and every generated token that was fed back.
    for row, (cache, p, f, gen) in enumerate(zip(caches, reuse, fresh, generated)):
        fed = len(gen) - 1
        index = torch.cat([torch.arange(C - p, C), torch.arange(C + D - len(f), C + D + fed)]).to(device)
        cache.kv = _keep(layers, row, index)
        cache.ids = list(prompt_ids[row]) + gen[:fed]
        if template is not None:
            template.learn(cache, len(prompt_ids[row]))
        stats.generated_tokens += len(gen)
        stats.encoded_tokens += len(f) + fed
        stats.reused_tokens += p
        stats.head_positions += len(gen)
    return generated


def _decode_reply(tokenizer, ids: list[int], eos: set[int]) -> str:
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


#: What score mode ranks: AgentGym's reply layout with an empty thought.
SCORE_TEMPLATE = react("", "{action}")


def as_score_format(trajectory: Trajectory) -> Trajectory:
    """The trajectory with every agent turn rewritten to ``SCORE_TEMPLATE`` (the thought dropped).

    Score mode ranks exactly these strings, so a model meant to act in score mode should be trained on them:
    trained on full thoughts, it would be scored on a context (an empty thought) it never saw. The "OK" of the
    conversation start is not an agent turn and stays.
    """
    from dataclasses import replace

    from fedse_secure.envs.base import extract_action

    head = conversation_head(trajectory.messages)
    messages = [
        {**m, "content": SCORE_TEMPLATE.format(action=extract_action(m["content"]))}
        if m["role"] == "assistant" and i >= head else m
        for i, m in enumerate(trajectory.messages)
    ]
    return replace(trajectory, messages=messages)


@torch.no_grad()
def candidate_log_likelihoods(model, tokenizer, prompts: list[str], candidates: list[list[str]]) -> list[torch.Tensor]:
    """Per prompt, the log-likelihood of ``SCORE_TEMPLATE`` filled with each candidate action, after the prompt.

    Rows are left-padded so every candidate's tokens sit at the end of its row; only those last positions go
    through the LM head (``logits_to_keep``), which over a 49k vocabulary is most of the cost otherwise.
    """
    prompt_ids, cand_ids, owners = [], [], []
    for k, (prompt, cands) in enumerate(zip(prompts, candidates)):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for a in cands:
            prompt_ids.append(p_ids)
            cand_ids.append(tokenizer(SCORE_TEMPLATE.format(action=a), add_special_tokens=False)["input_ids"])
            owners.append(k)
    full = [p + c for p, c in zip(prompt_ids, cand_ids)]
    device = model_device(model)
    width = max(len(x) for x in full)
    keep = max(len(c) for c in cand_ids) + 1
    ids = torch.full((len(full), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(full):
        ids[r, width - len(x) :] = torch.tensor(x)
        mask[r, width - len(x) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # position j predicts token at width - keep + j + 1
    scores = torch.empty(len(full), device=device)
    for r, c in enumerate(cand_ids):
        # The candidate's tokens are the last len(c) tokens; their predictions are the len(c) positions before.
        preds = logp[r, keep - 1 - len(c) : keep - 1]
        scores[r] = preds.gather(1, torch.tensor(c, device=device)[:, None]).sum()
    owners_t = torch.tensor(owners, device=device)
    return [scores[owners_t == k] for k in range(len(candidates))]


@torch.no_grad()
def packed_log_likelihoods(model, tokenizer, prompt_ids: list[list[int]], candidates: list[list[list[int]]],
                           caches: list[_SlotCache], template: _Template | None = None,
                           stats: RolloutStats | None = None) -> list[torch.Tensor]:
    """Per prompt, the log-likelihood of each candidate continuation (token ids), in one forward pass for all.

    Each row holds one prompt and all its candidates: ``[cached prefix | rest of the prompt | cand 1 | cand 2 ...]``.
    A 4D attention mask lets every candidate attend to the prompt and to its own earlier tokens only, and its
    positions restart where the prompt ends, so each candidate is scored exactly as if it followed the prompt
    alone. The prompt's prefix comes from the slot's cache (or the shared template), so a step encodes only what
    is new; the LM head runs only at the positions that predict candidate tokens. Afterwards each slot's cache
    holds its whole prompt, for the next step. Equal to :func:`candidate_log_likelihoods` (tested).
    """
    from fedse_secure.agent.sft import decoder_and_head

    stats = stats if stats is not None else RolloutStats()
    rows = len(prompt_ids)
    reuse = _reuse(prompt_ids, caches, template)
    rest = [ids[p:] for ids, p in zip(prompt_ids, reuse)]
    new = [r + [t for c in cands for t in c] for r, cands in zip(rest, candidates)]
    C, D = max(reuse), max(len(x) for x in new)
    layers = _stacked_cache(model, caches, reuse, C + D)
    pad = tokenizer.pad_token_id
    dtype = next(model.parameters()).dtype
    blocked = torch.finfo(dtype).min
    input_ids = torch.full((rows, D), pad, dtype=torch.long)
    positions = torch.zeros((rows, D), dtype=torch.long)
    mask = torch.full((rows, 1, D, C + D), blocked, dtype=dtype)
    picks: list[tuple[int, int]] = []  # (row, query position) whose hidden state predicts a candidate token
    targets: list[int] = []
    owners: list[tuple[int, int]] = []  # (row, candidate) each pick belongs to
    for row, (p, r, cands, x) in enumerate(zip(reuse, rest, candidates, new)):
        o = D - len(x)  # left padding
        input_ids[row, o:] = torch.tensor(x, dtype=torch.long)
        for q in range(o):
            mask[row, 0, q, C + q] = 0  # a pad attends to itself only (no row may be fully masked)
        mask[row, 0, o:, C - p : C] = 0  # every real token sees the cached prefix
        end = o + len(r)
        positions[row, o:end] = torch.arange(p, p + len(r))
        mask[row, 0, o:end, C + o : C + end] = torch.triu(torch.full((len(r), len(r)), blocked, dtype=dtype), 1)
        start = end
        for k, c in enumerate(cands):
            stop = start + len(c)
            positions[row, start:stop] = torch.arange(p + len(r), p + len(r) + len(c))
            mask[row, 0, start:stop, C + o : C + end] = 0  # the whole prompt
            mask[row, 0, start:stop, C + start : C + stop] = torch.triu(
                torch.full((len(c), len(c)), blocked, dtype=dtype), 1)
            for j, token in enumerate(c):
                picks.append((row, end - 1 if j == 0 else start + j - 1))
                targets.append(token)
                owners.append((row, k))
            start = stop
    device = model_device(model)
    input_ids, positions, mask = input_ids.to(device), positions.to(device), mask.to(device)
    t_forward = time.perf_counter()
    parts = decoder_and_head(model)
    kv_cache = Cache(layers=layers)
    pick_rows = torch.tensor([r for r, _ in picks], device=device)
    pick_cols = torch.tensor([q for _, q in picks], device=device)
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=kv_cache,
                    use_cache=True).logits
        logits = out[pick_rows, pick_cols]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=kv_cache,
                         use_cache=True).last_hidden_state
        logits = head(hidden[pick_rows, pick_cols])
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    stats.forward_seconds += time.perf_counter() - t_forward
    scores = [torch.zeros(len(c)) for c in candidates]
    for (row, k), value in zip(owners, logp.tolist()):
        scores[row][k] += value
    for row, (cache, p, r) in enumerate(zip(caches, reuse, rest)):
        o = D - len(new[row])
        cache.kv = _keep(layers, row,
                         torch.cat([torch.arange(C - p, C), torch.arange(C + o, C + o + len(r))]).to(device))
        cache.ids = list(prompt_ids[row])
        if template is not None:
            template.learn(cache, len(prompt_ids[row]))
        stats.encoded_tokens += len(new[row])
        stats.reused_tokens += p
    stats.head_positions += len(picks)
    stats.generate_calls += 1
    return scores


def _score_actions(model, tokenizer, prompt_ids: list[list[int]], candidates: list[list[str]], caches: list[_SlotCache],
                   template: _Template, settings: RolloutSettings, generator: torch.Generator,
                   stats: RolloutStats) -> list[str]:
    """Pick one valid action per prompt: argmax of the log-likelihoods (greedy) or a softmax sample."""
    cand_ids = [[_score_format_ids(tokenizer, a) for a in cands] for cands in candidates]
    chosen = []
    for cands, s in zip(candidates, packed_log_likelihoods(model, tokenizer, prompt_ids, cand_ids, caches, template,
                                                            stats)):
        if settings.greedy:
            idx = int(s.argmax())
        else:
            # The generator lives on the model's device; the scores come back on the CPU.
            probs = torch.softmax(s.to(generator.device) / settings.temperature, 0)
            idx = int(torch.multinomial(probs, 1, generator=generator))
        chosen.append(SCORE_TEMPLATE.format(action=cands[idx]))
    return chosen


def _score_format_ids(tokenizer, action: str) -> list[int]:
    return tokenizer(SCORE_TEMPLATE.format(action=action), add_special_tokens=False)["input_ids"]


def _constrained_replies(model, tokenizer, prompts: list[str], envs: list[TextEnv], caches: list[_SlotCache],
                         template: _Template, settings: RolloutSettings, stats: RolloutStats,
                         generator: torch.Generator, eos: set[int]) -> list[str]:
    """Free thought up to ``Action:``, then the action decoded under each environment's action space."""
    from fedse_secure.agent.constrained import ActionConstraint, thought_part, token_vocabulary

    spaces = [env.action_space() for env in envs]
    if any(space is None for space in spaces):
        name = next(env.name for env, space in zip(envs, spaces) if space is None)
        raise ValueError(f"action_mode 'constrained' needs valid actions, but {name} gives none; use "
                         "exploration.action_mode: generate")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    first = _generate_cached(model, tokenizer, ids, caches, settings, stats, generator, eos, template,
                             stop_text=ACTION_MARKER)
    thoughts = [thought_part(_decode_reply(tokenizer, x, eos)) for x in first]
    vocab = token_vocabulary(tokenizer)
    constraints = [ActionConstraint(vocab, space, tokenizer.eos_token_id) for space in spaces]
    ids = [tokenizer(p + t, add_special_tokens=False)["input_ids"] for p, t in zip(prompts, thoughts)]
    cap = max(c.max_tokens for c in constraints)
    second = _generate_cached(model, tokenizer, ids, caches, settings, stats, generator, eos, template,
                              max_new_tokens=cap, constraints=constraints)
    actions = [tokenizer.decode([t for t in x if t not in eos], skip_special_tokens=True) for x in second]
    return [t + a for t, a in zip(thoughts, actions)]


def run_episodes(
    model,
    tokenizer,
    make_env: Callable[[], TextEnv],
    task_ids: Sequence[int],
    settings: RolloutSettings,
    *,
    round_id: int = -1,
    seed: int = 0,
    on_episode: Callable[[Trajectory], None] | None = None,
    fold_adapter: bool | None = None,
) -> tuple[list[Trajectory], RolloutStats]:
    """Play one episode per task id, ``settings.batch_size`` at a time; return trajectories in task order.

    ``fold_adapter``: play on the LoRA update folded into the base weights (``merged.py``); by default where that
    pays, on a GPU, where decoding is launch-bound (1.72x measured on an H200). On a CPU decoding is FLOP-bound:
    folding measured 1.00-1.07x there and would hold a second copy of the adapted weights.
    """
    start = time.perf_counter()
    if fold_adapter is None:
        fold_adapter = model_device(model).type == "cuda"
    torch.manual_seed(seed)
    # Sampling draws on the model's device, where the logits are.
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    stats = RolloutStats()
    count = TokenCounter(tokenizer)
    budget = settings.max_context_tokens - settings.max_new_tokens
    pending = deque(enumerate(task_ids))
    n_slots = max(1, min(settings.batch_size, len(task_ids)))
    envs = [make_env() for _ in range(n_slots)]
    slots: list[dict | None] = [None] * n_slots
    results: dict[int, Trajectory] = {}
    caches = [_SlotCache() for _ in range(n_slots)]
    template = _Template()
    eos = _eos_ids(model, tokenizer)

    def start_slot(s: int) -> None:
        order, task_id = pending.popleft()
        env = envs[s]
        obs = env.reset(task_id)
        slots[s] = {
            "order": order, "task_id": task_id, "turns": 0, "reward": 0.0, "success": False, "invalid": 0,
            "messages": [*env.conversation_start(), {"role": "user", "content": obs}],
        }

    def finish_slot(s: int) -> None:
        st = slots[s]
        traj = Trajectory(
            env=envs[s].name, task_id=st["task_id"], messages=st["messages"], reward=st["reward"],
            success=st["success"], source="explore", round=round_id,
            info={"turns": st["turns"], "invalid_actions": st["invalid"]},
        )
        results[st["order"]] = traj
        stats.episodes += 1
        slots[s] = None
        if on_episode is not None:
            on_episode(traj)

    def run_slots() -> None:
        while pending or any(slots):
            for s in range(n_slots):
                if slots[s] is None and pending:
                    start_slot(s)
            active = [s for s in range(n_slots) if slots[s] is not None]
            chats = [fit_history(slots[s]["messages"], budget, count, settings.history_turns) for s in active]
            prompts = prompt_texts(tokenizer, chats)
            slot_caches = [caches[s] for s in active]
            if settings.action_mode == "constrained":
                replies = _constrained_replies(model, tokenizer, prompts, [envs[s] for s in active], slot_caches,
                                               template, settings, stats, generator, eos)
            else:
                ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
                if settings.action_mode == "score":
                    cands = [envs[s].valid_actions() for s in active]
                    if any(not c for c in cands):
                        name = next(envs[s].name for s, c in zip(active, cands) if not c)
                        raise ValueError(f"action_mode 'score' needs valid actions, but {name} gives none; use "
                                         "exploration.action_mode: generate")
                    replies = _score_actions(model, tokenizer, ids, cands, slot_caches, template, settings,
                                             generator, stats)
                else:
                    new_ids = _generate_cached(model, tokenizer, ids, slot_caches, settings, stats, generator, eos,
                                               template)
                    replies = [_decode_reply(tokenizer, x, eos) for x in new_ids]
            for s, reply in zip(active, replies):
                st = slots[s]
                result = envs[s].step(reply)
                stats.agent_steps += 1
                st["turns"] += 1
                st["messages"].append({"role": "assistant", "content": reply})
                st["reward"] = result.reward
                st["success"] = bool(result.success)
                st["invalid"] += bool(result.info.get("invalid"))
                if result.done or st["turns"] >= settings.max_turns:
                    finish_slot(s)
                else:
                    st["messages"].append({"role": "user", "content": result.observation})
            release_freed_memory()  # each step's tensors have new shapes: see fedse_secure.memory

    try:
        with merged_adapter(model) if fold_adapter else nullcontext():
            run_slots()
    finally:
        for env in envs:
            env.close()  # a remote AgentGym server's instances are released, whatever happened
    stats.seconds = time.perf_counter() - start
    return [results[i] for i in range(len(task_ids))], stats
