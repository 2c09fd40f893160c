"""Append-only, hash-chained JSON-lines files with a sealed head: the one mechanism behind the privacy ledger
and the audit log.

Each line is one JSON object with its sequence number, a random salt, the hash of the previous line and its
own hash (SHA-256 of the canonical JSON of everything else on the line). The salt keeps a published head hash
from revealing the line's content: the fields of a ledger line (record count, steps, rounds, a timestamp) are
few enough to be guessed and hashed one by one otherwise.

What is detected (:meth:`ChainedLog.verify`):

* an edited line (its hash no longer matches), a deleted or reordered line in the middle (the next line's
  ``prev_hash``/``seq`` no longer matches), a torn or garbled line (not JSON, wrong fields);
* deletion of the **last** line(s), which a hash chain alone cannot see: after every append the head (entry
  count and head hash) is sealed in a sidecar ``<file>.head`` (written atomically, after the file), and
  ``verify`` checks the file against it. A missing sidecar next to a non-empty file is an error too;
* a consistent rewrite of file and sidecar, **against heads recorded elsewhere**: every head recorded outside
  (the coordinator's round records, where each institution signs its head every round) must be the head of
  some prefix of the file (``expected_heads``), so an auditor can pass any earlier head, not only the latest.

Writes are crash-safe (temporary file, fsync, rename, directory fsync) and serialised across processes by an
exclusive ``flock`` on ``<file>.lock``, which callers may hold across a longer critical section
(:meth:`ChainedLog.locked`: the privacy budget check, training and the append happen under one lock). The lock
is re-entrant within a process, so code that appends inside its own critical section does not deadlock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedse_secure.errors import FedseError
from fedse_secure.io_utils import atomic_write_bytes

GENESIS_HASH = "0" * 64
_HEAD_KEYS = {"v", "entries", "head_hash", "updated"}
_CHAIN_KEYS = {"seq", "salt", "prev_hash", "hash"}


class ChainError(FedseError, RuntimeError):
    """The chained file cannot be used as asked; the message names the file, the line and the fix."""


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
    #: Externally recorded heads that were found in the chain: head -> the entry count it seals.
    matched_heads: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        if self.ok:
            text = f"{self.path}: OK, {self.entries} entries, head {self.head_hash or GENESIS_HASH}"
            if self.matched_heads:
                text += f"; {len(self.matched_heads)} externally recorded head(s) found in the chain"
        else:
            where = f": line {self.first_bad_line}" if self.first_bad_line is not None else ""
            text = f"{self.path}{where}: {self.problem}"
        for w in self.warnings:
            text += f"\n  warning: {w}"
        return text


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _json_kind(value: Any) -> str:
    """A parsed JSON value as a user names it (never a Python type name)."""
    if isinstance(value, list):
        return "a JSON array" + (" (empty)" if not value else "")
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, bool) or value is None:
        return f"the JSON value {json.dumps(value)}"
    return "a JSON number" if isinstance(value, (int, float)) else "not a JSON object"


# -- a process-wide re-entrant exclusive lock per file ----------------------------------------------------------
class _Held:
    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle = None


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; nested use in the same thread is re-entrant, other threads
    and other processes wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path.resolve())
    with _HELD_GUARD:
        held = _HELD.setdefault(key, _Held())
    with held.thread_lock:
        if held.depth == 0:
            handle = open(lock_path, "a+b")  # noqa: SIM115 - closed when the outermost holder leaves
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except BaseException:
                handle.close()
                raise
            held.handle = handle
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                handle, held.handle = held.handle, None
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()


class ChainedLog:
    """One chained JSON-lines file. Subclasses name their payload fields and check each record's content."""

    #: What the file is called in messages ("privacy ledger", "audit log").
    what: ClassVar[str] = "chained log"
    #: Format version written; versions that ``verify`` still reads.
    version: ClassVar[int] = 1
    readable_versions: ClassVar[tuple[int, ...]] = (1,)

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._records: list[dict[str, Any]] = []
        self._hashes: list[str] = []

    # -- to be provided by subclasses ---------------------------------------------------------------------------
    def payload_keys(self, version: int) -> set[str]:
        """The fields of a line besides ``v`` and the chain fields, for format ``version``."""
        raise NotImplementedError

    def check_record(self, record: dict[str, Any], previous: dict[str, Any] | None) -> str | None:
        """Why this (hash-verified) record is not acceptable after ``previous``; None if it is."""
        return None

    # -- locking ------------------------------------------------------------------------------------------------
    def locked(self):
        """The file's exclusive lock (re-entrant): hold it across read-check-append sequences."""
        return exclusive(self.lock_path)

    # -- reading ------------------------------------------------------------------------------------------------
    def _read_lines(self) -> list[bytes | None]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if not data:
            return []
        lines: list[bytes | None] = list(data.split(b"\n"))
        if lines[-1] == b"":
            lines.pop()
        else:
            # Our writer always ends with a newline; a missing one means a hand edit or a foreign writer.
            lines.append(None)
        return lines

    def _read_head(self) -> dict[str, Any] | None | str:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_bytes())
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            return f"is not valid JSON ({err})"
        if not isinstance(head, dict):
            return f"is {_json_kind(head)}, not a JSON object with fields {sorted(_HEAD_KEYS)}"
        if set(head) != _HEAD_KEYS:
            return f"has fields {sorted(head)}, expected {sorted(_HEAD_KEYS)}"
        if not isinstance(head["entries"], int) or head["entries"] < 0 or not isinstance(head["head_hash"], str):
            return "has a malformed entry count or head hash"
        return head

    @staticmethod
    def _fail(report: VerificationReport, line: int | None, problem: str) -> VerificationReport:
        report.ok = False
        report.first_bad_line = line
        report.problem = problem
        return report

    def verify(self, expected_heads: Iterable[str] = ()) -> VerificationReport:
        """Check every line, the chain, the sealed head and the externally recorded heads (each must be the head
        of some prefix); never raises for a bad file (see the report)."""
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
                    "write and the head update); the next append seals them"
                )
        position = {h: i + 1 for i, h in enumerate(self._hashes)}
        position[GENESIS_HASH] = 0
        for expected in expected_heads:
            if expected not in position:
                return self._fail(
                    report, n if n else None,
                    f"the externally recorded head {expected} is not the head of any prefix of this {self.what} "
                    f"(current head {report.head_hash or GENESIS_HASH}, {n} entries): it was rewritten, truncated "
                    "or replaced after that head was recorded",
                )
            report.matched_heads[expected] = position[expected]
        return report

    def _scan(self, report: VerificationReport) -> None:
        self._records, self._hashes = [], []
        prev_hash = GENESIS_HASH
        previous: dict[str, Any] | None = None
        for i, raw in enumerate(self._read_lines(), start=1):
            if raw is None:
                self._fail(report, i, "the file does not end with a newline: the last line was cut or edited")
                return
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._fail(report, i, "is not valid JSON (a torn write or a hand edit)")
                return
            if not isinstance(record, dict):
                self._fail(report, i, f"is {_json_kind(record)}, not a record of the {self.what} (a JSON object): "
                                      "the line was edited or the file is not a " + self.what)
                return
            version = record.get("v")
            if version not in self.readable_versions:
                self._fail(report, i, f"has format version {version!r}; this tool reads versions "
                                      f"{list(self.readable_versions)} of the {self.what}")
                return
            expected = {"v"} | self.payload_keys(version) | self._chain_keys(version)
            if set(record) != expected:
                self._fail(report, i, f"has fields {sorted(record)}, expected {sorted(expected)}")
                return
            if record["hash"] != record_hash(record):
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
            problem = self.check_record(record, previous)
            if problem:
                self._fail(report, i, problem)
                return
            previous, prev_hash = record, record["hash"]
            self._records.append(record)
            self._hashes.append(record["hash"])
            report.entries = i
            report.head_hash = record["hash"]

    def _chain_keys(self, version: int) -> set[str]:
        return _CHAIN_KEYS

    def records(self) -> list[dict[str, Any]]:
        """All records after full verification (raises the subclass's corruption error naming the first bad line)."""
        report = self.verify()
        if not report.ok:
            raise self.corrupted(report)
        return list(self._records)

    def corrupted(self, report: VerificationReport) -> FedseError:
        return ChainError(report.summary())

    def head_hash(self) -> str:
        report = self.verify()
        if not report.ok:
            raise self.corrupted(report)
        return report.head_hash or GENESIS_HASH

    # -- writing ------------------------------------------------------------------------------------------------
    def append_record(self, payload: dict[str, Any], check=None) -> dict[str, Any]:
        """Append one line with ``payload``; ``check(records)`` may refuse it (raise) after verification, under
        the lock. Refuses to extend a file that fails verification."""
        with self.locked():
            report = self.verify()
            if not report.ok:
                raise self.corrupted(report)
            if check is not None:
                check(list(self._records))
            seq = report.entries + 1
            record: dict[str, Any] = {"v": self.version, **payload, "seq": seq, "salt": secrets.token_hex(16),
                                      "prev_hash": report.head_hash or GENESIS_HASH}
            record["hash"] = record_hash(record)
            line = canonical(record) + b"\n"
            old = self.path.read_bytes() if self.path.exists() else b""
            atomic_write_bytes(self.path, old + line)
            head = {"v": 1, "entries": seq, "head_hash": record["hash"], "updated": payload.get("time", "")}
            atomic_write_bytes(self.head_path, canonical(head) + b"\n")
            self._records.append(record)
            self._hashes.append(record["hash"])
            return record
