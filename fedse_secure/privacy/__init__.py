"""Differential privacy for fedse-secure: DP-SGD (record level), client-level DP, accounting, budget, ledger.

Heavy dependencies (torch, opacus) are imported inside the functions that need them, so importing this
package is cheap.
"""

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant, AccountingError, get_accountant
from fedse_secure.privacy.accounting import (
    RDP_ORDERS,
    cumulative_epsilon,
    epsilon,
    epsilon_dp_accounting,
    noise_multiplier_for_target,
)
from fedse_secure.privacy.budget import BudgetCheck, BudgetExceededError, BudgetGuard
from fedse_secure.privacy.client_dp import ClientDPInfo, client_event, noise_share_std, privatize_update
from fedse_secure.privacy.dpsgd import (
    DPTrainingError,
    DPTrainResult,
    per_sequence_loss,
    planned_steps,
    sample_rate,
    train_dp_sgd,
)
from fedse_secure.privacy.events import DpEvent, EventError
from fedse_secure.privacy.mechanisms import MECHANISMS, PrivacyMechanism, ReleaseTerms, project_event
from fedse_secure.privacy.ledger import (
    GENESIS_HASH,
    LedgerCorruptedError,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    VerificationReport,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "GENESIS_HASH",
    "RDP_ORDERS",
    "AccountingError",
    "BudgetCheck",
    "BudgetExceededError",
    "BudgetGuard",
    "ClientDPInfo",
    "DPTrainResult",
    "DPTrainingError",
    "DpEvent",
    "EventError",
    "LedgerCorruptedError",
    "MECHANISMS",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "PrivacyMechanism",
    "ReleaseTerms",
    "VerificationReport",
    "client_event",
    "cumulative_epsilon",
    "epsilon",
    "epsilon_dp_accounting",
    "get_accountant",
    "noise_multiplier_for_target",
    "noise_share_std",
    "per_sequence_loss",
    "planned_steps",
    "privatize_update",
    "project_event",
    "sample_rate",
    "train_dp_sgd",
]
