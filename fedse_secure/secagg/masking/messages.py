"""Protocol messages: plain dataclasses with a compact binary wire form.

Stages, and who sends what (``S`` = server/coordinator, ``C`` = each client):

====================  ==========================  ================================
stage                 S -> C (request)            C -> S (reply)
====================  ==========================  ================================
``advertise_keys``    :class:`SetupRequest`       :class:`KeyAdvertisement`
``share_keys``        :class:`KeysBroadcast`      :class:`EncryptedShares`
``masked_input``      :class:`MaskedInputRequest` :class:`MaskedInput`
``consistency``       :class:`ConsistencyRequest` :class:`ConsistencySignature`
``unmask``            :class:`UnmaskRequest`      :class:`UnmaskShares`
====================  ==========================  ================================

Wire form (:meth:`ProtocolMessage.to_bytes`): ``b"FSA1"`` | u32 header length | UTF-8 JSON header | blobs,
each as u64 length + raw bytes. ``bytes`` fields and numpy arrays travel as blobs (the masked vector is
written straight from its buffer, not through JSON); everything else is in the header. :func:`decode` reads
any message; ``Cls.from_bytes`` also checks the type. Malformed input raises :class:`ProtocolError`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from fedse_secure.secagg.masking.errors import ProtocolError
from fedse_secure.secagg.masking.prg import DOMAIN

MAGIC = b"FSA1"


class Stage:
    """Stage names, in protocol order."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    ALL = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)

    def __new__(cls, *args, **kwargs):  # noqa: D102 - a namespace, not a type
        raise TypeError("Stage is a namespace of constants")


def frame(*parts: bytes | str | int) -> bytes:
    """Unambiguous concatenation (length-prefixed) of the parts of a signed or authenticated payload."""
    out = [DOMAIN]
    for p in parts:
        if isinstance(p, str):
            p = p.encode()
        elif isinstance(p, int):
            p = p.to_bytes(8, "big", signed=True)
        out.append(len(p).to_bytes(4, "big"))
        out.append(p)
    return b"".join(out)


_REGISTRY: dict[str, type[ProtocolMessage]] = {}


@dataclass
class ProtocolMessage:
    """Base of all messages. ``round_id`` ties a message to one aggregation round."""

    STAGE: ClassVar[str] = ""
    round_id: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # -- dict form (what the JSON header holds; bytes and arrays become blob references) -------------------
    def to_dict(self, blobs: list | None = None) -> dict[str, Any]:
        return {"type": type(self).__name__, **{f.name: _enc(getattr(self, f.name), blobs) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], blobs: list | None = None) -> ProtocolMessage:
        kind = _REGISTRY.get(d.get("type", ""))
        if kind is None or (cls is not ProtocolMessage and not issubclass(kind, cls)):
            raise ProtocolError(f"expected a {cls.__name__} message, got {d.get('type')!r}")
        names = {f.name for f in fields(kind)}
        if set(d) - {"type"} != names:
            raise ProtocolError(f"{kind.__name__}: fields {sorted(set(d) - {'type'})} do not match {sorted(names)}")
        try:
            return kind._typed(**{k: _dec(v, blobs) for k, v in d.items() if k != "type"})
        except (TypeError, ValueError, KeyError, IndexError) as err:
            raise ProtocolError(f"{kind.__name__}: malformed field ({err})") from None

    @classmethod
    def _typed(cls, **kw: Any) -> ProtocolMessage:
        m = cls(**kw)
        if not (_is_int(m.round_id) and 0 <= m.round_id < 2**63):
            raise ValueError(f"round_id {m.round_id!r} is not an integer in [0, 2^63)")
        for f in fields(m):
            want = _FIELD_TYPES.get(str(f.type))
            if want is not None and not want(getattr(m, f.name)):
                raise ValueError(f"field {f.name!r} is not a {f.type}")
        return m

    # -- wire form ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        blobs: list = []
        header = json.dumps(self.to_dict(blobs), separators=(",", ":")).encode()
        parts: list = [MAGIC, struct.pack(">I", len(header)), header]
        for b in blobs:
            mv = memoryview(b).cast("B")
            parts.append(struct.pack(">Q", mv.nbytes))
            parts.append(mv)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> ProtocolMessage:
        mv = memoryview(data)
        try:
            if bytes(mv[:4]) != MAGIC:
                raise ProtocolError("not a fedse secure-aggregation message (bad magic); check the transport")
            (hlen,) = struct.unpack(">I", mv[4:8])
            header = json.loads(bytes(mv[8 : 8 + hlen]))
            pos = 8 + hlen
            blobs = []
            while pos < mv.nbytes:
                (blen,) = struct.unpack(">Q", mv[pos : pos + 8])
                if pos + 8 + blen > mv.nbytes:
                    raise ProtocolError("truncated message; the transport cut it short")
                blobs.append(mv[pos + 8 : pos + 8 + blen])
                pos += 8 + blen
        except (struct.error, ValueError) as err:
            raise ProtocolError(f"malformed message ({err}); the transport corrupted it") from None
        if not isinstance(header, dict):
            raise ProtocolError("malformed message header")
        return cls.from_dict(header, blobs)


