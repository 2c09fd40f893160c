"""The agent's pieces on the tiny random Llama: label masking, history fitting, buffer, LoRA-only training,
and batched rollouts that match one-episode-at-a-time generation exactly (padding and KV-cache correctness)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fedse_secure.agent.buffer import ExperienceBuffer
from fedse_secure.agent.policy import AgentModel
from fedse_secure.agent.rollout import RolloutSettings, fit_history, run_episodes
from fedse_secure.agent.sft import (
    IGNORE_INDEX,
    collate_examples,
    encode_for_training,
    encode_messages,
    encode_trajectory,
    freeze_matching,
    train_lora,
)
from fedse_secure.config import ConfigError, LoraSettings, ModelConfig, TrainingConfig
from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.maze import MazeEnv
from fedse_secure.envs.trajectory import Trajectory


@pytest.fixture(scope="module")
def agent(threads):
    return AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(), seed=0)


@pytest.fixture
def tok(agent):
    return agent.tokenizer


CHAT = [
    {"role": "system", "content": "You move in a maze."},
    {"role": "user", "content": "You are at 1, 1."},
    {"role": "assistant", "content": "Thought: go down\nAction: move down"},
    {"role": "user", "content": "You are at 2, 1."},
    {"role": "assistant", "content": "Thought: again\nAction: move down"},
]


def test_labels_cover_exactly_the_assistant_turns(tok):
    ex = encode_messages(tok, CHAT, max_seq_len=4096)
    full = tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    # The encoding is the chat template's tokenisation (what the model sees when it acts) ...
    assert ex.input_ids == full[: len(ex.input_ids)]
    # ... and the targets decode to the two assistant turns, each followed by its end-of-turn token, nothing else.
    spans, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [tok.decode(s) for s in spans]
    assert texts == [m["content"] + tok.eos_token for m in CHAT if m["role"] == "assistant"]
    assert ex.num_target_tokens == sum(len(s) for s in spans)
    # Nothing of the system prompt or the observations is a target.
    assert "maze" not in tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_agentgym_layout_ok_turn_is_context(tok):
    """AgentGym's conversation start: the instruction as a user turn answered "OK" (``loss: False`` there)."""
    chat = [{"role": "user", "content": "You move in a maze."},
            {"role": "assistant", "content": "OK. I'll follow your instructions."}] + CHAT[1:]
    ex = encode_messages(tok, chat, max_seq_len=4096)
    targets = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "OK" not in targets and targets.count("move down") == 2


def test_truncation_drops_whole_turns(tok):
    full = encode_messages(tok, CHAT, max_seq_len=4096)
    first_only = encode_messages(tok, CHAT[:3], max_seq_len=4096)
    cut = encode_messages(tok, CHAT, max_seq_len=len(full.input_ids) - 1)
    # The second action does not fit: the example ends after the first, never inside an action.
    assert cut.input_ids == first_only.input_ids and cut.labels == first_only.labels
    assert cut.labels[-1] != IGNORE_INDEX


def test_collate_right_pads(tok):
    a = encode_messages(tok, CHAT[:3], 4096)
    b = encode_messages(tok, CHAT, 4096)
    ids, att, labels = collate_examples([a, b], tok.pad_token_id)
    assert ids.shape == att.shape == labels.shape == (2, len(b.input_ids))
    assert int(att[0].sum()) == len(a.input_ids) and bool((labels[0, len(a.input_ids):] == IGNORE_INDEX).all())


def test_fit_history_keeps_head_and_latest_turns():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "TASK"}]
    for i in range(10):
        msgs += [{"role": "assistant", "content": f"A{i}"}, {"role": "user", "content": f"O{i}"}]
    count = lambda text: 10  # noqa: E731
    kept = fit_history(msgs, budget=10 * 7, count=count)
    # head (2 messages) + two (assistant, user) pairs = 60 tokens; a third pair would need 80.
    assert [m["content"] for m in kept] == ["S", "TASK", "A8", "O8", "A9", "O9"]
    roles = [m["role"] for m in kept]
    assert all(a != b for a, b in zip(roles[1:], roles[2:]))  # user/assistant still alternate
    assert fit_history(msgs, budget=10**6, count=count) == msgs
    # Even a tiny budget keeps the instructions, the task and the latest action and observation.
    assert [m["content"] for m in fit_history(msgs, budget=1, count=count)] == ["S", "TASK", "A9", "O9"]
    assert fit_history(msgs[:2], budget=1, count=count) == msgs[:2]


