"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour
graph (Bell et al., CCS 2020). X25519 + HKDF-SHA256 key agreement, AES-256-GCM for share transport, AES-GMAC
input tags and Ed25519 identities come from ``cryptography``; the masks are AEGIS-128X2 keystreams (RFC 10032),
which ``cryptography`` lacks, made by the compiled kernel or :mod:`.aegis`; Shamir sharing over GF(2^521-1) is
implemented here.

Layout (no module does I/O):

* :mod:`.messages` - the ten messages, their wire form, and the stage table (who sends what, in order);
* :mod:`.client` - :class:`SecAggClient`, one institution's state machine (how a transport drives it is
  in its docstring);
* :mod:`.server` - :class:`SecAggServer`, the coordinator's state machine (how a transport drives it, and
  how timeouts/dropouts are signalled, is in its docstring);
* :mod:`.requirements` - :class:`MaskingRequirements`, what an institution accepts, and the one derivation of
  the graph parameters (degree, threshold) from colluder and dropout fractions (Bell et al., CCS 2020);
* :mod:`.settings` - the backend's settings (what a coordinator proposes);
* :mod:`.identity`, :mod:`.shamir`, :mod:`.quantize`, :mod:`.prg`, :mod:`.graph`, :mod:`.keys` - building blocks.

``fedse_secure.secagg.backends.masking`` wraps the two machines in the backend-neutral bytes interface; the
in-process driver (``fedse_secure.secagg.driver``) and the federation's transports drive them through it.
"""

from fedse_secure.secagg.masking.client import SecAggClient
from fedse_secure.secagg.masking.errors import (
    AuthenticationError,
    InvalidUpdateError,
    PeerMisbehaviourError,
    ProtocolError,
    RoundAbortedError,
    SecureAggregationError,
    UnsafeSetupError,
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
    Phase,
    ProtocolMessage,
    SetupRequest,
    STAGES,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode,
)
from fedse_secure.secagg.masking.requirements import GraphParameters, MaskingRequirements, SetupRefusal
from fedse_secure.secagg.masking.server import SecAggServer
from fedse_secure.secagg.masking.settings import MaskingSettings

__all__ = [
    "AuthenticationError",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "GraphParameters",
    "IdentityKey",
    "InvalidUpdateError",
    "KeyAdvertisement",
    "KeysBroadcast",
    "MaskedInput",
    "MaskedInputRequest",
    "MaskingRequirements",
    "SetupRefusal",
    "MaskingSettings",
    "PeerMisbehaviourError",
    "Phase",
    "ProtocolError",
    "ProtocolMessage",
    "PublicKeyRegistry",
    "RoundAbortedError",
    "SecAggClient",
    "SecAggServer",
    "STAGES",
    "SecureAggregationError",
    "SetupRequest",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "UnsafeSetupError",
    "decode",
]