def decode(data: bytes | memoryview) -> ProtocolMessage:
    """Any protocol message from its wire form."""
    return ProtocolMessage.from_bytes(data)


_PLAIN = (str, int, float, bool, type(None))


def _enc(v: Any, blobs: list | None) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, list) and all(type(x) is str for x in v):  # name lists: the common large case
        return v
    if isinstance(v, ProtocolMessage):
        return {"$m": v.to_dict(blobs)}
    if isinstance(v, (bytes, bytearray)):
        if blobs is None:
            return {"$x": bytes(v).hex()}
        blobs.append(bytes(v))
        return {"$b": len(blobs) - 1}
    if isinstance(v, np.ndarray):
        if blobs is None:
            return {"$x": v.tobytes().hex(), "dtype": v.dtype.str}
        blobs.append(np.ascontiguousarray(v))
        return {"$b": len(blobs) - 1, "dtype": v.dtype.str}
    if isinstance(v, dict):
        return {str(k): _enc(x, blobs) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_enc(x, blobs) for x in v]
    return v


def _dec(v: Any, blobs: list | None) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, list) and all(type(x) is str for x in v):
        return v
    if isinstance(v, dict):
        if "$m" in v:
            return ProtocolMessage.from_dict(v["$m"], blobs)
        if "$b" in v or "$x" in v:
            raw = bytes.fromhex(v["$x"]) if "$x" in v else blobs[v["$b"]]
            if "dtype" in v:
                dt = np.dtype(v["dtype"])
                if dt not in (np.dtype("<u4"), np.dtype("<u8")):
                    raise ValueError(f"unsupported array dtype {dt}")
                return np.frombuffer(raw, dtype=dt)
            return bytes(raw)
        return {k: _dec(x, blobs) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x, blobs) for x in v]
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELD_TYPES = {
    "int": _is_int,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, bytes),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, bytes]": lambda v: isinstance(v, dict) and all(isinstance(x, bytes) for x in v.values()),
    "list[KeyAdvertisement]": lambda v: isinstance(v, list) and all(isinstance(x, KeyAdvertisement) for x in v),
    "np.ndarray": lambda v: isinstance(v, np.ndarray),
}


# ---- stage 0: advertise keys -----------------------------------------------------------------------------
@dataclass
class SetupRequest(ProtocolMessage):
    """S -> C: the round's parameters. Every party derives the graph and the key-derivation context from its
    :meth:`digest`, and signs that digest, so a server that shows parties different setups is caught."""

    STAGE: ClassVar[str] = Stage.ADVERTISE_KEYS
    participants: list[str] = field(default_factory=list)
    threshold: int = 0
    degree: int = 0
    ring_bits: int = 64
    fractional_bits: int = 24
    clip_range: float = 8.0
    vector_len: int = 0
    graph_seed: bytes = b""

    def digest(self) -> bytes:
        canon = {
            "round_id": self.round_id,
            "participants": sorted(self.participants),
            "threshold": self.threshold,
            "degree": self.degree,
            "ring_bits": self.ring_bits,
            "fractional_bits": self.fractional_bits,
            "clip_range": repr(float(self.clip_range)),
            "vector_len": self.vector_len,
            "graph_seed": self.graph_seed.hex(),
        }
        return hashlib.sha256(frame("setup", json.dumps(canon, sort_keys=True))).digest()