def test_fit_history_agentgym_layout():
    """The head is the instruction, its "OK" and the first observation; a memoryless agent keeps the instruction
    and its "OK" with the current observation."""
    msgs = [{"role": "user", "content": "I"}, {"role": "assistant", "content": "OK"}, {"role": "user", "content": "T"}]
    for i in range(5):
        msgs += [{"role": "assistant", "content": f"A{i}"}, {"role": "user", "content": f"O{i}"}]
    count = lambda text: 10  # noqa: E731
    assert [m["content"] for m in fit_history(msgs, budget=10 * 7, count=count)] == ["I", "OK", "T", "A3", "O3",
                                                                                     "A4", "O4"]
    assert [m["content"] for m in fit_history(msgs, budget=10**6, count=count, max_pairs=0)] == ["I", "OK", "O4"]
    assert [m["content"] for m in fit_history(msgs, budget=10**6, count=count, max_pairs=1)] == ["I", "OK", "T",
                                                                                                 "A4", "O4"]


def _traj(task_id, action="move up", source="explore", round_id=1):
    return Trajectory(env="maze", task_id=task_id, reward=1.0, success=True, source=source, round=round_id,
                      messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "o"},
                                {"role": "assistant", "content": f"Action: {action}"}])


def test_buffer_dedup_and_persistence(tmp_path):
    path = tmp_path / "inst" / "buffer.jsonl"
    buf = ExperienceBuffer(path)
    assert buf.add([_traj(1, source="expert", round_id=-1), _traj(2)]) == 2
    # Identical content is not added twice, even with another round/source; a different action is new.
    assert buf.add([_traj(1, round_id=3), _traj(2), _traj(2, action="move down", round_id=2)]) == 1
    assert len(buf) == 3 and buf.counts() == {"expert": 1, "explore": 2}
    reopened = ExperienceBuffer(path)
    assert [t.content_key() for t in reopened] == [t.content_key() for t in buf]
    assert [(t.round, t.source) for t in reopened] == [(-1, "expert"), (1, "explore"), (2, "explore")]
    assert [t.task_id for t in reopened.items(round_id=2)] == [2]
    assert reopened.add([_traj(1)]) == 0
    assert len(path.read_text().splitlines()) == 3
    assert all(json.loads(line)["source"] for line in path.read_text().splitlines())


def test_train_lora_changes_only_lora(agent):
    demos = generate_demonstrations("maze", [30, 31, 32, 33])
    examples = [encode_trajectory(agent.tokenizer, t, 512) for t in demos]
    initial_adapter = agent.adapter_state()
    before = {n: p.detach().clone() for n, p in agent.model.named_parameters()}
    trainable = {n for n, p in agent.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cfg = TrainingConfig(learning_rate=1e-2, epochs_per_round=1, batch_size=2)
    stats = train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=0)
    assert stats.steps == 2 and all(torch.isfinite(torch.tensor(stats.losses)))
    changed = {n for n, p in agent.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    assert not agent.model.training  # left in eval mode for rollouts
    # FFA-LoRA: with A frozen, only B moves.
    frozen = freeze_matching(agent.model, r"lora_A")
    try:
        snap = {n: p.detach().clone() for n, p in agent.model.named_parameters()}
        train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=1)
        moved = {n for n, p in agent.model.named_parameters() if not torch.equal(p, snap[n])}
        assert moved and all("lora_B" in n for n in moved)
    finally:
        for n, p in agent.model.named_parameters():
            if n in frozen:
                p.requires_grad_(True)
    agent.load_adapter_state(initial_adapter)


