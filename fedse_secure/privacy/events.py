"""What a round released, as data: the DP event.

An event describes the mechanism that touched the private data (a Poisson-subsampled Gaussian mechanism run
``steps`` times), not the ε it cost. ε depends on the accountant and on δ; storing the event lets a reviewer
recompute ε later with any accountant (Opacus RDP/PRV here, Google's dp-accounting as a cross-check), which is
what dp-accounting's ``DpEvent`` algebra is designed for.

Two kinds of events occur in this project:

* ``level="record"`` — DP-SGD on one institution's trajectories: per-trajectory clipping at ``clipping_bound``,
  Poisson sampling with rate ``sample_rate``, Gaussian noise of std ``noise_multiplier * clipping_bound`` on
  each of ``steps`` noisy gradient sums. The privacy unit is one trajectory.
* ``level="client"`` — client-level DP: the institution's whole round update is clipped to ``clipping_bound``
  and the securely aggregated sum carries Gaussian noise of std ``noise_multiplier * clipping_bound``; one
  release per round (``sample_rate=1``, ``steps=1``). The privacy unit is the institution's whole data set.

A client-level guarantee implies the same record-level guarantee (changing one trajectory changes one
institution's data set), so the two kinds may be composed; the result is then a record-level bound.

Every event also names the **neighbouring relation** its guarantee is stated for: ``add-remove`` (one record is
added or removed: the data set's size changes, so the record count must stay private for the guarantee to mean
what it says) or ``replace-one`` (one record is replaced by another: the size is fixed and may be public). The
same mechanism costs more ε under ``replace-one``; accountants that cannot account for a relation say so
(:meth:`fedse_secure.privacy.accountants.Accountant.supports`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fedse_secure.errors import FedseError

MECHANISMS = ("subsampled_gaussian", "gaussian")
LEVELS = ("record", "client")
RELATIONS = ("add-remove", "replace-one")
Relation = Literal["add-remove", "replace-one"]


class EventError(FedseError, ValueError):
    """A DP event record is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class DpEvent:
    """One privacy-relevant release: the Gaussian mechanism (optionally Poisson-subsampled) run ``steps`` times.

    ``sample_rate=1`` means every record takes part in every step (no amplification by sampling); the
    mechanism is then named ``gaussian``.
    """

    mechanism: Literal["subsampled_gaussian", "gaussian"]
    level: Literal["record", "client"]
    noise_multiplier: float
    sample_rate: float
    steps: int
    clipping_bound: float
    # Size of the data set the sample rate refers to (records for DP-SGD, clients for client-level DP).
    population: int | None = None
    #: The neighbouring relation the guarantee is stated for (see the module docstring).
    neighbouring: Relation = "add-remove"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise EventError(f"mechanism {self.mechanism!r} is unknown; use one of {MECHANISMS}")
        if self.level not in LEVELS:
            raise EventError(f"level {self.level!r} is unknown; use one of {LEVELS}")
        for name in ("noise_multiplier", "sample_rate", "clipping_bound"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise EventError(f"{name}={value!r} must be a finite number")
        if self.noise_multiplier < 0:
            raise EventError(f"noise_multiplier={self.noise_multiplier} is negative; use a value >= 0")
        if not 0.0 < self.sample_rate <= 1.0:
            raise EventError(f"sample_rate={self.sample_rate} must lie in (0, 1]")
        if self.clipping_bound <= 0:
            raise EventError(f"clipping_bound={self.clipping_bound} must be positive")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise EventError(f"steps={self.steps!r} must be a whole number >= 0")
        if self.mechanism == "gaussian" and self.sample_rate != 1.0:
            raise EventError("mechanism 'gaussian' has no subsampling; set sample_rate=1 or use 'subsampled_gaussian'")
        if self.population is not None and (not isinstance(self.population, int) or self.population < 1):
            raise EventError(f"population={self.population!r} must be a positive whole number or null")
        if self.neighbouring not in RELATIONS:
            raise EventError(f"neighbouring={self.neighbouring!r} is unknown; use one of {RELATIONS}")

    @property
    def is_noop(self) -> bool:
        """No step ran, so nothing was released and the event costs no privacy."""
        return self.steps == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DpEvent:
        if not isinstance(data, dict):
            raise EventError(f"a DP event must be a JSON object, got {type(data).__name__}")
        fields = {"mechanism", "level", "noise_multiplier", "sample_rate", "steps", "clipping_bound", "population",
                  "neighbouring"}
        unknown = set(data) - fields
        # Version-1 ledgers wrote no relation: their ε was always computed for add/remove-one.
        missing = fields - {"population", "neighbouring"} - set(data)
        if unknown or missing:
            raise EventError(f"DP event fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
        return cls(**data)

    def to_dp_accounting(self):
        """The same event in Google's dp-accounting algebra (needs the ``audit`` extra: dp-accounting)."""
        try:
            import dp_accounting
        except ModuleNotFoundError:  # pragma: no cover - depends on the environment
            raise ModuleNotFoundError(
                "cross-checking with Google's accountant needs dp-accounting; install it with "
                "`pip install 'fedse-secure[audit]'`"
            ) from None
        inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sample_rate < 1.0:
            inner = dp_accounting.PoissonSampledDpEvent(self.sample_rate, inner)
        return dp_accounting.SelfComposedDpEvent(inner, self.steps)

    def describe(self) -> str:
        return (
            f"{self.level}-level {self.mechanism}: sigma={self.noise_multiplier:g}, q={self.sample_rate:.6g}, "
            f"steps={self.steps}, C={self.clipping_bound:g}, {self.neighbouring}"
        )
