"""The expert oracles' success on the test tasks: ``fedse envs check`` (whole test sets, or a config's own).

Test sets are never filtered by what the oracle can do, so the oracle's success is the ceiling an agent can be
measured against. ``check_oracles`` runs it over each environment's test set at the paper's turn limits;
``check_config`` runs it under a config's turn limit on the test tasks that config evaluates, beside the ceiling at
the paper's limits on the same tasks, so that no config evaluates under a cap the expert cannot meet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedse_secure.envs.base import Oracle, TextEnv

#: The oracle's success on each full test set at the paper's turn limits (measured; a floor against regressions).
#: BabyAI: 19 of its first 90 tasks need more than 20 AgentGym actions with a 7x7 view or defeat minigrid's
#: BabyAIBot; TextCraft: 5 of its 100 test goals need more than 20 actions even with the expert plan.
THRESHOLDS: dict[str, float] = {"babyai": 0.78, "webshop": 1.0, "textcraft": 0.95, "maze": 1.0, "wordle": 1.0}
#: A config's turn limit must leave the oracle at least this success on its test tasks, or the ceiling at the
#: paper's limits where that is lower.
CONFIG_BAR = 0.95


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


def _episode(timed: _Timed, oracle: Oracle, task_id: int, max_turns: int) -> bool:
    env = timed.env
    observation = timed.reset(task_id)
    oracle.reset(env, task_id)
    for _ in range(max_turns):
        result = timed.step(oracle.act(env, observation))
        if result.done:
            return result.success
        observation = result.observation
    return False


def oracle_success(env_name: str, tasks: Iterable[int], env_options: dict[str, Any] | None = None,
                   max_turns: int | None = None,
                   on_task: Callable[[str, int, int], None] | None = None) -> dict[str, float | int]:
    """``{"tasks", "max_turns", "oracle_success", "steps_per_s"}`` of ``env_name``'s oracle on ``tasks``.

    ``max_turns`` (default: the environment's own) is passed to the environment too, so its own turn cap agrees.
    ``steps_per_s`` counts ``reset`` and ``step`` time only, so it measures the environment, not the oracle.
    """
    from fedse_secure.envs import make_env, make_oracle

    options = dict(env_options or {})
    if max_turns is not None:
        options["max_turns"] = max_turns
    env, oracle = make_env(env_name, **options), make_oracle(env_name)
    tasks = list(tasks)
    timed = _Timed(env)
    solved = 0
    for i, task_id in enumerate(tasks):
        solved += _episode(timed, oracle, task_id, env.max_turns)
        if on_task is not None:
            on_task(env_name, i + 1, len(tasks))
    return {
        "tasks": len(tasks),
        "max_turns": env.max_turns,
        "oracle_success": round(solved / len(tasks), 4) if tasks else 0.0,
        "steps_per_s": round(timed.steps / timed.seconds, 1) if timed.seconds > 0 else 0.0,
    }


def check_oracles(
    env_names: Iterable[str] | None = None,
    limit: int | None = None,
    on_task: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, float | int]]:
    """``{env: {"tasks", "max_turns", "oracle_success", "steps_per_s"}}`` over each test set at the paper's
    limits; ``limit`` checks only the first ``limit`` test tasks. ``on_task(env, done, total)`` after every task."""
    from fedse_secure.envs import make_env, oracle_environments

    names = list(env_names) if env_names is not None else oracle_environments()
    report = {}
    for name in names:
        tasks = list(make_env(name).test_task_ids())
        report[name] = oracle_success(name, tasks[:limit] if limit is not None else tasks, on_task=on_task)
    return report


def failures(report: dict[str, dict[str, float | int]]) -> list[str]:
    """One line per environment whose oracle success is below its floor."""
    return [
        f"{name}: oracle success {row['oracle_success']:.2%} is below the required {THRESHOLDS[name]:.0%}"
        for name, row in report.items()
        if name in THRESHOLDS and row["oracle_success"] < THRESHOLDS[name] - 1e-9
    ]


def check_config(experiment, on_task: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Per client with a local oracle: the oracle's success at the config's turn limit on the test tasks the
    config evaluates (``oracle_success``), its success at the paper's limit on the same tasks (``ceiling``) and
    the bar the first must reach (``required``: ``CONFIG_BAR``, or the ceiling where that is lower).

    Keys are environment names, or client names where several clients share an environment. Clients without a
    local oracle (a remote AgentGym server) are reported with ``"oracle": None``.
    """
    from fedse_secure.envs import ENVIRONMENTS, make_env

    envs = [c.env for c in experiment.clients]
    report: dict[str, dict[str, Any]] = {}
    for client in experiment.clients:
        key = client.env if envs.count(client.env) == 1 else client.name
        if ENVIRONMENTS.get(client.env).oracle_class is None:
            report[key] = {"env": client.env, "oracle": None}
            continue
        probe = make_env(client.env, **client.env_options)
        tasks = list(probe.test_task_ids())
        if experiment.evaluation.test_tasks:
            tasks = tasks[: experiment.evaluation.test_tasks]
        limit = experiment.exploration.max_turns or probe.max_turns
        options = {k: v for k, v in client.env_options.items() if k != "max_turns"}
        at_limit = oracle_success(client.env, tasks, options, limit, on_task)
        full = oracle_success(client.env, tasks, options, type(probe).max_turns) if limit < type(probe).max_turns \
            else at_limit
        required = min(CONFIG_BAR, full["oracle_success"])
        report[key] = {
            "env": client.env, "tasks": at_limit["tasks"], "max_turns": limit,
            "oracle_success": at_limit["oracle_success"], "paper_max_turns": type(probe).max_turns,
            "ceiling": full["oracle_success"], "required": required,
        }
    return report


def config_failures(report: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{key}: the oracle solves {row['oracle_success']:.0%} of the {row['tasks']} test tasks at max_turns "
        f"{row['max_turns']} (at least {row['required']:.0%} required; {row['ceiling']:.0%} at the paper's "
        f"{row['paper_max_turns']}); raise exploration.max_turns or leave it unset"
        for key, row in report.items()
        if "oracle_success" in row and row["oracle_success"] < row["required"] - 1e-9
    ]