def test_lora_on_top_layers_only_adapts_them_and_backward_stops_below(threads):
    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(top_layers=1), seed=0)
    blocks = agent.model.base_model.model.model.layers
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in agent.model.named_parameters() if p.requires_grad}
    assert adapted == {str(len(blocks) - 1)}
    # The same linear layers as all-linear, in the top block only.
    full = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(), seed=0)
    top = f".layers.{len(blocks) - 1}."
    assert {n for n, p in agent.model.named_parameters() if p.requires_grad} == {
        n for n, p in full.model.named_parameters() if p.requires_grad and top in n}
    # No block below the adapted one is in the autograd graph, so the backward pass never runs through it.
    seen = []
    hook = blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    try:
        examples = [encode_trajectory(agent.tokenizer, t, 512) for t in generate_demonstrations("maze", [30, 31])]
        stats = train_lora(agent.model, examples, TrainingConfig(learning_rate=1e-2, epochs_per_round=1,
                                                                 batch_size=2), agent.tokenizer.pad_token_id, seed=0)
    finally:
        hook.remove()
    assert stats.steps == 1 and seen and not any(seen)
    assert agent.peft_config()["layers_to_transform"] == [len(blocks) - 1]
    with pytest.raises(ConfigError, match="exceeds the 2 transformer blocks"):
        AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(top_layers=3), seed=0)


def test_frozen_lower_blocks_run_once_per_example_and_train_exactly_as_without_the_cache(threads, monkeypatch):
    from fedse_secure.agent import sft

    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(top_layers=1), seed=0)
    agent.load_adapter_state(_perturbed(agent, scale=0.05))
    start = agent.adapter_state()
    blocks = agent.model.base_model.model.model.layers
    # Examples of different lengths in batches of 3: right padding and the cached rows must line up.
    examples = encode_for_training(agent.tokenizer, generate_demonstrations("maze", [30]), 1024, 0, 1000)[:6]
    assert len({len(e.input_ids) for e in examples}) > 2
    cfg = TrainingConfig(learning_rate=1e-2, epochs_per_round=2, batch_size=3)
    lower_calls = []
    hook = blocks[0].register_forward_hook(lambda *_: lower_calls.append(1))
    try:
        cached = [train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=0).losses
                  for _ in range(2)]
        after_cached = agent.adapter_state()
        assert len(lower_calls) == len(examples)  # once per example, across steps, epochs and calls
        prefix = sft.frozen_prefix(agent.model)
        assert prefix.split == 1 and prefix.cached_bytes > 0

        agent.load_adapter_state(start)
        monkeypatch.setattr(sft, "frozen_prefix", lambda _model: None)
        plain = [train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=0).losses for _ in range(2)]
    finally:
        hook.remove()
    assert len(lower_calls) > len(examples)  # the plain path runs the lower block at every step
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    # Adam turns float noise in near-zero gradients into visible steps: compare the whole update, not entries.
    after_plain = agent.adapter_state()
    change = torch.cat([(after_plain[k] - start[k]).flatten() for k in start])
    gap = torch.cat([(after_cached[k] - after_plain[k]).flatten() for k in start])
    assert float(change.norm()) > 0 and float(gap.norm()) <= 1e-3 * float(change.norm())
    # A cache with no room gives the same hidden states as one that keeps them.
    tiny = sft.FrozenPrefix(prefix.decoder, prefix.split, max_bytes=0)
    assert torch.equal(tiny.hidden(examples[0]), prefix.hidden(examples[0])) and tiny.cached_bytes == 0
    # The cache lives and dies with its model: it must not keep a model (and its cached hidden states) alive.
    import gc
    import weakref

    model = weakref.ref(agent.model)
    del agent, prefix, tiny
    gc.collect()
    assert model() is None


@pytest.mark.parametrize("top_layers", [None, 1])
def test_a_prefix_every_row_shares_runs_once_and_trains_as_one_pass_over_the_batch(threads, top_layers):
    from fedse_secure.agent import sft

    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(top_layers=top_layers), seed=0)
    agent.load_adapter_state(_perturbed(agent, scale=0.05))
    agent.model.train()
    # Memoryless turns of one task: the same system prompt and task, then each turn's own observation and action.
    examples = encode_for_training(agent.tokenizer, generate_demonstrations("maze", [30]), 1024, 0, 1000)[1:5]
    ids, mask, labels = collate_examples(examples, agent.tokenizer.pad_token_id)
    shared = sft.shared_prefix_length(ids, mask)
    assert shared >= sft.MIN_SHARED_PREFIX and len({len(e.input_ids) for e in examples}) > 1
    frozen = sft.frozen_prefix(agent.model)
    assert (frozen is None) == (top_layers is None)
    top_block = agent.model.base_model.model.model.layers[-1]
    positions = []
    hook = top_block.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[0] * args[0].shape[1]))
    params = [p for p in agent.model.parameters() if p.requires_grad]
    try:
        loss = sft.target_token_loss(agent.model, ids, mask, labels, frozen, examples)
        grads = torch.autograd.grad(loss, params)
        assert sum(positions) == shared + len(examples) * (ids.shape[1] - shared)  # the prefix ran once
        positions.clear()
        plain_loss = sft.target_token_loss(agent.model, ids, mask, labels, frozen, examples, share_prefix=False)
        plain_grads = torch.autograd.grad(plain_loss, params)
        assert sum(positions) == ids.numel()
    finally:
        hook.remove()
        agent.model.eval()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # One row, or rows that share nothing: nothing to share.
    assert sft.shared_prefix_length(ids[:1], mask[:1]) == 0


