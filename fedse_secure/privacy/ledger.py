"""Per-institution privacy ledger: append-only, hash-chained JSON lines with a sealed head, written atomically
(the chain, the head and the lock are :mod:`fedse_secure.audit.chain`'s; that module says what is detected).

Each line is one DP event (mechanism, neighbouring relation, noise multiplier, sample rate, steps, clipping
bound) with the δ the institution accounts it at, the round, the institution, the UTC time and the chain
fields. ε is deliberately *not* stored: it is recomputed from the events, so a reviewer can check it with any
accountant, and since δ is stored with every event, nobody can make the same ledger look cheaper by choosing
a larger δ afterwards (reports account at the smallest δ recorded).

Budget checks, training and the append happen under the ledger's exclusive lock (:meth:`PrivacyLedger.reserve`),
so concurrent runs on one ledger are serialised and cannot overspend. Each round's head hash leaves the
institution signed (the round attestation), so a deleted, truncated or rewritten ledger is caught by
``verify(expected_heads=...)`` against any head the coordinator recorded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fedse_secure.audit.chain import GENESIS_HASH, ChainedLog, VerificationReport
from fedse_secure.errors import FedseError
from fedse_secure.privacy.events import DpEvent, EventError

FORMAT_VERSION = 2

__all__ = ["FORMAT_VERSION", "GENESIS_HASH", "LedgerCorruptedError", "LedgerEntry", "LedgerError",
           "PrivacyLedger", "VerificationReport"]


class LedgerError(FedseError, RuntimeError):
    """The ledger cannot be used as asked; the message names the file, the line and the fix."""


class LedgerCorruptedError(LedgerError):
    """The ledger failed verification; ``report`` holds the details (first bad line)."""

    def __init__(self, report: VerificationReport):
        super().__init__(report.summary())
        self.report = report


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    round: int
    institution: str
    time: str
    event: DpEvent
    #: δ the institution accounted this event at (None on version-1 lines, which did not record it).
    delta: float | None
    prev_hash: str
    hash: str


class PrivacyLedger(ChainedLog):
    """Append-only DP-event ledger of one institution (``path`` is a ``.jsonl`` file; created on first append)."""

    what = "privacy ledger"
    version = FORMAT_VERSION
    readable_versions = (1, 2)

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self._entries: list[LedgerEntry] = []

    def payload_keys(self, version):
        return {"round", "institution", "time", "event"} | ({"delta"} if version >= 2 else set())

    def _chain_keys(self, version):
        return {"seq", "prev_hash", "hash"} | ({"salt"} if version >= 2 else set())

    def corrupted(self, report):
        return LedgerCorruptedError(report)

    def check_record(self, record, previous):
        try:
            DpEvent.from_dict(record["event"])
        except (EventError, TypeError) as err:
            return f"has an invalid DP event ({err})"
        rnd, inst, when = record["round"], record["institution"], record["time"]
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            return f"round {rnd!r} is not a whole number >= 0"
        if previous is not None and rnd < previous["round"]:
            return f"round {rnd} comes after round {previous['round']}: entries are out of order"
        if not isinstance(inst, str) or not inst:
            return "institution is empty"
        if previous is not None and inst != previous["institution"]:
            return f"belongs to institution {inst!r}, the ledger to {previous['institution']!r}"
        try:
            datetime.fromisoformat(when)
        except (TypeError, ValueError):
            return f"time {when!r} is not an ISO 8601 timestamp"
        delta = record.get("delta")
        if record["v"] >= 2 and (not isinstance(delta, float) or not 0.0 < delta < 1.0):
            return f"delta {delta!r} is not a number in (0, 1)"
        return None

    def verify(self, expected_head: str | None = None, expected_heads: Iterable[str] = ()) -> VerificationReport:
        """Check every line, the chain and the sealed head; every externally recorded head (``expected_head``,
        ``expected_heads``) must be the head of some prefix of the ledger. Never raises for a bad ledger."""
        heads = [*([expected_head] if expected_head is not None else []), *expected_heads]
        report = super().verify(heads)
        self._entries = [self._entry(r) for r in self._records] if report.ok else []
        return report

    @staticmethod
    def _entry(record: dict[str, Any]) -> LedgerEntry:
        return LedgerEntry(record["seq"], record["round"], record["institution"], record["time"],
                           DpEvent.from_dict(record["event"]), record.get("delta"), record["prev_hash"],
                           record["hash"])

    def entries(self) -> list[LedgerEntry]:
        """All entries, after full verification (raises ``LedgerCorruptedError`` naming the first bad line)."""
        report = self.verify()
        if not report.ok:
            raise LedgerCorruptedError(report)
        return list(self._entries)

    def events(self) -> list[DpEvent]:
        return [e.event for e in self.entries()]

    def events_by_round(self) -> list[tuple[int, list[DpEvent]]]:
        """Events grouped by round, in ledger order: ``[(round, [events...]), ...]``."""
        return group_by_round(self.entries())

    def recorded_delta(self) -> float | None:
        """The smallest δ any entry was accounted at (None for an empty or version-1-only ledger)."""
        deltas = [e.delta for e in self.entries() if e.delta is not None]
        return min(deltas) if deltas else None

    # -- writing ----------------------------------------------------------------------------------------------
    def reserve(self):
        """Hold the ledger's exclusive lock across a whole round (budget check, training, append): a concurrent
        run on the same ledger waits, then sees what this one spent."""
        return self.locked()

    def check_round(self, round: int, institution: str) -> None:  # noqa: A002 - public name
        """Refuse (before any training) a round that the ledger cannot take: another institution's ledger, or
        a round before the last recorded one."""
        entries = self.entries()
        if entries:
            last = entries[-1]
            if institution != last.institution:
                raise LedgerError(
                    f"{self.path} is the ledger of {last.institution!r}; use a separate ledger for {institution!r}"
                )
            if round < last.round:
                raise LedgerError(f"{self.path}: round {round} is before the last recorded round {last.round}; a "
                                  "coordinator replaying old rounds is refused before training")

    def append(self, event: DpEvent, round: int, institution: str, delta: float) -> LedgerEntry:  # noqa: A002
        """Append one event for ``round`` of ``institution`` accounted at ``delta``; refuses to extend a ledger
        that fails verification."""
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise ValueError(f"round={round!r} must be a whole number >= 0")
        if not isinstance(institution, str) or not institution:
            raise ValueError("institution must be a non-empty name")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
            raise ValueError(f"delta={delta!r} must lie in (0, 1)")
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.locked())
            self.check_round(round, institution)
            record = self.append_record({
                "round": round, "institution": institution,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "event": event.to_dict(), "delta": float(delta),
            })
        entry = self._entry(record)
        self._entries.append(entry)
        return entry


def group_by_round(entries: Iterable[LedgerEntry]) -> list[tuple[int, list[DpEvent]]]:
    grouped: list[tuple[int, list[DpEvent]]] = []
    for entry in entries:
        if grouped and grouped[-1][0] == entry.round:
            grouped[-1][1].append(entry.event)
        else:
            grouped.append((entry.round, [entry.event]))
    return grouped
