"""Error classes of the masking backend.

All derive from :class:`~fedse_secure.secagg.base.SecureAggregationError`, so a caller that only knows the
backend-neutral contract still catches them. Each message names what went wrong and how to fix it.
"""

from __future__ import annotations

from fedse_secure.secagg.base import InvalidUpdateError, MessageRejected, RoundAbortedError, SecureAggregationError

__all__ = [
    "AuthenticationError",
    "InvalidUpdateError",
    "ProtocolError",
    "RoundAbortedError",
    "SecureAggregationError",
]


class ProtocolError(MessageRejected):
    """A message that does not fit the protocol: wrong round, wrong stage, duplicate or unknown sender.

    The state machine that raises it has *not* changed state, so a transport may drop the offending message
    (and, on the server, treat its sender as silent) and carry on.
    """


class AuthenticationError(ProtocolError):
    """A signature or AES-GCM tag did not verify, or a reconstructed secret does not match its commitment."""
