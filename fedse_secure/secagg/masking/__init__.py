"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour
graph (Bell et al., CCS 2020). Every primitive comes from ``cryptography``: X25519 + HKDF-SHA256 key
agreement, AES-256-GCM for share transport, AES-128-CTR mask expansion, Ed25519 identities; Shamir
sharing over GF(2^521-1) is implemented here.

Layout (no module does I/O):

* :mod:`.messages` - the ten messages, their wire form, and the stage table (who sends what, in order);
* :mod:`.client` - :class:`SecAggClient`, one institution's state machine (how a transport drives it is
  in its docstring);
* :mod:`.server` - :class:`SecAggServer`, the coordinator's state machine (how a transport drives it, and
  how timeouts/dropouts are signalled, is in its docstring);
* :mod:`.driver` - :class:`MaskingAggregator` (the ``masking`` backend) and :func:`run_round`, which drive
  both in one process;
* :mod:`.identity`, :mod:`.shamir`, :mod:`.quantize`, :mod:`.prg`, :mod:`.graph`, :mod:`.keys` - building blocks.

A Flower transport maps one stage to one ``send_and_receive`` round trip: put ``request.to_bytes()`` for
each client into a message, call ``client.handle(decode(payload))`` on the node, return
``reply.to_bytes()``, feed every reply to ``server.receive`` and call ``server.advance()`` when all replied
or ``stage_timeout_s`` passed.
"""

from fedse_secure.secagg.masking.client import SecAggClient
from fedse_secure.secagg.masking.driver import MaskingAggregator, run_round
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    InvalidUpdateError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
)
from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry
from fedse_secure.secagg.masking.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    KeysBroadcast,
    MaskedInput,
    MaskedInputRequest,
    ProtocolMessage,
    SetupRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode,
)
from fedse_secure.secagg.masking.server import SecAggServer
from fedse_secure.secagg.masking.tensors import TensorLayout

__all__ = [
    "AuthenticationError",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "IdentityKey",
    "InvalidUpdateError",
    "KeyAdvertisement",
    "KeysBroadcast",
    "MaskedInput",
    "MaskedInputRequest",
    "MaskingAggregator",
    "ProtocolError",
    "ProtocolMessage",
    "PublicKeyRegistry",
    "RoundAbortedError",
    "SecAggClient",
    "SecAggServer",
    "SecureAggregationError",
    "SetupRequest",
    "Stage",
    "TensorLayout",
    "UnmaskRequest",
    "UnmaskShares",
    "decode",
    "run_round",
]
