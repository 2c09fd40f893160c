"""Trajectories in the chat format that both the expert oracles and the agent produce and SFT consumes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One episode: ``messages`` = system prompt, then alternating user (observation) / assistant turns.

    Assistant turns are ``"Thought: ...\\nAction: ..."``; training puts loss on assistant tokens only.
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
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def content_key(self) -> str:
        """Identity for de-duplication: the environment, task and exact conversation."""
        payload = json.dumps([self.env, self.task_id, self.messages], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls(**json.loads(line))
