"""Batched rollouts: many episodes step together and the model acts for all of them in one batch.

This is the hot path of self-evolution. Episodes are packed into slots; every turn, the prompts of all active
slots are left-padded into one batch and generated together (with the KV cache inside ``generate``). When an
episode ends its slot is refilled with the next pending task (continuous batching), so the batch stays full.

Two action modes:

* ``generate`` — free-text ReAct ("Thought: ... Action: ..."), sampled at the exploration temperature (1.0, as
  the paper) or greedy for evaluation (as AgentGym evaluates);
* ``score`` — the environment's valid actions are ranked by the model's log-likelihood of
  ``"Thought: \\nAction: <a>"`` (sampled from the softmax at the temperature, or argmax when greedy). Useful for
  very small models; needs environments that enumerate valid actions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedse_secure.agent.trajectory import Trajectory
from fedse_secure.envs.base import TextEnv


@dataclass
class RolloutSettings:
    max_turns: int
    max_new_tokens: int = 48
    temperature: float = 1.0
    greedy: bool = False
    batch_size: int = 8
    max_context_tokens: int = 1024
    action_mode: str = "generate"


@dataclass
class RolloutStats:
    episodes: int = 0
    agent_steps: int = 0
    generated_tokens: int = 0
    generate_calls: int = 0
    seconds: float = 0.0


class _TokenCounter:
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


def fit_history(messages: list[dict[str, str]], budget: int, count: Callable[[str], int]) -> list[dict[str, str]]:
    """Keep the system prompt, the task (first observation) and as many of the latest turns as fit ``budget``.

    Older (assistant, observation) pairs are dropped first: the agent always sees its instructions, its task
    and its most recent context.
    """
    head = messages[:2]
    tail = messages[2:]
    used = sum(count(m["content"]) for m in head)
    kept: list[dict[str, str]] = []
    # Walk back over the tail in (assistant, user) pairs; the final user message is always kept.
    i = len(tail)
    if i and tail[-1]["role"] == "user":
        used += count(tail[-1]["content"])
        kept.append(tail[-1])
        i -= 1
    while i >= 2:
        pair = tail[i - 2 : i]
        cost = sum(count(m["content"]) for m in pair)
        if used + cost > budget:
            break
        kept = list(pair) + kept
        used += cost
        i -= 2
    return head + kept


def _prompt_texts(tokenizer, chats: Sequence[list[dict[str, str]]]) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], settings: RolloutSettings, stats: RolloutStats) -> list[str]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if settings.greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0)
    out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1] :]
    stats.generate_calls += 1
    texts = []
    for row in new:
        n = int((row != tokenizer.pad_token_id).sum())
        stats.generated_tokens += n
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def _score_actions(model, tokenizer, prompts: list[str], candidates: list[list[str]], settings: RolloutSettings,
                   generator: torch.Generator) -> list[str]:
    """Pick one valid action per prompt by the model's log-likelihood of the assistant turn that states it."""
    rows, owners = [], []
    for k, (prompt, cands) in enumerate(zip(prompts, candidates)):
        for a in cands:
            rows.append((prompt, f"Thought: \nAction: {a}"))
            owners.append(k)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in rows]
    full_ids = [pi + tokenizer(c, add_special_tokens=False)["input_ids"] for pi, (_, c) in zip(prompt_ids, rows)]
    width = max(len(x) for x in full_ids)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(full_ids):  # right padding keeps positions simple for scoring
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = []
    for r, (pi, x) in enumerate(zip(prompt_ids, full_ids)):
        targets = torch.tensor(x[len(pi) :])
        lp = logp[r, len(pi) - 1 : len(x) - 1].gather(1, targets[:, None]).sum()
        scores.append(float(lp))
    chosen = []
    for k, cands in enumerate(candidates):
        s = torch.tensor([scores[r] for r in range(len(rows)) if owners[r] == k])
        if settings.greedy:
            idx = int(s.argmax())
        else:
            idx = int(torch.multinomial(torch.softmax(s / settings.temperature, 0), 1, generator=generator))
        chosen.append(f"Thought: \nAction: {cands[idx]}")
    return chosen


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
) -> tuple[list[Trajectory], RolloutStats]:
    """Play one episode per task id, ``settings.batch_size`` at a time; return trajectories in task order."""
    import time

    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    stats = RolloutStats()
    count = _TokenCounter(tokenizer)
    budget = settings.max_context_tokens - settings.max_new_tokens
    pending = deque(enumerate(task_ids))
    n_slots = max(1, min(settings.batch_size, len(task_ids)))
    envs = [make_env() for _ in range(n_slots)]
    slots: list[dict | None] = [None] * n_slots
    results: dict[int, Trajectory] = {}

    def start_slot(s: int) -> None:
        order, task_id = pending.popleft()
        env = envs[s]
        obs = env.reset(task_id)
        slots[s] = {
            "order": order, "task_id": task_id, "turns": 0, "reward": 0.0, "success": False,
            "messages": [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": obs}],
        }

    def finish_slot(s: int) -> None:
        st = slots[s]
        traj = Trajectory(
            env=envs[s].name, task_id=st["task_id"], messages=st["messages"], reward=st["reward"],
            success=st["success"], source="explore", round=round_id, info={"turns": st["turns"]},
        )
        results[st["order"]] = traj
        stats.episodes += 1
        slots[s] = None
        if on_episode is not None:
            on_episode(traj)

    while pending or any(slots):
        for s in range(n_slots):
            if slots[s] is None and pending:
                start_slot(s)
        active = [s for s in range(n_slots) if slots[s] is not None]
        chats = [fit_history(slots[s]["messages"], budget, count) for s in active]
        prompts = _prompt_texts(tokenizer, chats)
        if settings.action_mode == "score":
            cands = [envs[s].valid_actions() for s in active]
            if any(not c for c in cands):
                raise ValueError(f"action_mode 'score' needs valid actions, but {envs[active[0]].name} gives none; "
                                 "use exploration.action_mode: generate")
            replies = _score_actions(model, tokenizer, prompts, cands, settings, generator)
        else:
            replies = _generate(model, tokenizer, prompts, settings, stats)
        for s, reply in zip(active, replies):
            st = slots[s]
            result = envs[s].step(reply)
            stats.agent_steps += 1
            st["turns"] += 1
            st["messages"].append({"role": "assistant", "content": reply})
            st["reward"] = result.reward
            st["success"] = bool(result.success)
            if result.done or st["turns"] >= settings.max_turns:
                finish_slot(s)
            else:
                st["messages"].append({"role": "user", "content": result.observation})
    stats.seconds = time.perf_counter() - start
    return [results[i] for i in range(len(task_ids))], stats