def test_no_frozen_prefix_where_a_lower_block_trains_or_is_random():
    from fedse_secure.agent.sft import frozen_block_count, frozen_prefix

    every_block = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(), seed=0)
    assert frozen_prefix(every_block.model) is None
    top = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(top_layers=1), seed=0)
    decoder = top.model.base_model.model.model
    assert frozen_block_count(decoder) == 1
    decoder.config.attention_dropout = 0.1  # a lower pass that is random in train mode cannot be kept
    assert frozen_block_count(decoder) == 0


def _perturbed(agent, scale=0.3, seed=0):
    """A non-zero adapter, so the LoRA path is exercised in every forward."""
    gen = torch.Generator().manual_seed(seed)
    state = agent.adapter_state()
    return {k: (torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v) for k, v in state.items()}


@pytest.mark.parametrize("env_name", ["maze", "wordle", "textcraft"])
def test_batched_greedy_equals_one_at_a_time(agent, env_name):
    agent.load_adapter_state(_perturbed(agent))
    tasks = [0, 3, 1, 4, 2]  # more tasks than slots: slots are refilled mid-run (continuous batching)
    runs = {}
    for bs in (3, 1):
        settings = RolloutSettings(max_turns=3, max_new_tokens=12, greedy=True, batch_size=bs, max_context_tokens=512)
        trajs, stats = run_episodes(agent.model, agent.tokenizer, lambda: make_env(env_name), tasks, settings)
        runs[bs] = trajs
        assert stats.episodes == len(tasks) and stats.agent_steps == sum(t.num_turns for t in trajs)
        assert 0 < stats.generated_tokens <= stats.agent_steps * 12
    assert [t.task_id for t in runs[3]] == tasks
    assert [t.messages for t in runs[3]] == [t.messages for t in runs[1]]


def test_first_reply_matches_hf_generate(agent):
    agent.load_adapter_state(_perturbed(agent, seed=1))
    env = make_env("maze")
    settings = RolloutSettings(max_turns=1, max_new_tokens=10, greedy=True, batch_size=1)
    trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0], settings)
    chat = [*env.conversation_start(), {"role": "user", "content": env.reset(0)}]
    enc = agent.tokenizer(agent.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                          return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = agent.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=agent.tokenizer.pad_token_id)
    expected = agent.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert trajs[0].messages[3]["content"] == expected


def test_sampling_is_seeded_and_score_mode_picks_valid_actions(agent):
    agent.load_adapter_state(_perturbed(agent, seed=2))
    s = RolloutSettings(max_turns=2, max_new_tokens=8, temperature=1.0, batch_size=2)
    a, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 1], s, seed=5)
    b, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 1], s, seed=5)
    c, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 1], s, seed=6)
    assert [t.messages for t in a] == [t.messages for t in b]
    assert [t.messages for t in a] != [t.messages for t in c]
    score = RolloutSettings(max_turns=3, max_new_tokens=8, greedy=True, batch_size=2, action_mode="score")
    trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 1], score)
    for t in trajs:
        for m in t.messages[3::2]:
            assert m["content"].split("Action:\n")[1] in ("move up", "move down", "move left", "move right")


class _NoActions(MazeEnv):
    def valid_actions(self):
        return None


@pytest.mark.parametrize("mode", ["score", "constrained"])
def test_modes_that_need_valid_actions_refuse_an_env_without(agent, mode):
    settings = RolloutSettings(max_turns=1, max_new_tokens=4, greedy=True, batch_size=1, action_mode=mode)
    with pytest.raises(ValueError, match=f"action_mode '{mode}' needs valid actions"):
        run_episodes(agent.model, agent.tokenizer, _NoActions, [0], settings)


