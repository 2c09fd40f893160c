"""The environment interface every institution's private environment implements.

Text observation in, text action out (AgentGym style). A task id fully determines an episode, so the same task
id and the same actions always give the same observations and rewards. Environments never raise on malformed
model output: a lenient parser extracts the action, and an unparseable action yields the environment's own
"invalid action" observation.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)


_ACTION_RE = re.compile(r"Action\s*:", re.IGNORECASE)


def extract_action(text: str) -> str:
    """AgentGym-style lenient parse: the text after the last ``Action:``, first non-empty line, stripped.

    Without an ``Action:`` marker the first non-empty line of the whole text is used, so a bare ``move up``
    still works.
    """
    matches = list(_ACTION_RE.finditer(text))
    tail = text[matches[-1].end() :] if matches else text
    for line in tail.splitlines():
        line = line.strip().strip("`").strip()
        if line:
            return line
    return ""


class TextEnv(ABC):
    """One episode at a time; see :class:`BatchedEnv` for many in lock-step."""

    name: ClassVar[str]
    #: Turn limit used for exploration and evaluation (the paper's / AgentGym's defaults).
    max_turns: ClassVar[int]

    @abstractmethod
    def system_prompt(self) -> str:
        """The instruction with the action format (AgentGym's prompt for this environment)."""

    @abstractmethod
    def reset(self, task_id: int) -> str:
        """Start the episode fully determined by ``task_id``; return the first observation (task included)."""

    @abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply the model's raw output (parsed leniently). Never raises on malformed actions."""

    def valid_actions(self) -> list[str] | None:
        """The currently valid actions where the environment can enumerate them, else None.

        Each entry is a literal action that ``step`` accepts as is (callers may score them by likelihood).
        """
        return None

    @abstractmethod
    def train_task_ids(self) -> Sequence[int]:
        """Task ids for exploration and expert demonstrations (disjoint from the test ids)."""

    @abstractmethod
    def test_task_ids(self) -> Sequence[int]:
        """Held-out task ids, sized like the paper's test sets."""


class Oracle(ABC):
    """An expert that plays an environment; produces the seed demonstrations (the paper's AgentTraj)."""

    @abstractmethod
    def reset(self, env: TextEnv, task_id: int) -> None:
        """Called right after ``env.reset(task_id)``."""

    @abstractmethod
    def act(self, env: TextEnv, observation: str) -> str:
        """The next assistant message, in the training format ``Thought: ...\\nAction: ...``."""


class BatchedEnv:
    """Many independent episodes stepped together (one environment instance per slot)."""

    def __init__(self, envs: Sequence[TextEnv]):
        if not envs:
            raise ValueError("BatchedEnv needs at least one environment")
        self.envs = list(envs)

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, task_ids: Sequence[int]) -> list[str]:
        if len(task_ids) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} task ids, got {len(task_ids)}")
        return [env.reset(t) for env, t in zip(self.envs, task_ids)]

    def step(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step every slot whose action is not None (finished episodes pass None)."""
        if len(actions) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} actions, got {len(actions)}")
        return [None if a is None else env.step(a) for env, a in zip(self.envs, actions)]
