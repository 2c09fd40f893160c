"""Invalid-action rate of the agent per action mode: constrained decoding against free generation.

The untrained default model (SmolLM2-135M-Instruct) plays the first ``--episodes`` test tasks of each environment
greedily, at the environment's own turn limit or ``--max-turns``, once per mode, in the same run. An action is invalid when the
environment says so (``StepResult.info["invalid"]``: not parseable, or not an action of the current state). In
constrained mode the thought is free and the action is decoded under the environment's valid actions, so its rate
must be 0; free generation shows what the constraint removes. Success rates are printed beside the oracle's
ceiling on the same tasks.

    .venv/bin/python benchmarks/action_modes.py --json [--episodes 20] [--env maze ...] [--modes constrained]
                                                [--max-turns 6]

Once a conversation outgrows ``--max-context-tokens`` its window shifts every turn and the whole window is
encoded again (the prefix cache only keeps the head), so on a CPU the paper's 10-20 turns cost hours here;
``--max-turns`` caps the episodes for a quicker figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import add_model_options, offline_torch

ENVS = ("babyai", "webshop", "textcraft", "maze", "wordle")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--env", action="append", choices=ENVS, help="environment(s) (default: all five)")
    ap.add_argument("--modes", nargs="+", default=["constrained", "generate"], choices=["constrained", "generate"])
    ap.add_argument("--episodes", type=int, default=20, help="first test tasks per environment")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="reply budget (constrained: the thought's)")
    ap.add_argument("--max-context-tokens", type=int, default=1024)
    ap.add_argument("--max-turns", type=int, default=None, help="turn cap (default: each environment's own)")
    args = ap.parse_args(argv)
    torch = offline_torch(args.threads)

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.rollout import RolloutSettings, run_episodes
    from fedse_secure.config import LoraSettings, ModelConfig
    from fedse_secure.envs import make_env
    from fedse_secure.envs.check import oracle_success

    agent = AgentModel.load(ModelConfig(name_or_path=args.model), LoraSettings(), seed=0)
    results: dict = {}
    for name in args.env or ENVS:
        probe = make_env(name)
        tasks = list(probe.test_task_ids())[: args.episodes]
        turns = args.max_turns or probe.max_turns
        row = {"tasks": len(tasks), "max_turns": turns,
               "oracle_success": oracle_success(name, tasks, max_turns=turns)["oracle_success"]}
        for mode in args.modes:
            settings = RolloutSettings(max_turns=turns, max_new_tokens=args.max_new_tokens, greedy=True,
                                       batch_size=args.batch_size, max_context_tokens=args.max_context_tokens,
                                       action_mode=mode)
            start = time.perf_counter()
            trajs, stats = run_episodes(agent.model, agent.tokenizer, lambda: make_env(name), tasks, settings)
            invalid = sum(t.info["invalid_actions"] for t in trajs)
            row[mode] = {
                "agent_steps": stats.agent_steps, "invalid_actions": invalid,
                "invalid_rate": round(invalid / stats.agent_steps, 4) if stats.agent_steps else 0.0,
                "successes": sum(t.success for t in trajs), "seconds": round(time.perf_counter() - start, 1),
            }
            print(f"{name:10s} {mode:12s} steps {stats.agent_steps:5d}  invalid {invalid:5d} "
                  f"({row[mode]['invalid_rate']:.1%})  successes {row[mode]['successes']}/{len(tasks)} "
                  f"(oracle {row['oracle_success']:.0%})  {row[mode]['seconds']:.0f} s", flush=True)
        results[name] = row
    summary = {
        "model": args.model, "episodes_per_env": args.episodes, "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0], "envs": results,
    }
    for mode in args.modes:
        steps = sum(r[mode]["agent_steps"] for r in results.values())
        summary[f"{mode}_invalid_rate"] = round(sum(r[mode]["invalid_actions"] for r in results.values()) / steps, 4)
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
