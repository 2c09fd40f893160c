"""Per-institution (ε, δ) budget: refuse a round *before* training if its projected cost would exceed it.

The check composes the ledger's recorded events with the round's projected event under the configured
accountant, at the smaller of the configured δ and the smallest δ the ledger recorded (a promise made at a
smaller δ is never loosened afterwards). ε does not add up across rounds (composition is sub-additive), so the
"cost" of a round is reported as the increase it causes in the composed ε, next to the ε it would cost on its
own. The recorded and the projected ε come from one pass of the accountant (:meth:`Accountant.curve`).

The check alone does not stop two runs on one ledger from both passing it before either appends: the privacy
mechanism holds the ledger's lock (:meth:`PrivacyLedger.reserve`) from the check until after the append.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedse_secure.config import PrivacyConfig
from fedse_secure.errors import FedseError
from fedse_secure.privacy.accountants import get_accountant
from fedse_secure.privacy.events import DpEvent
from fedse_secure.privacy.ledger import LedgerCorruptedError, PrivacyLedger


@dataclass(frozen=True)
class BudgetCheck:
    accountant: str
    delta: float
    budget: float | None  # None: no budget configured (the check only reports)
    spent: float  # composed ε of the ledger's events
    projected_total: float  # composed ε after the projected round
    round_cost: float  # projected_total - spent
    round_alone: float  # ε of the projected round on its own
    projected_event: DpEvent

    @property
    def remaining(self) -> float:
        return math.inf if self.budget is None else max(0.0, self.budget - self.spent)

    @property
    def affordable(self) -> bool:
        return self.budget is None or self.projected_total <= self.budget


class BudgetExceededError(FedseError, RuntimeError):
    """A round was refused before training because it would exceed the privacy budget."""

    exit_code = 3

    def __init__(self, check: BudgetCheck, institution: str | None = None):
        self.check = check
        who = f"institution {institution!r}: " if institution else ""
        e = check.projected_event
        super().__init__(
            f"{who}privacy budget exceeded, round refused before training. Budget epsilon={check.budget:g} at "
            f"delta={check.delta:g} ({check.accountant.upper()} accountant); spent so far {check.spent:.4f}, "
            f"remaining {check.remaining:.4f}; this round would cost {check.round_cost:.4f} "
            f"(total {check.projected_total:.4f}; {check.round_alone:.4f} on its own) for {e.describe()}. "
            "Fix: stop here, or raise privacy.noise_multiplier, lower training.epochs_per_round / "
            "max_steps_per_round, or plan a larger budget (see `fedse privacy plan`)."
        )


class BudgetGuard:
    """Checks projected rounds against ``privacy.epsilon_budget`` using the events in ``ledger``."""

    def __init__(self, ledger: PrivacyLedger, privacy: PrivacyConfig, institution: str | None = None):
        self.ledger = ledger
        self.privacy = privacy
        self.institution = institution

    def check(self, projected_event: DpEvent) -> BudgetCheck:
        """Projected cost of a round (never raises for an unaffordable round; see ``ensure_affordable``)."""
        if not isinstance(projected_event, DpEvent):
            raise TypeError(f"projected_event must be a DpEvent, got {type(projected_event).__name__}")
        try:
            entries = self.ledger.entries()
        except LedgerCorruptedError as err:
            # An unverifiable ledger cannot tell how much was spent; training on would risk overspending.
            raise LedgerCorruptedError(err.report) from None
        p = self.privacy
        delta = min([p.delta, *(e.delta for e in entries if e.delta is not None)])
        acc = get_accountant(p.accountant)
        spent, total = acc.curve([[e.event for e in entries], [projected_event]], delta)
        alone = acc.epsilon([projected_event], delta)
        return BudgetCheck(
            accountant=p.accountant, delta=delta, budget=p.epsilon_budget, spent=spent, projected_total=total,
            round_cost=total - spent, round_alone=alone, projected_event=projected_event,
        )

    def ensure_affordable(self, projected_event: DpEvent) -> BudgetCheck:
        """Raise ``BudgetExceededError`` (ledger untouched) if the round would exceed the budget."""
        check = self.check(projected_event)
        if not check.affordable:
            raise BudgetExceededError(check, self.institution)
        return check
