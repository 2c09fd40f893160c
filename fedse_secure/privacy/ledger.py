"""Per-institution privacy ledger: append-only, hash-chained JSON lines, written atomically.

Each line is one DP event (mechanism, noise multiplier, sample rate, steps, clipping bound) with the round, the
institution, the UTC time, its sequence number, the hash of the previous line and its own hash (SHA-256 of the
canonical JSON of everything else on the line). ε is deliberately *not* stored: it is recomputed from the
events, so a reviewer can check it with any accountant.

What is detected (``verify``):

* an edited line (its hash no longer matches), a deleted or reordered line in the middle (the next line's
  ``prev_hash``/``seq`` no longer matches), a torn or garbled line (not JSON, wrong fields), a line from
  another institution's ledger, rounds going backwards;
* deletion of the **last** line(s), which a hash chain alone cannot see: after every append the ledger seals
  the entry count and head hash in a sidecar ``<ledger>.head`` (written atomically, after the ledger), and
  ``verify`` checks the file against it. A missing sidecar next to a non-empty ledger is an error too.

What is not detected by the files alone: someone who rewrites the ledger *and* the sidecar consistently
(recomputing every hash). Against that, record the head hash somewhere the institution's operator cannot
rewrite (the federation's round log, a signed report, a ticket) and pass it to ``verify(expected_head=...)``
(``fedse privacy verify LEDGER --expect-head HASH``).

Writes are crash-safe: the new ledger is written to a temporary file, fsync'ed and renamed over the old one
(then the directory is fsync'ed), so a crash leaves either the old or the new ledger, never half a line. A crash
between the ledger rename and the sidecar rename leaves a valid entry that is not yet sealed; ``verify`` reports
it as a warning and the next ``append`` seals it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedse_secure.errors import FedseError
from fedse_secure.io_utils import atomic_write_bytes
from fedse_secure.privacy.events import DpEvent, EventError

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
_ENTRY_KEYS = {"v", "seq", "round", "institution", "time", "event", "prev_hash", "hash"}
_HEAD_KEYS = {"v", "entries", "head_hash", "updated"}


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
    prev_hash: str
    hash: str

    def to_record(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "seq": self.seq,
            "round": self.round,
            "institution": self.institution,
            "time": self.time,
            "event": self.event.to_dict(),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass
class VerificationReport:
    path: str
    ok: bool
    entries: int  # lines that passed every check, from the top
    first_bad_line: int | None = None  # 1-based line number of the first problem
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    head_hash: str | None = None  # hash of the last good entry
    sealed_entries: int | None = None  # entry count recorded in the sidecar

    def summary(self) -> str:
        if self.ok:
            text = f"{self.path}: OK, {self.entries} entries, head {self.head_hash or GENESIS_HASH}"
        else:
            where = f" line {self.first_bad_line}" if self.first_bad_line is not None else ""
            text = f"{self.path}:{where}: {self.problem}"
        for w in self.warnings:
            text += f"\n  warning: {w}"
        return text


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _entry_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


class PrivacyLedger:
    """Append-only DP-event ledger of one institution (``path`` is a ``.jsonl`` file; created on first append)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # -- reading ----------------------------------------------------------------------------------------------
    def _read_lines(self) -> list[bytes]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if not data:
            return []
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        else:
            # Our writer always ends with a newline; a missing one means a hand edit or a foreign writer.
            lines.append(None)  # type: ignore[arg-type]  # marker checked in verify
        return lines

    def _read_head(self) -> dict[str, Any] | None | str:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            return f"is not valid JSON ({err})"
        if not isinstance(head, dict) or set(head) != _HEAD_KEYS:
            return f"has fields {sorted(head) if isinstance(head, dict) else type(head).__name__}, expected {sorted(_HEAD_KEYS)}"
        if not isinstance(head["entries"], int) or head["entries"] < 0 or not isinstance(head["head_hash"], str):
            return "has a malformed entry count or head hash"
        return head

    def verify(self, expected_head: str | None = None) -> VerificationReport:
        """Check every line, the chain and the sealed head; never raises for a bad ledger (see the report)."""
        report = VerificationReport(path=str(self.path), ok=True, entries=0)
        self._scan(report)
        if not report.ok:
            return report
        n = report.entries
        head = self._read_head()
        if isinstance(head, str):
            return self._fail(report, None, f"head record {self.head_path} {head}; it cannot be trusted, so "
                              "truncation cannot be ruled out; restore it from a backup")
        if head is None:
            if n > 0:
                return self._fail(report, None, f"head record {self.head_path} is missing, so deletion of the "
                                  "last entries cannot be ruled out; restore it from a backup")
        else:
            sealed = head["entries"]
            report.sealed_entries = sealed
            if sealed > n:
                return self._fail(
                    report, n + 1,
                    f"entries {n + 1}..{sealed} are missing: the head record says {sealed} entries were written "
                    f"but the file ends after line {n} (the last lines were deleted or the file was truncated)",
                )
            sealed_hash = GENESIS_HASH if sealed == 0 else self._hashes[sealed - 1]
            if head["head_hash"] != sealed_hash:
                return self._fail(
                    report, sealed if sealed else None,
                    f"entry {sealed} does not match the head record's hash {head['head_hash'][:16]}...: it was "
                    "edited after it was sealed",
                )
            if sealed < n:
                report.warnings.append(
                    f"lines {sealed + 1}..{n} are valid but not sealed in the head record (a crash between the "
                    "ledger write and the head update); the next append seals them"
                )
        if expected_head is not None and expected_head != (report.head_hash or GENESIS_HASH):
            return self._fail(
                report, n if n else None,
                f"head hash {report.head_hash or GENESIS_HASH} differs from the externally recorded "
                f"{expected_head}: the ledger was rewritten, truncated or extended since that hash was recorded",
            )
        return report

    @staticmethod
    def _fail(report: VerificationReport, line: int | None, problem: str) -> VerificationReport:
        report.ok = False
        report.first_bad_line = line
        report.problem = problem
        return report

    def _scan(self, report: VerificationReport) -> None:
        self._entries: list[LedgerEntry] = []
        self._hashes: list[str] = []
        prev_hash = GENESIS_HASH
        institution = None
        last_round = -1
        for i, raw in enumerate(self._read_lines(), start=1):
            if raw is None:
                self._fail(report, i, "the file does not end with a newline: the last line was cut or edited")
                return
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                self._fail(report, i, "is not valid JSON (a torn write or a hand edit)")
                return
            if not isinstance(record, dict) or set(record) != _ENTRY_KEYS:
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                self._fail(report, i, f"has fields {got}, expected {sorted(_ENTRY_KEYS)}")
                return
            if record["v"] != FORMAT_VERSION:
                self._fail(report, i, f"has format version {record['v']!r}; this tool reads version {FORMAT_VERSION}")
                return
            if record["hash"] != _entry_hash(record):
                self._fail(report, i, "its content does not match its hash: the line was edited")
                return
            if record["prev_hash"] != prev_hash or record["seq"] != i:
                self._fail(
                    report, i,
                    f"the chain is broken before this line (seq {record['seq']!r} at line {i}, prev_hash does "
                    f"{'not ' if record['prev_hash'] != prev_hash else ''}match line {i - 1}): an earlier entry was "
                    "deleted, reordered, or edited with its hash recomputed",
                )
                return
            try:
                event = DpEvent.from_dict(record["event"])
            except (EventError, TypeError) as err:
                self._fail(report, i, f"has an invalid DP event ({err})")
                return
            rnd, inst, when = record["round"], record["institution"], record["time"]
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
                self._fail(report, i, f"round {rnd!r} is not a whole number >= 0")
                return
            if rnd < last_round:
                self._fail(report, i, f"round {rnd} comes after round {last_round}: entries are out of order")
                return
            if not isinstance(inst, str) or not inst:
                self._fail(report, i, "institution is empty")
                return
            if institution is not None and inst != institution:
                self._fail(report, i, f"belongs to institution {inst!r}, the ledger to {institution!r}")
                return
            try:
                datetime.fromisoformat(when)
            except (TypeError, ValueError):
                self._fail(report, i, f"time {when!r} is not an ISO 8601 timestamp")
                return
            institution, last_round, prev_hash = inst, rnd, record["hash"]
            self._entries.append(LedgerEntry(record["seq"], rnd, inst, when, event, record["prev_hash"], record["hash"]))
            self._hashes.append(record["hash"])
            report.entries = i
            report.head_hash = record["hash"]

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
        grouped: list[tuple[int, list[DpEvent]]] = []
        for entry in self.entries():
            if grouped and grouped[-1][0] == entry.round:
                grouped[-1][1].append(entry.event)
            else:
                grouped.append((entry.round, [entry.event]))
        return grouped

    def head_hash(self) -> str:
        report = self.verify()
        if not report.ok:
            raise LedgerCorruptedError(report)
        return report.head_hash or GENESIS_HASH

    # -- writing ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def append(self, event: DpEvent, round: int, institution: str) -> LedgerEntry:  # noqa: A002 - public name
        """Append one event for ``round`` of ``institution``; refuses to extend a ledger that fails verification."""
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise ValueError(f"round={round!r} must be a whole number >= 0")
        if not isinstance(institution, str) or not institution:
            raise ValueError("institution must be a non-empty name")
        with self._locked():
            report = self.verify()
            if not report.ok:
                raise LedgerCorruptedError(report)
            if self._entries:
                last = self._entries[-1]
                if institution != last.institution:
                    raise LedgerError(
                        f"{self.path} is the ledger of {last.institution!r}; use a separate ledger for {institution!r}"
                    )
                if round < last.round:
                    raise LedgerError(f"{self.path}: round {round} is before the last recorded round {last.round}")
            seq = report.entries + 1
            record: dict[str, Any] = {
                "v": FORMAT_VERSION,
                "seq": seq,
                "round": round,
                "institution": institution,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "event": event.to_dict(),
                "prev_hash": report.head_hash or GENESIS_HASH,
            }
            record["hash"] = _entry_hash(record)
            old = self.path.read_bytes() if self.path.exists() else b""
            atomic_write_bytes(self.path, old + _canonical(record) + b"\n")
            head = {"v": FORMAT_VERSION, "entries": seq, "head_hash": record["hash"], "updated": record["time"]}
            atomic_write_bytes(self.head_path, _canonical(head) + b"\n")
            entry = LedgerEntry(seq, round, institution, record["time"], event, record["prev_hash"], record["hash"])
            return entry
