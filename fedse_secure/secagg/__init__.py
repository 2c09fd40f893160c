"""Secure aggregation backends: ``none`` (plaintext), ``masking`` (SecAgg+), ``crypten`` (MPC)."""

from fedse_secure.secagg.base import (
    AggregateResult,
    PlaintextAggregator,
    RoundAbortedError,
    SecureAggregationError,
    SecureAggregator,
)

__all__ = [
    "AggregateResult",
    "PlaintextAggregator",
    "RoundAbortedError",
    "SecureAggregationError",
    "SecureAggregator",
]
