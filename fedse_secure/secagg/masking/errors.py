"""Error classes of the masking backend, in two families that never overlap (as h11 separates them):

* **message rejected, state unchanged** - :class:`ProtocolError` (and its :class:`AuthenticationError`): the
  message does not belong to the receiver's current stage or round, is malformed, or (at the coordinator) an
  institution's reply fails its signature or tag. The machine that raises it is exactly as it was; a
  transport drops the message (the coordinator treats its sender as silent) and carries on.
  :func:`~fedse_secure.secagg.masking.messages.decode` raises only :class:`ProtocolError`.
* **protocol aborted** - :class:`~fedse_secure.secagg.base.RoundAbortedError` and its subclasses: the machine
  has moved to ``ABORTED`` for good (sticky: every later call raises again) and releases nothing more. An
  institution aborts on a weaker setup than it accepts (:class:`UnsafeSetupError`) or on evidence that the
  coordinator or a peer misbehaves (:class:`PeerMisbehaviourError`); the coordinator aborts when too few
  institutions survive or a secret cannot be rebuilt.

All derive from :class:`~fedse_secure.secagg.base.SecureAggregationError`. Each message names what went wrong
and how to fix it, and never quotes a value of an institution's update (refusals reach the coordinator's log).
"""

from __future__ import annotations

from fedse_secure.secagg.base import InvalidUpdateError, MessageRejected, RoundAbortedError, SecureAggregationError

__all__ = [
    "AuthenticationError",
    "InvalidUpdateError",
    "PeerMisbehaviourError",
    "ProtocolError",
    "RoundAbortedError",
    "SecureAggregationError",
    "UnsafeSetupError",
]


class ProtocolError(MessageRejected):
    """A message that does not fit the protocol: malformed, wrong round, wrong stage, duplicate or unknown
    sender. The machine that raises it has *not* changed state."""


class AuthenticationError(ProtocolError):
    """A reply whose signature or tag does not verify; rejected, the machine's state is unchanged."""


class UnsafeSetupError(RoundAbortedError):
    """An institution refuses a round setup weaker than its own requirements (the message names the
    parameter); it takes no part in the round."""


class PeerMisbehaviourError(RoundAbortedError):
    """An institution saw a forged, tampered, replayed or inconsistent message (a signature or AES-GCM tag that
    does not verify, keys that are not its own, two different survivor lists, ...) and aborted the round."""