@pytest.mark.parametrize("env_name", ["babyai", "webshop", "textcraft", "maze", "wordle"])
@pytest.mark.parametrize("mode", ["score", "constrained"])
def test_action_modes_run_everywhere_and_act_validly(agent, env_name, mode):
    """Score and constrained modes on all five environments: every action is valid, the reply keeps AgentGym's
    ReAct layout, and batched decoding equals one-at-a-time decoding."""
    agent.load_adapter_state(_perturbed(agent, seed=4))
    # Score mode runs every candidate with the whole prompt (hundreds of rows in TextCraft): fewer turns there.
    if mode == "constrained":
        tasks, turns = [0, 2, 1], 3
    else:
        tasks, turns = [0, 1], 1 if env_name in ("textcraft", "wordle") else 2
    runs = {}
    for bs in (2, 1):
        settings = RolloutSettings(max_turns=turns, max_new_tokens=10, greedy=True, batch_size=bs,
                                   max_context_tokens=2048, action_mode=mode)
        runs[bs], _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env(env_name), tasks, settings)
    assert [t.messages for t in runs[2]] == [t.messages for t in runs[1]]
    for t in runs[2]:
        assert t.info["invalid_actions"] == 0
        for m in t.messages[3::2]:
            assert re.fullmatch(r"(?s).*Action:\n[^\n]+", m["content"]), m["content"]
            if mode == "constrained":
                assert m["content"].count("Action:") == 1


def test_constrained_sampling_stays_valid(agent):
    agent.load_adapter_state(_perturbed(agent, seed=5))
    settings = RolloutSettings(max_turns=4, max_new_tokens=12, temperature=1.0, batch_size=3,
                               max_context_tokens=2048, action_mode="constrained")
    for env_name in ("webshop", "textcraft"):
        trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env(env_name), [0, 1, 2], settings, seed=3)
        assert all(t.info["invalid_actions"] == 0 for t in trajs)


