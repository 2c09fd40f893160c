"""Audit trail and signed statements: hash-chained logs (:mod:`.chain`, shared with the privacy ledger), the
institution's audit log (:mod:`.log`), round attestations and adapter signatures (:mod:`.attest`), and the
verification and report a compliance reviewer runs (:mod:`.review`)."""

from fedse_secure.audit.chain import GENESIS_HASH, ChainError, ChainedLog, VerificationReport
from fedse_secure.audit.log import AUDIT_FILE, AuditError, AuditLog, audit_path_for

__all__ = ["AUDIT_FILE", "GENESIS_HASH", "AuditError", "AuditLog", "ChainError", "ChainedLog",
           "VerificationReport", "audit_path_for"]
