"""Trajectories in the chat format that both the expert oracles and the agent produce and SFT consumes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def conversation_head(messages: Sequence[dict[str, str]]) -> int:
    """How many messages precede the agent's first own turn.

    AgentGym's layout opens with the instruction (user) and its fixed "OK" (assistant), then the first observation:
    3. A system prompt and the first observation: 2. A bare chat that starts with the observation: 1. The "OK" is
    context, never a target.
    """
    roles = [m["role"] for m in messages[:3]]
    if roles[:1] == ["system"]:
        return 2
    if roles == ["user", "assistant", "user"]:
        return 3
    return 1


@dataclass
class Trajectory:
    """One episode: ``messages`` = the conversation start (instruction, "OK"), the first observation, then
    alternating assistant (agent) and user (observation) turns.

    Agent turns are ``"Thought:\\n...\\n\\nAction:\\n..."``; training puts loss on the agent's turns only.
    """

    env: str
    task_id: int
    messages: list[dict[str, str]]
    reward: float
    success: bool
    #: "expert" (oracle seed demonstration) or "explore" (the agent's own rollout).
    source: str = "explore"
    #: Federation round that produced it; -1 for seed demonstrations.
    round: int = -1
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        """The agent's turns (the "OK" of the conversation start is not one)."""
        head = conversation_head(self.messages)
        return sum(1 for m in self.messages[head:] if m["role"] == "assistant")

    def content_key(self) -> str:
        """Identity for de-duplication: the environment, task and exact conversation."""
        payload = json.dumps([self.env, self.task_id, self.messages], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls(**json.loads(line))
