"""The coordinator's side of a round, free of any transport: it holds the global adapter, announces rounds and
forms the new global adapter from the *sum* that secure aggregation releases (never from individual updates)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from fedse_secure.aggregation.rules import get_rule
from fedse_secure.errors import FedseError
from fedse_secure.secagg.base import AggregateResult


@dataclass
class RoundStart:
    round_id: int
    global_state: OrderedDict[str, torch.Tensor]


@dataclass
class RoundOutcome:
    round_id: int
    global_state: OrderedDict[str, torch.Tensor]
    survivors: list[str]
    dropped: list[str]
    measurements: dict[str, Any] = field(default_factory=dict)


class RoundStateError(FedseError, RuntimeError):
    """A message arrived that does not fit the coordinator's current state."""


class Coordinator:
    """The global adapter and the aggregation rule (``federation.aggregation``) that updates it from sums."""

    def __init__(self, rule: str, initial_state: OrderedDict[str, torch.Tensor], completed_rounds: int = 0):
        self.rule = get_rule(rule)
        self.global_state = OrderedDict((k, v.clone()) for k, v in initial_state.items())
        #: Rounds whose global adapter has been formed; the next round's id is ``completed_rounds + 1``.
        self.completed_rounds = completed_rounds
        self._open_round: int | None = None

    def begin_round(self) -> RoundStart:
        if self._open_round is not None:
            raise RoundStateError(f"round {self._open_round} is still open; complete or abandon it first")
        self._open_round = self.completed_rounds + 1
        return RoundStart(self._open_round, self.global_state)

    def complete_round(self, result: AggregateResult) -> RoundOutcome:
        if self._open_round is None:
            raise RoundStateError("no round is open")
        round_id = self._open_round
        self.global_state = self.rule.finalize(result.total, len(result.survivors), self.global_state)
        self.completed_rounds = round_id
        self._open_round = None
        return RoundOutcome(round_id, self.global_state, list(result.survivors), list(result.dropped),
                            dict(result.measurements))

    def abandon_round(self) -> None:
        """The round produced no sum (too few survivors): keep the previous global adapter."""
        self._open_round = None
