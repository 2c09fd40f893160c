"""The harness every threat check runs in: which protections are on, what a check returns, and the registry.

Every check takes a :class:`ProtectionSettings` (which protections are switched on) and returns a
:class:`CheckResult`: ``passed`` is True when the attack fails, and ``evidence`` holds the measured numbers.
Switching a protection off (``ProtectionSettings.without("masking")``) must make the checks that rely on it
fail; ``tests/test_threats_checks.py`` proves that for every protection, so no check can pass vacuously.

How a check switches a protection off, always through an explicit seam of the library, never by editing it:

* ``masking`` - the round uses the ``none`` backend (``secure_aggregation: none``) instead of ``masking``;
* ``signatures`` - clients and the server get a public-key registry whose ``verify`` accepts anything;
* ``aead`` - the masking backend gets a share cipher that decrypts without checking the tag
  (``MaskingBackend(aead=...)``);
* ``consistency`` - the masking backend gets a client class without the consistency round's guards
  (``MaskingBackend(client_class=...)``: the semi-honest SecAgg of Bonawitz et al.);
* ``requirements`` - institutions accept whatever setup the coordinator proposes (``MaskingBackend(requirements=
  ...)`` with a requirements object that refuses nothing), and the coordinator proposes the weakest one;
* ``input-auth`` - the coordinator's machine neither checks masked-input tags nor the range of the released sum
  (``MaskingBackend(server_class=...)``);
* ``share-commitments`` - the coordinator's machine rebuilds secrets without the dealers' share commitments
  (``MaskingBackend(server_class=...)``);
* ``dp`` - the released model / update is trained or sent without DP;
* ``ledger-chain`` - the ledger is read as plain JSON lines instead of through ``PrivacyLedger.verify``;
* ``budget`` - rounds run without :class:`~fedse_secure.privacy.BudgetGuard`;
* ``tls`` - the institution connects without verifying the coordinator's certificate;
* ``policy`` - the institution applies the open policy (takes the coordinator's settings);
* ``ledger-lock`` - the budget is checked, then training runs, then the event is appended, without the lock;
* ``export-filter`` - the round report leaves as the institution computed it;
* ``adapter-signature`` - the institution has no coordinator key and its policy does not require signatures;
* ``audit-chain`` - the audit log is read as plain JSON lines instead of through ``AuditLog.verify``.
* ``one-input-per-round`` - the institutions' policies allow a re-run (``secure_aggregation.one_input_per_round:
  false``, the simulation's open default), so each attempt at a round gets their input again.

Checks live in the modules of :mod:`fedse_threat_model.checks`, one per area, and register themselves with
:func:`check`; the attack machinery they share is in :mod:`fedse_threat_model.attacks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedse_secure.registry import Registry
from fedse_threat_model.protections import PROTECTIONS


class UnknownProtectionError(ValueError):
    pass


@dataclass(frozen=True)
class ProtectionSettings:
    """Which protections are on. The default is the compliant configuration (everything on)."""

    disabled: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.disabled) - set(PROTECTIONS))
        if unknown:
            raise UnknownProtectionError(
                f"unknown protection(s) {unknown}; choose from {', '.join(PROTECTIONS)}"
            )

    @classmethod
    def without(cls, *names: str, seed: int = 0) -> ProtectionSettings:
        return cls(disabled=frozenset(names), seed=seed)

    def on(self, name: str) -> bool:
        if name not in PROTECTIONS:
            raise UnknownProtectionError(f"unknown protection {name!r}; choose from {', '.join(PROTECTIONS)}")
        return name not in self.disabled

    @property
    def secure_aggregation(self) -> str:
        return "masking" if self.on("masking") else "none"


@dataclass
class CheckResult:
    passed: bool
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    seconds: float = 0.0


CheckFn = Callable[[ProtectionSettings], CheckResult]
#: Threat checks by function name (``check:`` in threats.yaml), from the modules of fedse_threat_model.checks.
CHECKS: Registry[CheckFn] = Registry("threat check", "fedse_threat_model.checks")


def check(fn: CheckFn) -> CheckFn:
    """Register a threat check under its function name."""
    return CHECKS.register(fn.__name__)(fn)


def run_check(name: str, settings: ProtectionSettings | None = None) -> CheckResult:
    settings = settings or ProtectionSettings()
    if name not in CHECKS:
        raise KeyError(f"no threat check named {name!r}; known: {', '.join(CHECKS.names())}")
    t0 = time.perf_counter()
    result = CHECKS.get(name)(settings)
    result.seconds = time.perf_counter() - t0
    result.disabled = sorted(settings.disabled)
    return result


# -- numbers every check reports ------------------------------------------------------------------------
def rounded(x: float, digits: int = 4) -> float:
    return float(round(float(x), digits))


def updates(names: Iterable[str], size: int, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    """LoRA-delta-sized updates (|values| well inside the default clip range of 8)."""
    rng = np.random.default_rng(seed)
    return {p: rng.normal(0.0, scale, size) for p in names}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else 0.0


def rel_err(est: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(est - x) / max(np.linalg.norm(x), 1e-30))
