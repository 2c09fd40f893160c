"""A learning signal: the tiny random Llama, trained with LoRA on Maze oracle demonstrations, solves held-out
start positions that it could not solve before.

The setup, and why (each choice was measured; the numbers are in issue #4's note):

* Score mode. The tiny model's embeddings and final norm are random and frozen (only LoRA trains), so greedy
  free-text generation of a whole "Thought ... Action ..." turn is out of reach for a 3M-parameter model in a
  CPU-test budget. Ranking the four valid moves only needs the right move to score highest. The
  demonstrations are rewritten into the format score mode ranks (``as_score_format``).
* LoRA on the LM head too: with frozen random embeddings the output layer cannot otherwise be steered
  (the loss went only 10.8 -> 9.8 without it).
* A memoryless agent (``history_turns=0``): a Maze observation is the whole state (goal, position, walls), and
  the full history puts the start position of an unseen episode into every prompt. With the whole
  conversation as context the same budget solved 1/12 held-out starts; with the window, 7/12. Training uses
  one example per turn with exactly the prompt the agent acts on (``encode_for_training``).

* No rules in the first observation (``prompt_file`` with an empty preamble). AgentGym's Maze client opens the
  first observation with its rules and a worked example (about 450 tokens); a memoryless agent sees them on its
  first turn only, so 13 of the 23 distinct training examples would be five times longer than the others and
  every padded batch with them (training cost grew about fivefold, past the test's time budget). What is
  measured here is learning the move from the observation, which the rules do not change.

Train on AgentGym's even-numbered Maze starts, evaluate greedily on the 12 odd ones.
"""

from __future__ import annotations

import time

import pytest
import torch

from fedse_secure.agent.policy import AgentModel
from fedse_secure.agent.rollout import RolloutSettings, as_score_format, run_episodes
from fedse_secure.agent.sft import encode_for_training, train_lora
from fedse_secure.config import LoraSettings, ModelConfig, TrainingConfig
from fedse_secure.envs import generate_demonstrations, make_env

TRAIN_STARTS = list(range(0, 25, 2))
HELD_OUT_STARTS = list(range(1, 25, 2))
HISTORY_TURNS = 0


@pytest.fixture(scope="module")
def maze_options(tmp_path_factory):
    path = tmp_path_factory.mktemp("maze") / "prompt.json"
    path.write_text('{"preamble": ""}')
    return {"prompt_file": str(path)}
CONTEXT_BUDGET = 1024 - 48  # the rollout's: max_context_tokens - max_new_tokens


def _greedy_successes(agent, starts, options, fold_adapter: bool | None = None) -> int:
    settings = RolloutSettings(max_turns=15, greedy=True, batch_size=len(starts), action_mode="score",
                               history_turns=HISTORY_TURNS)
    trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env("maze", **options), starts, settings,
                            fold_adapter=fold_adapter)
    assert [t.task_id for t in trajs] == starts
    return sum(t.success for t in trajs)


@pytest.mark.slow
def test_maze_demos_teach_the_tiny_model(maze_options):
    old_threads = torch.get_num_threads()
    torch.set_num_threads(min(2, old_threads))
    try:
        start = time.perf_counter()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(r=8, alpha=16, target_modules=targets),
                                seed=0)
        demos = [as_score_format(t) for t in generate_demonstrations("maze", TRAIN_STARTS, **maze_options)]
        assert len(demos) == len(TRAIN_STARTS) and all(t.success for t in demos)
        examples = encode_for_training(agent.tokenizer, demos, 1024, HISTORY_TURNS, CONTEXT_BUDGET)
        # 102 turns, 23 distinct (state, move) pairs: the states the 13 training paths pass through.
        assert 15 <= len(examples) < sum(t.num_turns for t in demos)

        before = _greedy_successes(agent, HELD_OUT_STARTS, maze_options)
        cfg = TrainingConfig(learning_rate=1e-2, lr_schedule="cosine", epochs_per_round=10_000, max_steps_per_round=800,
                             batch_size=8, max_seq_len=1024)
        stats = train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=0)
        after = _greedy_successes(agent, HELD_OUT_STARTS, maze_options)
        # The same adapter folded into the base weights, as rollouts play on a GPU (its head is tied to the
        # embedding: a fold of the head once made this 0/12).
        after_folded = _greedy_successes(agent, HELD_OUT_STARTS, maze_options, fold_adapter=True)
        elapsed = time.perf_counter() - start
        late_loss = sum(stats.losses[-20:]) / 20
        print(f"maze held-out greedy successes: before {before}/12, after {after}/12 ({after_folded}/12 folded); "
              f"loss {stats.losses[0]:.3f} -> {late_loss:.3f}; {elapsed:.0f} s")
        assert late_loss < 0.05 * stats.losses[0]  # measured 10.75 -> 0.015
        assert before <= 1  # measured 0/12
        # Measured 7/12 after training; 5 leaves room for float-order differences on other CPUs.
        assert after >= 5 and after >= before + 4, f"trained model solved {after}/12 held-out starts, untrained {before}/12"
        assert abs(after_folded - after) <= 1, f"folded {after_folded}/12 against {after}/12 unfolded"
    finally:
        torch.set_num_threads(old_threads)
