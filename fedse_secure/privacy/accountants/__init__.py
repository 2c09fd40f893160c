"""Accountants: what a composition of DP events costs in (ε, δ), in the shape of dp-accounting's
``PrivacyAccountant`` (``supports`` an event, ``epsilon`` of a composition). Events say what happened
(``privacy.events``); an accountant says what it costs. Each module here registers one accountant with
``@ACCOUNTANTS.register(name)`` (``privacy.accountant`` in a config); reports are keyed by these names.
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


class AccountingError(FedseError, RuntimeError):
    """An accountant could not compute ε for these events; the message says which and what to try."""


class Accountant(ABC):
    name: ClassVar[str]
    #: How it is shown to a reader (plots, tables).
    title: ClassVar[str]
    #: A cheaper registered accountant that is never tighter than this one: planning brackets the noise
    #: multiplier with its answer first (None: bracket by doubling).
    bracket_with: ClassVar[str | None] = None

    def supports(self, event: DpEvent) -> bool:
        """Whether this accountant can account for ``event`` (Gaussian, optionally Poisson-subsampled)."""
        return event.mechanism in ("gaussian", "subsampled_gaussian")

    def epsilon(self, events: Iterable[DpEvent], delta: float) -> float:
        """ε of the composition of ``events`` at ``delta``: 0 for no events, ``inf`` if a step had no noise."""
        check_delta(delta)
        events = list(events)
        unsupported = [e for e in events if not self.supports(e)]
        if unsupported:
            raise AccountingError(
                f"the {self.name} accountant does not support {unsupported[0].describe()}; choose another "
                "privacy.accountant"
            )
        history = opacus_history(events)
        if not history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in history):
            return math.inf
        with warnings.catch_warnings():
            # Opacus warns when the optimal RDP order is at the edge of the grid, and PRV's q=1 case divides by
            # zero inside a masked np.where; neither changes the (valid, upper-bound) result.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            eps = float(self._epsilon(history, delta))
        return math.inf if math.isnan(eps) else max(0.0, eps)

    @abstractmethod
    def _epsilon(self, history: Sequence[tuple[float, float, int]], delta: float) -> float:
        """ε of an Opacus history ``[(noise_multiplier, sample_rate, steps), ...]`` (all noisy, non-empty)."""


def check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1); a typical value is 1e-5 or below 1/records")


def opacus_history(events: Iterable[DpEvent]) -> list[tuple[float, float, int]]:
    """Opacus accountant history: (noise_multiplier, sample_rate, steps), merging runs of identical settings."""
    history: list[tuple[float, float, int]] = []
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


__all__ = ["ACCOUNTANTS", "Accountant", "AccountingError", "check_delta", "get_accountant", "opacus_history"]
