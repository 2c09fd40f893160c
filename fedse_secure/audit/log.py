"""An institution's audit trail: a hash-chained log (:mod:`fedse_secure.audit.chain`) of everything that left
it and everything it refused, for its compliance office.

One line per event, of three kinds:

* ``session`` — a coordinator's experiment was seen: its hash and run key, the policy in force (its content
  and hash), the decision (accepted, or the violated fields) and the settings the institution runs with;
* ``refusal`` — a request was refused: the round, the stage and the reasons, as sent back;
* ``export`` — a message left: the round, the stage, to whom (the coordinator, for the listed peers), its size
  and SHA-256, the statistics it carried (after the policy's export filter), and for the round's first stage
  also the payload's hash and size, ε and δ spent, the ledger head and the secure-aggregation parameters.

The log lives next to the institution's privacy ledger (``<ledger folder>/audit.jsonl``), is never removed by
a rerun, and ``fedse audit verify`` checks its chain, the ledger's chain, and that every ledger head the log
recorded still heads a prefix of the ledger (so deleting or rewriting the ledger is caught as long as either
the log or the coordinator's round records survive).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedse_secure.audit.chain import ChainedLog, VerificationReport
from fedse_secure.errors import FedseError

KINDS = ("session", "refusal", "export")
AUDIT_FILE = "audit.jsonl"


class AuditError(FedseError, RuntimeError):
    """The audit log cannot be used as asked (it failed verification, or is missing); the message says which."""

    def __init__(self, message: str, report: VerificationReport | None = None):
        super().__init__(message)
        self.report = report


def audit_path_for(ledger_path: str | os.PathLike[str]) -> Path:
    """Where an institution's audit log lives: next to its privacy ledger (one folder per institution)."""
    return Path(ledger_path).parent / AUDIT_FILE


class AuditLog(ChainedLog):
    what = "audit log"
    version = 1
    readable_versions = (1,)

    def payload_keys(self, version):
        return {"time", "institution", "kind", "data"}

    def corrupted(self, report):
        return AuditError(report.summary(), report)

    def check_record(self, record, previous):
        if record["kind"] not in KINDS:
            return f"kind {record['kind']!r} is not one of {KINDS}"
        if not isinstance(record["data"], dict):
            return "data is not a JSON object"
        if not isinstance(record["institution"], str) or not record["institution"]:
            return "institution is empty"
        if previous is not None and record["institution"] != previous["institution"]:
            return f"belongs to institution {record['institution']!r}, the log to {previous['institution']!r}"
        try:
            datetime.fromisoformat(record["time"])
        except (TypeError, ValueError):
            return f"time {record['time']!r} is not an ISO 8601 timestamp"
        return None

    def record(self, kind: str, institution: str, **data: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"audit event kind {kind!r} is not one of {KINDS}")
        return self.append_record({"time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                                   "institution": institution, "kind": kind, "data": data})

    def events(self) -> list[dict[str, Any]]:
        return self.records()
