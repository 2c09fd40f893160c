"""Run every oracle on its environment's test tasks: the `fedse envs check` library function."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedse_secure.envs.base import Oracle, TextEnv

#: Minimum oracle success rate on the test tasks (the issue's acceptance bar). BabyAI's bar is lower because
#: minigrid's BabyAIBot is an imperfect expert; the others are solvable by construction.
THRESHOLDS: dict[str, float] = {"babyai": 0.95, "webshop": 1.0, "textcraft": 1.0, "maze": 1.0, "wordle": 1.0}


@dataclass
class _Timed:
    """Counts environment steps and the wall time spent inside the environment (not in the oracle)."""

    env: TextEnv
    steps: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def reset(self, task_id: int) -> str:
        t = time.perf_counter()
        try:
            return self.env.reset(task_id)
        finally:
            self.seconds += time.perf_counter() - t

    def step(self, action: str):
        t = time.perf_counter()
        try:
            return self.env.step(action)
        finally:
            self.seconds += time.perf_counter() - t
            self.steps += 1


def _episode(timed: _Timed, oracle: Oracle, task_id: int) -> bool:
    env = timed.env
    observation = timed.reset(task_id)
    oracle.reset(env, task_id)
    for _ in range(env.max_turns):
        result = timed.step(oracle.act(env, observation))
        if result.done:
            return result.success
        observation = result.observation
    return False


def check_oracles(
    env_names: Iterable[str] | None = None,
    limit: int | None = None,
    on_task: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, float | int]]:
    """``{env: {"tasks": N, "oracle_success": rate, "steps_per_s": env steps per second}}`` over the test tasks.

    ``steps_per_s`` counts ``reset`` and ``step`` time only, so it measures the environment, not the oracle.
    ``limit`` checks only the first ``limit`` test tasks of each environment. ``on_task(env, done, total)`` is
    called after every task (for progress bars).
    """
    from fedse_secure.envs import make_env, make_oracle, oracle_environments

    names = list(env_names) if env_names is not None else oracle_environments()
    report: dict[str, dict[str, float | int]] = {}
    for name in names:
        env, oracle = make_env(name), make_oracle(name)
        tasks = list(env.test_task_ids())
        if limit is not None:
            tasks = tasks[:limit]
        timed = _Timed(env)
        solved = 0
        for i, task_id in enumerate(tasks):
            solved += _episode(timed, oracle, task_id)
            if on_task is not None:
                on_task(name, i + 1, len(tasks))
        report[name] = {
            "tasks": len(tasks),
            "oracle_success": round(solved / len(tasks), 4) if tasks else 0.0,
            "steps_per_s": round(timed.steps / timed.seconds, 1) if timed.seconds > 0 else 0.0,
        }
    return report


def failures(report: dict[str, dict[str, float | int]]) -> list[str]:
    """One line per environment whose oracle success is below its threshold."""
    return [
        f"{name}: oracle success {row['oracle_success']:.2%} is below the required {THRESHOLDS[name]:.0%}"
        for name, row in report.items()
        if name in THRESHOLDS and row["oracle_success"] < THRESHOLDS[name] - 1e-9
    ]
