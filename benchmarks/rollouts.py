"""Rollout throughput: batched (continuous batching + per-slot prefix KV cache) vs one episode at a time.

Both runs use the same model, the same tasks, the same engine and greedy decoding, so they do exactly the same
agent work (the test suite proves batched and one-at-a-time greedy trajectories are identical); only the batch
size differs. Prints a table, and with ``--json`` a last line of JSON:

    python benchmarks/rollouts.py --json
    python benchmarks/rollouts.py --model tiny-llama --env wordle --episodes 16 --batch-size 16
    python benchmarks/rollouts.py --action-mode constrained   (or score: the environment's valid actions)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import add_model_options, model_config, offline_torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--env", default="maze", help="environment (its test task ids are used)")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-context-tokens", type=int, default=1024)
    ap.add_argument("--sample", action="store_true", help="temperature-1.0 sampling instead of greedy")
    ap.add_argument("--action-mode", default="generate", choices=["generate", "score", "constrained"])
    args = ap.parse_args(argv)
    torch = offline_torch(args.threads)

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.rollout import RolloutSettings, run_episodes
    from fedse_secure.config import LoraSettings
    from fedse_secure.envs import make_env

    t0 = time.perf_counter()
    agent = AgentModel.load(model_config(args), LoraSettings(), seed=0)
    load_s = time.perf_counter() - t0
    probe = make_env(args.env)
    tasks = list(probe.test_task_ids())[: args.episodes]
    if len(tasks) < args.episodes:
        tasks = [tasks[i % len(tasks)] for i in range(args.episodes)]

    def run(batch_size: int):
        settings = RolloutSettings(
            max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, greedy=not args.sample,
            temperature=1.0, batch_size=batch_size, max_context_tokens=args.max_context_tokens,
            action_mode=args.action_mode,
        )
        trajs, stats = run_episodes(agent.model, agent.tokenizer, lambda: make_env(args.env), tasks, settings, seed=0)
        return {
            "seconds": round(stats.seconds, 3), "episodes": stats.episodes, "agent_steps": stats.agent_steps,
            "generated_tokens": stats.generated_tokens, "forward_batches": stats.generate_calls,
            "steps_per_s": stats.agent_steps / stats.seconds, "tokens_per_s": stats.generated_tokens / stats.seconds,
            "successes": sum(t.success for t in trajs),
        }, trajs

    # Warm-up (allocator, kernels, tokenizer caches) so neither measured run pays one-off costs.
    run_episodes(agent.model, agent.tokenizer, lambda: make_env(args.env), tasks[:1],
                 RolloutSettings(max_turns=1, max_new_tokens=4, greedy=True, batch_size=1))
    batched, b_trajs = run(args.batch_size)
    sequential, s_trajs = run(1)
    result = {
        "model": args.model, "env": args.env, "episodes": args.episodes, "batch_size": args.batch_size,
        "action_mode": args.action_mode,
        "max_turns": args.max_turns, "max_new_tokens": args.max_new_tokens,
        "decoding": "sample" if args.sample else "greedy", "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "model_load_s": round(load_s, 2),
        "batched": batched, "sequential": sequential,
        "batched_steps_per_s": round(batched["steps_per_s"], 4),
        "sequential_steps_per_s": round(sequential["steps_per_s"], 4),
        "batched_tokens_per_s": round(batched["tokens_per_s"], 2),
        "sequential_tokens_per_s": round(sequential["tokens_per_s"], 2),
        "ratio": round(batched["steps_per_s"] / sequential["steps_per_s"], 3),
        "tokens_ratio": round(batched["tokens_per_s"] / sequential["tokens_per_s"], 3),
        "identical_trajectories": (not args.sample) and [t.messages for t in b_trajs] == [t.messages for t in s_trajs],
    }
    print(f"{'mode':<12}{'steps':>7}{'tokens':>8}{'seconds':>9}{'steps/s':>9}{'tokens/s':>10}")
    for name, r in (("batched", batched), ("sequential", sequential)):
        print(f"{name:<12}{r['agent_steps']:>7}{r['generated_tokens']:>8}{r['seconds']:>9.1f}"
              f"{r['steps_per_s']:>9.3f}{r['tokens_per_s']:>10.1f}")
    print(f"ratio (batched / sequential steps/s): {result['ratio']:.2f}x; identical greedy trajectories: "
          f"{result['identical_trajectories']}; load average {result['load_average_1m']:.1f} on {os.cpu_count()} cores")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
