"""Privacy mechanisms: what an institution does to its data and its update so that a round's release is DP.

A mechanism object owns everything privacy-specific of an institution's round, so the round itself reads as
the paper's four steps with no privacy branches: it **projects** the DP event a round will cost
(:meth:`PrivacyMechanism.project`) and refuses the round before any data is touched if the budget cannot
afford it (:meth:`PrivacyMechanism.open_round`, :meth:`PrivacyMechanism.train`), it **trains** (plain LoRA SFT,
or DP-SGD) and/or **privatises** the payload (:meth:`PrivacyMechanism.release`), and it **records** each
release as a DP event in the institution's ledger. What it costs is the accountants' business
(``privacy.accountants``). Each module here registers one mechanism (``privacy.mode`` in a config).

A private mechanism holds its ledger's lock for the whole round (:meth:`PrivacyMechanism.round`): the round
order and budget checks, training and the append are one critical section, so concurrent runs on one ledger
are serialised and the second sees what the first spent. A DP mechanism run with no noise (which only a node
policy that allows non-private runs lets through) records its events like any other, and is labelled
non-private in every report: its ε is infinite, reported as null next to ``private: false``, never as a number.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedse_secure.errors import FedseError
from fedse_secure.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from fedse_secure.config import ExperimentConfig, PrivacyConfig, TrainingConfig
    from fedse_secure.federation.progress import Progress
    from fedse_secure.privacy.events import DpEvent


class ReleaseRefused(FedseError, ValueError):
    """The mechanism cannot release this round's update as its guarantee requires; nothing left."""


@dataclass(frozen=True)
class ReleaseTerms:
    """What the secure-aggregation backend promises about a released sum (from ``Backend``): client-level DP
    sizes its noise shares for the contributors a sum is guaranteed to hold, and must stay inside the range
    the backend encodes without clipping."""

    min_contributors: int
    value_bound: float | None = None


class PrivacyMechanism:
    """``none``: no DP. Subclasses override what they change; the defaults train plain LoRA and release as is."""

    name: ClassVar[str]
    #: Whether a release under this mechanism carries a DP guarantee (reports label the rest non-private).
    private: ClassVar[bool] = False

    def __init__(self, privacy: PrivacyConfig, ledger_path: str | Path, institution: str,
                 terms: ReleaseTerms) -> None:
        from fedse_secure.privacy.ledger import PrivacyLedger

        self.privacy = privacy
        self.ledger_path = Path(ledger_path)
        self.institution = institution
        self.terms = terms
        self._ledger = PrivacyLedger(self.ledger_path)

    @property
    def non_private(self) -> bool:
        """A DP mechanism configured without noise: it runs only where the node policy allows it, labelled."""
        return self.private and self.privacy.noise_multiplier == 0.0

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def check(cls, experiment: ExperimentConfig) -> None:
        """Raise ``ValueError`` (one line naming the fields and the fix) for a combination this mechanism cannot
        honour. Called when a config is validated."""

    @classmethod
    def project(cls, privacy: PrivacyConfig, training: TrainingConfig, num_records: int) -> DpEvent | None:
        """The DP event one round would record (None: no DP event; nothing is spent)."""
        return None

    # -- the round ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def round(self, round_id: int) -> Iterator[None]:
        """The whole local round under the ledger's lock: round order and budget are checked before any data is
        touched, and nobody else can append between the check and this round's own append."""
        if not self.private:
            yield
            return
        with self._ledger.reserve():
            self._ledger.check_round(round_id, self.institution)
            self.open_round(round_id)
            yield

    def open_round(self, round_id: int) -> None:
        """Called before the round touches any data: refuse it (BudgetExceededError) if it cannot be afforded."""

    def train(self, round_id: int, model, examples: Sequence, training: TrainingConfig, pad_token_id: int,
              seed: int, progress: Progress, label: str) -> dict[str, Any]:
        """Fine-tune the LoRA adapter on ``examples``; the training report (examples, steps, loss)."""
        from fedse_secure.agent.sft import train_lora

        bar = progress.task(f"{label}: train", total=None)
        stats = train_lora(model, examples, training, pad_token_id, seed,
                           on_step=lambda s, total, loss: bar.update(completed=s, total=total, info=f"loss {loss:.3f}"))
        bar.close()
        return {"examples": len(examples), "steps": stats.steps, "loss": stats.mean_loss,
                "target_tokens": stats.target_tokens}

    def release(self, round_id: int, payload: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """What leaves the institution for secure aggregation, and what was done to it."""
        return payload, {}

    # -- the record ---------------------------------------------------------------------------------------------
    def ledger(self):
        return self._ledger

    def ensure_affordable(self, event: DpEvent) -> None:
        """Refuse (BudgetExceededError, ledger untouched) a round whose event would exceed the budget."""
        from fedse_secure.privacy.budget import BudgetGuard

        BudgetGuard(self._ledger, self.privacy, institution=self.institution).ensure_affordable(event)

    def record(self, round_id: int, event: DpEvent) -> None:
        self._ledger.append(event, round=round_id, institution=self.institution, delta=self.privacy.delta)

    def accounting_delta(self) -> float:
        """δ the ledger is accounted at: the configured one, or a smaller one it recorded earlier."""
        recorded = self._ledger.recorded_delta()
        return min(self.privacy.delta, recorded) if recorded is not None else self.privacy.delta

    def epsilon_spent(self) -> float | None:
        """ε spent so far (the configured accountant over the ledger's events); None without DP; ``inf`` once a
        noiseless step was recorded."""
        if not self.private:
            return None
        from fedse_secure.privacy.accounting import epsilon

        events = self._ledger.events()
        return float(epsilon(events, self.accounting_delta(), self.privacy.accountant)) if events else 0.0

    def report(self) -> dict[str, Any]:
        """The privacy section of the institution's round report (strict JSON: no infinities)."""
        if not self.private:
            return {"mechanism": self.name, "private": False}
        spent = self.epsilon_spent()
        finite = spent is not None and math.isfinite(spent)
        report = {"mechanism": self.name, "private": finite, "epsilon_spent": spent if finite else None,
                  "delta": self.accounting_delta(), "accountant": self.privacy.accountant,
                  "neighbouring": self.privacy.neighbouring,
                  "ledger_head": self._ledger.head_hash() if self.ledger_path.exists() else None}
        if not finite:
            report["non_private"] = "a step ran with noise_multiplier 0 (allowed by the node policy): epsilon is infinite"
        return report


MECHANISMS: Registry[type[PrivacyMechanism]] = Registry("privacy mechanism", __name__)


def project_event(num_records: int, training: TrainingConfig, privacy: PrivacyConfig) -> DpEvent:
    """The DP event one round under ``privacy.mode`` would record (for budget checks and planning)."""
    event = MECHANISMS.get(privacy.mode).project(privacy, training, num_records)
    if event is None:
        raise ValueError(f"privacy.mode is {privacy.mode!r}: no DP event is produced and no budget applies; set "
                         "privacy.mode to a DP mechanism (dp-sgd or client-dp) to account for privacy")
    return event


__all__ = ["MECHANISMS", "PrivacyMechanism", "ReleaseRefused", "ReleaseTerms", "project_event"]
