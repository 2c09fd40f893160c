"""Rollouts run on merged weights (fedse_secure/agent/merged.py): same outputs, and the model comes back unchanged."""

from __future__ import annotations

import pytest
import torch

from fedse_secure.agent.merged import merged_adapter
from fedse_secure.agent.policy import AgentModel
from fedse_secure.agent.rollout import RolloutSettings, run_episodes
from fedse_secure.agent.sft import collate_examples, encode_for_training, target_token_loss
from fedse_secure.config import LoraSettings, ModelConfig
from fedse_secure.envs import generate_demonstrations, make_env


def _agent(lora: LoraSettings | None = None, **model) -> AgentModel:
    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama", device="cpu", **model), lora or LoraSettings(),
                            seed=0)
    gen = torch.Generator().manual_seed(0)
    # A trained-looking adapter: lora_B starts at zero, where folding would change nothing.
    agent.load_adapter_state({k: torch.randn(v.shape, generator=gen) * 0.3 if "lora_B" in k else v
                              for k, v in agent.adapter_state().items()})
    return agent


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(agent) -> torch.Tensor:
    ids = agent.tokenizer("Thought: go down\nAction: move down", return_tensors="pt").input_ids
    with torch.no_grad():
        return agent.model(input_ids=ids).logits.float()


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_merged_forward_equals_the_lora_forward(threads):
    agent = _agent(dtype="float32")
    unmerged = _logits(agent)
    with merged_adapter(agent.model) as folded:
        assert folded == len(_lora_layers(agent.model)) > 0
        assert all(layer.merged for layer in _lora_layers(agent.model))
        merged = _logits(agent)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    with agent.model.disable_adapter():
        base_only = _logits(agent)
    assert (merged - base_only).abs().max() > 1e-2  # the adapter matters here, so the fold above is real


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_come_back_bit_for_bit_and_the_lora_path_trains_again(threads, dtype):
    agent = _agent(dtype=dtype)
    before, logits_before = _snapshot(agent.model), _logits(agent)
    settings = RolloutSettings(max_turns=2, max_new_tokens=6, greedy=True, batch_size=2)
    run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0, 1], settings, fold_adapter=True)
    after = _snapshot(agent.model)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not any(layer.merged for layer in _lora_layers(agent.model))
    assert torch.equal(_logits(agent), logits_before)
    # Gradients reach the adapter again: the LoRA path is back, not the folded base.
    example = encode_for_training(agent.tokenizer, generate_demonstrations("maze", [0]), 2048)[:1]
    ids, mask, labels = collate_examples(example, agent.tokenizer.pad_token_id)
    agent.model.train()
    target_token_loss(agent.model, ids, mask, labels).backward()
    agent.model.eval()
    grads = [p.grad for n, p in agent.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_rollouts_fold_by_default_only_on_a_gpu(threads, monkeypatch):
    from fedse_secure.agent import rollout

    agent = _agent(dtype="float32")
    folds = []

    def recording(model):
        folds.append(model)
        return merged_adapter(model)

    monkeypatch.setattr(rollout, "merged_adapter", recording)
    settings = RolloutSettings(max_turns=1, max_new_tokens=4, greedy=True, batch_size=1)
    run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0], settings)
    assert folds == []  # a CPU: decoding is FLOP-bound there, and the fold measured 1.00-1.07x
    run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze"), [0], settings, fold_adapter=True)
    assert folds == [agent.model]


def test_weights_come_back_when_inference_fails(threads):
    agent = _agent(dtype="bfloat16")
    before = _snapshot(agent.model)
    with pytest.raises(RuntimeError, match="env broke"):
        with merged_adapter(agent.model):
            raise RuntimeError("env broke")
    assert all(torch.equal(before[k], v) for k, v in _snapshot(agent.model).items())
    assert not any(layer.merged for layer in _lora_layers(agent.model))


def test_a_disabled_adapter_is_not_folded(threads):
    agent = _agent(dtype="float32")
    with agent.model.disable_adapter():
        base_only = _logits(agent)
        with merged_adapter(agent.model) as folded:
            assert folded == 0
            assert torch.equal(_logits(agent), base_only)


def test_a_4bit_base_keeps_its_lora_path(threads):
    pytest.importorskip("bitsandbytes")
    agent = _agent(quantization="nf4")
    before = _logits(agent)
    with merged_adapter(agent.model) as folded:
        assert folded == 0  # folding into 4-bit weights would round the update away
        assert torch.equal(_logits(agent), before)


def test_a_head_tied_to_the_embedding_keeps_its_lora_path(threads):
    # SmolLM2 and tiny-llama tie lm_head to embed_tokens: folding the head's adapter would move every embedding.
    agent = _agent(LoraSettings(target_modules=["q_proj", "lm_head"]))
    head = agent.model.get_base_model().lm_head
    assert head.base_layer.weight is agent.model.get_base_model().model.embed_tokens.weight
    unfolded = _logits(agent)
    with merged_adapter(agent.model) as folded:
        assert folded == len(_lora_layers(agent.model)) - 1 and not head.merged
        torch.testing.assert_close(_logits(agent), unfolded, rtol=1e-4, atol=1e-4)


def test_the_fold_benchmark_reports_both_paths_and_fewer_operator_calls_folded(repo_root):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "merged_rollouts.py"),
                           "--model", "tiny-llama", "--device", "cpu", "--env", "maze", "--episodes", "2",
                           "--turns", "1", "--max-new-tokens", "4", "--threads", "1", "--json"],
                          capture_output=True, text=True, cwd=repo_root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["merged"]["agent_steps"] == result["unmerged"]["agent_steps"] == 2
    assert result["unmerged_over_merged_time"] > 0
    calls = result["operator_calls_per_decode_step"]
    assert 0 < calls["merged"] < calls["unmerged"]