@dataclass
class KeyAdvertisement(ProtocolMessage):
    """C -> S, and forwarded S -> C inside :class:`KeysBroadcast`: two fresh X25519 public keys (for masks
    and for share encryption) and a SHA-256 commitment to the self-mask seed, signed with the sender's
    long-term Ed25519 identity over the setup digest."""

    STAGE: ClassVar[str] = Stage.ADVERTISE_KEYS
    sender: str = ""
    mask_public_key: bytes = b""
    enc_public_key: bytes = b""
    seed_commitment: bytes = b""
    signature: bytes = b""

    def signed_payload(self, setup_digest: bytes) -> bytes:
        return frame(
            "advert", setup_digest, self.round_id, self.sender, self.mask_public_key, self.enc_public_key,
            self.seed_commitment,
        )


# ---- stage 1: share keys ---------------------------------------------------------------------------------
@dataclass
class KeysBroadcast(ProtocolMessage):
    """S -> C: the signed advertisements of the recipient's neighbours (and its own) that reached the server."""

    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    adverts: list[KeyAdvertisement] = field(default_factory=list)


@dataclass
class EncryptedShares(ProtocolMessage):
    """C -> S: for each neighbour, AES-256-GCM(nonce || ciphertext) of the sender's Shamir shares of its
    self-mask seed and mask private key; the AD binds setup digest, round, sender and receiver."""

    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    sender: str = ""
    ciphertexts: dict[str, bytes] = field(default_factory=dict)


# ---- stage 2: masked input -------------------------------------------------------------------------------
@dataclass
class MaskedInputRequest(ProtocolMessage):
    """S -> C: the ciphertexts addressed to the recipient, keyed by their sender. The senders are the
    recipient's neighbours that finished ``share_keys``; exactly those get a pairwise mask."""

    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    ciphertexts: dict[str, bytes] = field(default_factory=dict)


@dataclass
class MaskedInput(ProtocolMessage):
    """C -> S: the masked, quantised update (uint32 or uint64 ring elements); its last element is the masked
    count of clipped values, so ``vector.size == setup.vector_len + 1``."""

    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    sender: str = ""
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


# ---- stage 3: consistency check --------------------------------------------------------------------------
@dataclass
class ConsistencyRequest(ProtocolMessage):
    """S -> C: the survivors (clients whose masked input the server holds)."""

    STAGE: ClassVar[str] = Stage.CONSISTENCY
    survivors: list[str] = field(default_factory=list)


@dataclass
class ConsistencySignature(ProtocolMessage):
    """C -> S: the sender's Ed25519 signature over (setup digest, sorted survivors)."""

    STAGE: ClassVar[str] = Stage.CONSISTENCY
    sender: str = ""
    signature: bytes = b""


def survivors_payload(setup_digest: bytes, round_id: int, survivors: list[str]) -> bytes:
    return frame("survivors", setup_digest, round_id, json.dumps(sorted(survivors)))


# ---- stage 4: unmask -------------------------------------------------------------------------------------
@dataclass
class UnmaskRequest(ProtocolMessage):
    """S -> C: the survivor list again, with the consistency signatures the server collected."""

    STAGE: ClassVar[str] = Stage.UNMASK
    survivors: list[str] = field(default_factory=list)
    signatures: dict[str, bytes] = field(default_factory=dict)


@dataclass
class UnmaskShares(ProtocolMessage):
    """C -> S: shares of self-mask seeds of surviving neighbours and of mask keys of dropped ones (never
    both for one peer)."""

    STAGE: ClassVar[str] = Stage.UNMASK
    sender: str = ""
    seed_shares: dict[str, bytes] = field(default_factory=dict)
    key_shares: dict[str, bytes] = field(default_factory=dict)


REQUESTS = {
    Stage.ADVERTISE_KEYS: SetupRequest,
    Stage.SHARE_KEYS: KeysBroadcast,
    Stage.MASKED_INPUT: MaskedInputRequest,
    Stage.CONSISTENCY: ConsistencyRequest,
    Stage.UNMASK: UnmaskRequest,
}
REPLIES = {
    Stage.ADVERTISE_KEYS: KeyAdvertisement,
    Stage.SHARE_KEYS: EncryptedShares,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.CONSISTENCY: ConsistencySignature,
    Stage.UNMASK: UnmaskShares,
}
