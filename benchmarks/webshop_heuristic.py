"""WebShop's rule baseline on the test goals: how often a crude heuristic succeeds, per catalogue.

The heuristic (``webshop.heuristic_episode``) searches the whole instruction, opens the first hit, clicks every
option value of the item page that the instruction names and buys. On the real WebShop its rule baseline reaches a
9.6% success rate (Yao et al. 2022, Table 2); a catalogue on which it does much better makes the task too easy.
Both catalogues and the expert oracle are measured side by side on the same 200 test goals:

    .venv/bin/python benchmarks/webshop_heuristic.py [--json] [--tasks 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(catalogue: str, tasks: int) -> dict:
    from fedse_secure.envs import make_env, make_oracle
    from fedse_secure.envs.rollout import run_oracle_episode
    from fedse_secure.envs.webshop import heuristic_episode

    env = make_env("webshop", catalogue=catalogue)
    ids = list(env.test_task_ids())[:tasks]
    start = time.perf_counter()
    rewards = [heuristic_episode(env, t) for t in ids]
    heuristic_s = time.perf_counter() - start
    oracle = make_oracle("webshop")
    oracle_wins = sum(run_oracle_episode(env, oracle, t).success for t in ids)
    goals = [env.catalogue.goal(t) for t in ids]
    return {
        "tasks": len(ids),
        "heuristic_success_rate": round(sum(r >= 1.0 - 1e-9 for r in rewards) / len(ids), 4),
        "heuristic_mean_reward": round(sum(rewards) / len(ids), 4),
        "oracle_success_rate": round(oracle_wins / len(ids), 4),
        "attributes_per_goal": [min(len(g.attributes) for g in goals), max(len(g.attributes) for g in goals)],
        "distinct_goal_attributes": len({a for g in goals for a in g.attributes}),
        "products": len(env.catalogue.products),
        "heuristic_seconds": round(heuristic_s, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line holding every number")
    parser.add_argument("--tasks", type=int, default=200, help="test goals per catalogue (default: all 200)")
    args = parser.parse_args(argv)
    results = {name: measure(name, args.tasks) for name in ("realistic", "simple")}
    for name, r in results.items():
        print(f"{name:10s} heuristic success {r['heuristic_success_rate']:6.1%}  mean reward "
              f"{r['heuristic_mean_reward']:.3f}  oracle {r['oracle_success_rate']:6.1%}  attributes/goal "
              f"{r['attributes_per_goal'][0]}-{r['attributes_per_goal'][1]}  distinct {r['distinct_goal_attributes']}")
    results["real_webshop_rule_baseline_success_rate"] = 0.096
    results["ratio_simple_over_realistic"] = round(
        results["simple"]["heuristic_success_rate"] / max(results["realistic"]["heuristic_success_rate"], 1e-9), 2)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
