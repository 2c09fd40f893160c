"""Environment throughput: steps per second per environment, single and batched.

Action scripts are recorded once from the oracles (not timed); the timed part replays them, so the numbers
measure the environments (reset + step, text rendering, parsing) and not the oracles. "single" plays the
episodes one after another on one environment; "batched" steps ``--batch`` episodes in lock-step through
``BatchedEnv``. Prints one line per environment, or with ``--json`` a final JSON line with all numbers.

    .venv/bin/python benchmarks/envs.py [--json] [--episodes 32] [--batch 16] [--seconds 1] [--env maze ...]

BatchedEnv steps its slots sequentially in one process, so "batched" shows the per-step cost of lock-step
stepping (it is not a parallel speed-up); the model's batched generation is where batching pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def record_scripts(name: str, n: int) -> list[tuple[int, list[str]]]:
    from fedse_secure.envs import make_env, make_oracle
    from fedse_secure.envs.rollout import run_oracle_episode

    env, oracle = make_env(name), make_oracle(name)
    tasks = list(env.test_task_ids())
    scripts = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        traj = run_oracle_episode(env, oracle, task)
        scripts.append((task, [m["content"] for m in traj.messages if m["role"] == "assistant"]))
    return scripts


def time_single(name: str, scripts, min_seconds: float) -> tuple[float, int]:
    from fedse_secure.envs import make_env

    env = make_env(name)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for task, actions in scripts:
            env.reset(task)
            for a in actions:
                steps += 1
                if env.step(a).done:
                    break
    return steps / (time.perf_counter() - start), steps


def time_batched(name: str, scripts, batch: int, min_seconds: float) -> tuple[float, int]:
    from fedse_secure.envs import BatchedEnv, make_env

    envs = BatchedEnv([make_env(name) for _ in range(batch)])
    envs.reset([scripts[0][0]] * batch)  # warm caches outside the timed loop
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for lo in range(0, len(scripts), batch):
            chunk = scripts[lo : lo + batch]
            if len(chunk) < batch:  # pad with repeats so every slot works
                chunk = (chunk * batch)[:batch]
            envs.reset([t for t, _ in chunk])
            live = [True] * batch
            for turn in range(max(len(a) for _, a in chunk)):
                actions = [a[turn] if alive and turn < len(a) else None for (_, a), alive in zip(chunk, live)]
                for i, r in enumerate(envs.step(actions)):
                    if r is None:
                        live[i] = False
                        continue
                    steps += 1
                    if r.done:
                        live[i] = False
                if not any(live):
                    break
    return steps / (time.perf_counter() - start), steps


def main(argv=None) -> int:
    from fedse_secure.envs import oracle_environments

    parser = argparse.ArgumentParser(description="Environment steps per second, single and batched.")
    parser.add_argument("--json", action="store_true", help="end with one JSON line holding every number")
    parser.add_argument("--episodes", type=int, default=32, help="oracle episodes recorded per environment")
    parser.add_argument("--batch", type=int, default=16, help="episodes stepped together in the batched run")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    parser.add_argument("--env", action="append", choices=oracle_environments(), help="environment(s) to time (default all)")
    args = parser.parse_args(argv)
    results = {}
    for name in args.env or oracle_environments():
        scripts = record_scripts(name, args.episodes)
        single, n_single = time_single(name, scripts, args.seconds)
        batched, n_batched = time_batched(name, scripts, args.batch, args.seconds)
        results[name] = {
            "single_steps_per_s": round(single, 1),
            "batched_steps_per_s": round(batched, 1),
            "batch": args.batch,
            "steps_timed": n_single + n_batched,
        }
        print(f"{name:10s} single {single:10.1f} steps/s   batched(x{args.batch}) {batched:10.1f} steps/s", flush=True)
    if args.json:
        meta = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "episodes": args.episodes,
        }
        print(json.dumps({"envs": results, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
