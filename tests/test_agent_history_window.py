"""The agent's history window (``model.history_turns``): the prompt it acts on, the per-turn SFT examples built
from exactly that prompt, and the target-only loss that training uses."""

from __future__ import annotations

import pytest
import torch

from fedse_secure.agent.policy import AgentModel
from fedse_secure.agent.rollout import RolloutSettings, TokenCounter, fit_history, prompt_texts, run_episodes
from fedse_secure.agent.sft import (
    IGNORE_INDEX,
    collate_examples,
    encode_for_training,
    encode_trajectory,
    encode_turns,
    target_token_loss,
)
from fedse_secure.config import ConfigError, LoraSettings, ModelConfig
from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.trajectory import conversation_head


@pytest.fixture(scope="module")
def agent():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    targets = ["q_proj", "v_proj", "lm_head"]
    a = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(target_modules=targets), seed=0)
    gen = torch.Generator().manual_seed(3)
    # Non-zero B, so the LoRA path (including the LM head's) contributes to every forward.
    a.load_adapter_state({k: torch.randn(v.shape, generator=gen) * 0.05 if "lora_B" in k else v
                          for k, v in a.adapter_state().items()})
    yield a
    torch.set_num_threads(old)


def _chat(n_turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "obs 0"}]
    for i in range(1, n_turns + 1):
        msgs += [{"role": "assistant", "content": f"act {i}"}, {"role": "user", "content": f"obs {i}"}]
    return msgs


def test_window_keeps_at_most_the_requested_pairs():
    count = len
    msgs = _chat(4)
    assert fit_history(msgs, 10_000, count) == msgs
    assert fit_history(msgs, 10_000, count, max_pairs=2) == msgs[:2] + msgs[-4:]
    assert fit_history(msgs, 10_000, count, max_pairs=1) == msgs[:2] + msgs[-2:]
    # Memoryless: no task, no past action; the observation to answer is always there.
    assert fit_history(msgs, 10_000, count, max_pairs=0) == [msgs[0], msgs[-1]]
    assert fit_history(msgs[:2], 10_000, count, max_pairs=0) == msgs[:2]
    with pytest.raises(ValueError, match="current observation"):
        fit_history(msgs[:3], 10_000, count, max_pairs=0)


@pytest.mark.parametrize("history_turns", [0, 1, 3])
def test_each_turn_example_is_the_prompt_the_agent_sees_plus_its_action(agent, history_turns):
    tok = agent.tokenizer
    traj = generate_demonstrations("maze", [0])[0]
    examples = encode_turns(tok, traj, 1024, history_turns, context_budget=976)
    # The agent's turns: not the "OK" that answers the instruction in AgentGym's layout.
    head = conversation_head(traj.messages)
    turns = [i for i, m in enumerate(traj.messages) if m["role"] == "assistant" and i >= head]
    assert len(examples) == len(turns)
    count = TokenCounter(tok)
    for example, i in zip(examples, turns):
        prompt = prompt_texts(tok, [fit_history(list(traj.messages[:i]), 976, count, history_turns)])[0]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert all(t == IGNORE_INDEX for t in example.labels[: len(prompt_ids)])
        target = tok.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)
        assert target.strip() == traj.messages[i]["content"].strip()
    # Without a window the whole conversation is one example, as before.
    assert len(encode_for_training(tok, [traj], 1024)) == 1
    assert len(encode_for_training(tok, [traj], 1024, history_turns, 976)) == len(turns)


def test_target_only_loss_equals_the_full_head_loss(agent):
    tok = agent.tokenizer
    trajs = generate_demonstrations("maze", [0, 5, 9])
    examples = [encode_trajectory(tok, t, 512) for t in trajs] + encode_turns(tok, trajs[1], 512, 1)[:2]
    ids, mask, labels = collate_examples(examples, tok.pad_token_id)
    expected = agent.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = target_token_loss(agent.model, ids, mask, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # And the gradients the optimiser sees are the same.
    params = [p for p in agent.model.parameters() if p.requires_grad]
    g_expected = torch.autograd.grad(agent.model(input_ids=ids, attention_mask=mask, labels=labels).loss, params)
    g_got = torch.autograd.grad(target_token_loss(agent.model, ids, mask, labels), params)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_memoryless_batched_rollouts_equal_one_at_a_time(agent):
    # A window shifts every turn, so a slot's cached prefix is only the system prompt: the cache must notice.
    runs = {}
    for bs in (3, 1):
        settings = RolloutSettings(max_turns=4, max_new_tokens=10, greedy=True, batch_size=bs, history_turns=0)
        trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 3, 1, 4], settings)
        runs[bs] = [t.messages for t in trajs]
    assert runs[3] == runs[1]


def test_history_window_with_dp_sgd_is_refused():
    from fedse_secure.config import parse_config

    data = {"model": {"name_or_path": "tiny-llama", "history_turns": 0}, "clients": [{"name": "a", "env": "maze"}],
            "federation": {"secure_aggregation": "none"}, "privacy": {"mode": "dp-sgd"}}
    with pytest.raises(ConfigError, match="model.history_turns"):
        parse_config(data)
    data["privacy"]["mode"] = "none"
    assert parse_config(data).model.history_turns == 0


def test_sft_benchmark_runs_and_its_two_losses_agree(repo_root):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "sft.py"), "--model", "tiny-llama", "--blocks", "1",
         "--steps-per-block", "1", "--max-seq-len", "768", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=repo_root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_loss_diff"] < 1e-3
    assert 0 < result["target_token_share"] < 1
    assert result["full_head_step_s"] > 0 and result["target_only_step_s"] > 0
    assert result["top_layers"] == 1 and result["blocks"] == 2 and result["top_layers_step_s"] > 0
    assert result["cached_step_s"] > 0 and result["lower_pass_s_per_example"] > 0 and result["max_cached_loss_diff"] < 1e-3
    assert result["shared_step_s"] > 0 and 0 < result["shared_prefix_share"] < 1 and result["max_shared_loss_diff"] < 1e-3


def test_a_memoryless_federation_trains_on_per_turn_examples(repo_root, tmp_path):
    """The window reaches every part of a run: exploration, per-turn training examples, and evaluation."""
    from fedse_secure.agent.buffer import ExperienceBuffer
    from fedse_secure.config import load_config
    from fedse_secure.federation.run_folder import RunFolder
    from fedse_secure.federation.simulation import simulate

    cfg = load_config(repo_root / "configs" / "smoke.yaml", ["model.history_turns=0", "federation.rounds=1"])
    summary = simulate(cfg, tmp_path / "run")
    assert summary.status == "completed"
    (round_1,) = [r for r in RunFolder(tmp_path / "run").records() if r.status == "completed"]
    assert set(round_1.institutions) == {c.name for c in cfg.clients}
    tok = AgentModel.load(cfg.model, cfg.lora, seed=0).tokenizer
    for name, inst in round_1.institutions.items():
        buffer_file = next((tmp_path / "run" / "institutions" / name).glob("buffer.jsonl"))
        expected = encode_for_training(tok, list(ExperienceBuffer(buffer_file)), cfg.training.max_seq_len, 0,
                                       cfg.model.max_context_tokens - cfg.exploration.max_new_tokens)
        # One example per distinct turn, not one per trajectory.
        assert inst.report["train"]["examples"] == len(expected) > inst.report["explore"]["buffer_size"]
