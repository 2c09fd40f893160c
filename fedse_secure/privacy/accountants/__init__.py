"""Accountants: what a composition of DP events costs in (ε, δ), in the shape of dp-accounting's
``PrivacyAccountant`` (``supports`` an event, ``epsilon`` of a composition). Events say what happened
(``privacy.events``); an accountant says what it costs. Each module here registers one accountant with
``@ACCOUNTANTS.register(name)`` (``privacy.accountant`` in a config); reports are keyed by these names.

Every accountant also gives the **curve** — ε after each round, composed — in one pass over the events
(:meth:`Accountant.curve`), so a report or a budget check costs about one composition, not one per round.
Events of one composition are accounted under one neighbouring relation: ``replace-one`` as soon as any of
them was recorded under it (the larger, conservative cost), else ``add-remove``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import ClassVar

from fedse_secure.errors import FedseError
from fedse_secure.privacy.events import DpEvent
from fedse_secure.registry import Registry

#: (noise_multiplier, sample_rate, steps): the history form Opacus's accountants take.
History = list[tuple[float, float, int]]


class AccountingError(FedseError, RuntimeError):
    """An accountant could not compute ε for these events; the message says which and what to try."""


class Accountant(ABC):
    name: ClassVar[str]
    #: How it is shown to a reader (plots, tables).
    title: ClassVar[str]
    #: A cheaper registered accountant that is never tighter than this one: planning brackets the noise
    #: multiplier with its answer first (None: bracket by doubling).
    bracket_with: ClassVar[str | None] = None
    #: Neighbouring relations this accountant can account for.
    relations: ClassVar[tuple[str, ...]] = ("add-remove",)

    def supports(self, event: DpEvent) -> bool:
        """Whether this accountant can account for ``event`` (Gaussian, optionally Poisson-subsampled, under a
        relation it knows)."""
        return event.mechanism in ("gaussian", "subsampled_gaussian") and event.neighbouring in self.relations

    def epsilon(self, events: Iterable[DpEvent], delta: float) -> float:
        """ε of the composition of ``events`` at ``delta``: 0 for no events, ``inf`` if a step had no noise."""
        return self.curve([list(events)], delta)[0]

    def curve(self, rounds: Sequence[Sequence[DpEvent]], delta: float) -> list[float]:
        """ε of the composition of ``rounds[0..i]`` for every i, computed in one pass."""
        check_delta(delta)
        rounds = [list(r) for r in rounds]
        flat = [e for r in rounds for e in r]
        unsupported = [e for e in flat if not self.supports(e)]
        relation = composition_relation(flat)
        if unsupported or (relation not in self.relations and flat):
            bad = unsupported[0] if unsupported else flat[0]
            raise AccountingError(
                f"the {self.name} accountant does not support {bad.describe()} (it accounts "
                f"{', '.join(self.relations)}); choose another privacy.accountant"
            )
        histories = [opacus_history(r) for r in rounds]
        # A step without noise releases its input in the clear: ε is infinite from that round on.
        cut = next((i for i, h in enumerate(histories) if any(sigma == 0.0 for sigma, _, _ in h)), len(histories))
        head = histories[:cut]
        values: list[float] = []
        if any(head):
            with warnings.catch_warnings():
                # Opacus warns when the optimal RDP order is at the edge of the grid, and PRV's q=1 case divides
                # by zero inside a masked np.where; neither changes the (valid, upper-bound) result.
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                values = [float(v) for v in self._curve(head, delta, relation)]
        else:
            values = [0.0] * len(head)
        values = [math.inf if math.isnan(v) else max(0.0, v) for v in values]
        return values + [math.inf] * (len(histories) - cut)

    @abstractmethod
    def _curve(self, histories: Sequence[History], delta: float, relation: str) -> list[float]:
        """ε after each prefix of ``histories`` (all noisy; a prefix without steps yet costs 0)."""


def composition_relation(events: Iterable[DpEvent]) -> str:
    """The relation a composition is accounted under: replace-one if any event was recorded under it."""
    return "replace-one" if any(e.neighbouring == "replace-one" for e in events) else "add-remove"


def check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1); a typical value is 1e-5 or below 1/records")


def opacus_history(events: Iterable[DpEvent]) -> History:
    """Opacus accountant history: (noise_multiplier, sample_rate, steps), merging runs of identical settings."""
    history: History = []
    for event in events:
        if not isinstance(event, DpEvent):
            raise TypeError(f"expected DpEvent, got {type(event).__name__}")
        if event.is_noop:
            continue
        if history and history[-1][0] == event.noise_multiplier and history[-1][1] == event.sample_rate:
            sigma, q, steps = history[-1]
            history[-1] = (sigma, q, steps + event.steps)
        else:
            history.append((float(event.noise_multiplier), float(event.sample_rate), int(event.steps)))
    return history


ACCOUNTANTS: Registry[type[Accountant]] = Registry("accountant", __name__)


def get_accountant(name: str) -> Accountant:
    return ACCOUNTANTS.get(name)()


__all__ = ["ACCOUNTANTS", "Accountant", "AccountingError", "History", "check_delta", "composition_relation",
           "get_accountant", "opacus_history"]