def test_candidate_scores_equal_unpadded_log_likelihood(agent):
    from fedse_secure.agent.rollout import SCORE_TEMPLATE, candidate_log_likelihoods

    agent.load_adapter_state(_perturbed(agent, seed=3))
    tok = agent.tokenizer
    prompts = ["<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\na much longer prompt with many more words in it<|im_end|>\n<|im_start|>assistant\n"]
    cands = [["move up", "move down"], ["move left", "move right", "inventory"]]
    got = candidate_log_likelihoods(agent.model, tok, prompts, cands)
    for prompt, cs, scores in zip(prompts, cands, got):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        for a, score in zip(cs, scores):
            c = tok(SCORE_TEMPLATE.format(action=a), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(agent.model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            direct = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
            assert float(score) == pytest.approx(direct, abs=1e-3)


def test_action_constraint_allows_exactly_the_valid_actions(tok):
    """The trie and the slot grammar, without a model: every valid action can be decoded, and any walk through
    the allowed tokens ends in a valid action."""
    import random

    from fedse_secure.agent.constrained import ACTION_LEAD, SLOT_MAX_TOKENS, ActionConstraint, token_vocabulary
    from fedse_secure.envs.base import ActionSpace

    vocab = token_vocabulary(tok)
    space = ActionSpace(literals=("go to red ball 1", "go to red ball 10", "turn left"), slots=(("search[", "]"),))
    eos = tok.eos_token_id
    for action in ("go to red ball 1", "go to red ball 10", "turn left", "search[red shoes]"):
        c = ActionConstraint(vocab, space, eos)
        for token in tok("Action:" + ACTION_LEAD + action, add_special_tokens=False)["input_ids"][2:]:
            assert not c.finished and bool(c.mask()[token]), (action, tok.decode([token]))
            c.advance(token)
        if not c.finished:  # "go to red ball 1" could continue as "... 10": the end-of-turn token closes it
            assert bool(c.mask()[eos])
            c.advance(eos)
        assert c.finished
    rng = random.Random(0)
    for _ in range(30):
        c, text = ActionConstraint(vocab, space, eos), ""
        for _ in range(c.max_tokens):
            allowed = c.mask().nonzero().flatten().tolist()
            token = rng.choice(allowed)
            c.advance(token)
            text += "" if token == eos else vocab.texts[token]
            if c.finished:
                break
        assert c.finished and text.startswith(ACTION_LEAD) and space.accepts(text[len(ACTION_LEAD):]), text
    # A search argument as long as a slot may be: only the closing bracket is left.
    c = ActionConstraint(vocab, space, eos)
    letter = tok("a", add_special_tokens=False)["input_ids"][0]
    for token in tok("Action:\nsearch[", add_special_tokens=False)["input_ids"][2:] + [letter] * SLOT_MAX_TOKENS:
        c.advance(token)
    assert int(c.mask().sum()) == 1 and bool(c.mask()[tok("]", add_special_tokens=False)["input_ids"][0]])


def test_packed_scores_equal_the_reference_with_and_without_cached_prefixes(agent):
    """All candidates of a prompt in one row (4D mask, restarted positions), the prompt's prefix from a cache or the
    shared template: the same log-likelihoods as scoring every candidate on its own full row."""
    from fedse_secure.agent.rollout import (
        SCORE_TEMPLATE,
        RolloutStats,
        _SlotCache,
        _Template,
        candidate_log_likelihoods,
        packed_log_likelihoods,
    )

    agent.load_adapter_state(_perturbed(agent, seed=4))
    tok = agent.tokenizer
    system = "<|im_start|>system\nYou are in a maze; answer with a move.<|im_end|>\n"
    turns = [["<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\na much longer observation with many more words in it<|im_end|>\n<|im_start|>assistant\n"],
             ["<|im_start|>user\nthe next state<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\nanother state, also new<|im_end|>\n<|im_start|>assistant\n"]]
    cands = [["move up", "move down"], ["move left", "move right", "inventory"]]
    caches, template, stats = [_SlotCache(), _SlotCache()], _Template(), RolloutStats()
    for step in turns:
        prompts = [system + t for t in step]
        want = candidate_log_likelihoods(agent.model, tok, prompts, cands)
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        cand_ids = [[tok(SCORE_TEMPLATE.format(action=a), add_special_tokens=False)["input_ids"] for a in c]
                    for c in cands]
        got = packed_log_likelihoods(agent.model, tok, ids, cand_ids, caches, template, stats)
        for w, g in zip(want, got):
            assert torch.allclose(w, g, atol=2e-3), (w, g)
    # The second step reused every token of the shared system prompt from the caches.
    system_len = len(tok(system, add_special_tokens=False)["input_ids"])
    assert stats.reused_tokens >= 2 * system_len and len(template.ids) >= system_len



def test_rollouts_benchmark_runs_every_section_and_reports_its_figures(repo_root):
    """The benchmark behind the README's rollout figures, at the smallest size: the limit probe, score mode against
    its reference on the very steps the engine took, and batched against one-at-a-time generation, free and
    constrained."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "rollouts.py"), "--model", "tiny-llama", "--episodes", "2",
         "--batch-size", "2", "--generate-batch-size", "2", "--generate-turns", "1", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600, cwd=repo_root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["matmul_gflops"] > 0 and 0 < result["limit_fraction"]
    assert result["score"]["agent_steps"] > 0 and result["score_speedup_vs_reference"] > 0
    for mode in ("generate", "constrained"):
        assert result[mode]["identical_trajectories"] is True and result[mode]["batched"]["limit_fraction"] > 0


def test_learning_curve_benchmark_trains_in_chunks_and_evaluates_after_each(repo_root):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "learning_curve.py"), "--model", "tiny-llama", "--env", "maze",
         "--option", "prompt_file=configs/prompts/maze-without-rules.json", "--memoryless", "--demos", "2",
         "--eval-tasks", "2", "--chunk-steps", "2", "--chunks", "2", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600, cwd=repo_root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["steps"] for p in result["curve"]] == [0, 2, 4]
    assert all(p["tasks"] == 2 and 0 <= p["successes"] <= 2 for p in result["curve"])
    assert result["curve"][0]["loss"] is None and all(0 < p["loss"] < 100 for p in result["curve"][1:])
    bad = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "learning_curve.py"), "--option", "catalogue"],
                         capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert bad.returncode != 0 and "is not KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
