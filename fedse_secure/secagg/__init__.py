"""Secure aggregation: the backend interface (``base``), the backends (``backends``: none, masking, crypten)
and the in-process driver (``driver``)."""

from fedse_secure.secagg.base import (
    AggregateResult,
    Backend,
    Capabilities,
    ClientMachine,
    InvalidUpdateError,
    MessageRejected,
    RoundAbortedError,
    SecureAggregationError,
    ServerMachine,
)

__all__ = [
    "AggregateResult",
    "Backend",
    "Capabilities",
    "ClientMachine",
    "InvalidUpdateError",
    "MessageRejected",
    "RoundAbortedError",
    "SecureAggregationError",
    "ServerMachine",
]
