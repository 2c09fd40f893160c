"""Protocol messages: plain dataclasses with a compact binary wire form, and the stage table.

Stages, and who sends what (``S`` = server/coordinator, ``C`` = each institution):

====================  ==========================  ================================
stage                 S -> C (request)            C -> S (reply)
====================  ==========================  ================================
``advertise_keys``    :class:`SetupRequest`       :class:`KeyAdvertisement`
``share_keys``        :class:`KeysBroadcast`      :class:`EncryptedShares`
``masked_input``      :class:`MaskedInputRequest` :class:`MaskedInput`
``consistency``       :class:`ConsistencyRequest` :class:`ConsistencySignature`
``unmask``            :class:`UnmaskRequest`      :class:`UnmaskShares`
====================  ==========================  ================================

Wire form (:meth:`ProtocolMessage.to_bytes`): ``b"FSA2"`` | u32 header length | UTF-8 JSON header | blobs,
each as u64 length + raw bytes. ``bytes`` fields and the masked vector travel as blobs (the vector straight
from its buffer); everything else is in the header. Each field is read back by its declared type, never by
what the header claims, so :func:`decode` raises :class:`~fedse_secure.secagg.masking.errors.ProtocolError`,
and nothing else, for any byte string (``tests/test_secagg_properties.py`` fuzzes it).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

from fedse_secure.secagg.masking.errors import ProtocolError
from fedse_secure.secagg.masking.prg import DOMAIN

MAGIC = b"FSA2"
#: A round of 1000 institutions broadcasts 1000 key advertisements (~150 header bytes each).
MAX_HEADER_BYTES = 1 << 24
MAX_BLOBS = 1 << 20
TAG_BYTES = 16
_VECTOR_DTYPES = {"<u4": np.dtype("<u4"), "<u8": np.dtype("<u8")}


class Stage(StrEnum):
    """The five stages, in protocol order (their values are the names configs and records use)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


STAGES: tuple[Stage, ...] = tuple(Stage)


class Phase(StrEnum):
    """Where a machine is: the stage whose request an institution expects next (or whose replies the coordinator
    collects), ``IDLE`` before the coordinator starts, then ``DONE`` or, from anywhere, ``ABORTED``. Both terminal
    states are sticky."""

    IDLE = "idle"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


#: The one transition table of both machines (any phase may also go to ABORTED).
NEXT_PHASE: dict[Phase, Phase] = {
    Phase.IDLE: Phase.ADVERTISE_KEYS,
    Phase.ADVERTISE_KEYS: Phase.SHARE_KEYS,
    Phase.SHARE_KEYS: Phase.MASKED_INPUT,
    Phase.MASKED_INPUT: Phase.CONSISTENCY,
    Phase.CONSISTENCY: Phase.UNMASK,
    Phase.UNMASK: Phase.DONE,
}


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


# -- typed field codecs: (encode into the header, decode from it) ----------------------------------------------
def _is_int(v: Any) -> bool:
    return type(v) is int


def _blob(v: Any, blobs: list) -> bytes:
    if not (isinstance(v, dict) and set(v) == {"$b"} and _is_int(v["$b"]) and 0 <= v["$b"] < len(blobs)):
        raise ValueError("not a blob reference")
    return bytes(blobs[v["$b"]])


def _ref(data: Any, blobs: list) -> dict[str, int]:
    blobs.append(data)
    return {"$b": len(blobs) - 1}


def _enc_int(v, blobs):
    return int(v)


def _dec_int(v, blobs):
    if not (_is_int(v) and -(2**63) <= v < 2**63):
        raise ValueError("not a 64-bit integer")
    return v


def _dec_float(v, blobs):
    if not (type(v) in (int, float) and np.isfinite(v)):
        raise ValueError("not a finite number")
    return float(v)


def _dec_str(v, blobs):
    if type(v) is not str:
        raise ValueError("not a string")
    return v


def _dec_names(v, blobs):
    if not (type(v) is list and all(type(x) is str for x in v)):
        raise ValueError("not a list of names")
    return list(v)


def _enc_bytes_map(v, blobs):
    return {str(k): _ref(bytes(x), blobs) for k, x in v.items()}


def _dec_bytes_map(v, blobs):
    if type(v) is not dict:
        raise ValueError("not a mapping")
    return {_dec_str(k, blobs): _blob(x, blobs) for k, x in v.items()}


def _enc_vector(v, blobs):
    arr = np.ascontiguousarray(v)
    if arr.dtype.str not in _VECTOR_DTYPES:
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return {**_ref(arr, blobs), "dtype": arr.dtype.str}


def _dec_vector(v, blobs):
    if not (type(v) is dict and set(v) == {"$b", "dtype"} and v["dtype"] in _VECTOR_DTYPES):
        raise ValueError("not a uint32/uint64 vector")
    ref = {"$b": v["$b"]}
    _blob(ref, [b""] * len(blobs))  # validates the index without copying the (large) blob
    return np.frombuffer(blobs[v["$b"]], dtype=_VECTOR_DTYPES[v["dtype"]])


# A roster of n advertisements travels as one blob of fixed-size records (u16 name length, name, round id,
# three 32-byte keys/commitments, 64-byte signature): a 1000-institution roster decodes in milliseconds.
_ADVERT_FIXED = struct.Struct(">q32s32s32s64s")


def advert_record(a: KeyAdvertisement) -> bytes:
    name = a.sender.encode()
    if not (len(name) < 2**16 and len(a.mask_public_key) == len(a.enc_public_key) == len(a.seed_commitment) == 32
            and len(a.signature) == 64):
        raise ValueError(f"key advertisement of {a.sender!r} is malformed")
    return struct.pack(">H", len(name)) + name + _ADVERT_FIXED.pack(
        a.round_id, a.mask_public_key, a.enc_public_key, a.seed_commitment, a.signature)


def _enc_adverts(v, blobs):
    return _ref(b"".join(advert_record(a) for a in v), blobs)


def _dec_adverts(v, blobs):
    raw = _blob(v, blobs)
    out, pos, size = [], 0, _ADVERT_FIXED.size
    while pos < len(raw):
        (nlen,) = struct.unpack_from(">H", raw, pos)
        if pos + 2 + nlen + size > len(raw):
            raise ValueError("truncated roster")
        name = raw[pos + 2 : pos + 2 + nlen].decode()
        rid, mpk, epk, sc, sig = _ADVERT_FIXED.unpack_from(raw, pos + 2 + nlen)
        if rid < 0:
            raise ValueError("negative round id in the roster")
        out.append(KeyAdvertisement(round_id=rid, sender=name, mask_public_key=mpk, enc_public_key=epk,
                                    seed_commitment=sc, signature=sig))
        pos += 2 + nlen + size
    return out


_CODECS = {
    "int": (_enc_int, _dec_int),
    "float": (lambda v, b: float(v), _dec_float),
    "str": (lambda v, b: str(v), _dec_str),
    "bytes": (lambda v, b: _ref(bytes(v), b), _blob),
    "list[str]": (lambda v, b: list(v), _dec_names),
    "dict[str, bytes]": (_enc_bytes_map, _dec_bytes_map),
    "list[KeyAdvertisement]": (_enc_adverts, _dec_adverts),
    "np.ndarray": (_enc_vector, _dec_vector),
}


@dataclass
class ProtocolMessage:
    """Base of all messages. ``round_id`` ties a message to one aggregation round."""

    STAGE: ClassVar[str] = ""
    round_id: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # -- dict form (what the JSON header holds; bytes and arrays become blob references) -------------------
    def to_dict(self, blobs: list) -> dict[str, Any]:
        return {"type": type(self).__name__,
                **{f.name: _CODECS[str(f.type)][0](getattr(self, f.name), blobs) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: Any, blobs: list) -> ProtocolMessage:
        kind = _REGISTRY.get(d.get("type")) if isinstance(d, dict) and isinstance(d.get("type"), str) else None
        if kind is None or (cls is not ProtocolMessage and not issubclass(kind, cls)):
            got = d.get("type") if isinstance(d, dict) else type(d).__name__
            raise ProtocolError(f"expected a {cls.__name__} message, got {str(got)[:40]!r}")
        names = [f.name for f in fields(kind)]
        if set(d) - {"type"} != set(names):
            raise ProtocolError(f"{kind.__name__}: its fields do not match {sorted(names)}")
        values = {}
        for f in fields(kind):
            try:
                values[f.name] = _CODECS[str(f.type)][1](d[f.name], blobs)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
                raise ProtocolError(f"{kind.__name__}: field {f.name!r} is malformed ({err})") from None
        if not 0 <= values["round_id"] < 2**63:
            raise ProtocolError(f"{kind.__name__}: round_id is not in [0, 2^63)")
        return kind(**values)

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
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ProtocolMessage:
        try:
            mv = memoryview(data).cast("B")
        except (TypeError, ValueError):
            raise ProtocolError("not a byte string; check the transport") from None
        if mv.nbytes < 8 or bytes(mv[:4]) != MAGIC:
            raise ProtocolError("not a fedse secure-aggregation message (bad magic or too short); check the transport")
        (hlen,) = struct.unpack(">I", mv[4:8])
        if hlen > MAX_HEADER_BYTES or 8 + hlen > mv.nbytes:
            raise ProtocolError("malformed message: header length out of range; the transport corrupted it")
        try:
            header = json.loads(bytes(mv[8 : 8 + hlen]))
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ProtocolError(f"malformed message header ({type(err).__name__}); the transport corrupted it") from None
        pos, blobs = 8 + hlen, []
        while pos < mv.nbytes:
            if pos + 8 > mv.nbytes or len(blobs) >= MAX_BLOBS:
                raise ProtocolError("malformed message: truncated blob; the transport cut it short")
            (blen,) = struct.unpack(">Q", mv[pos : pos + 8])
            if blen > mv.nbytes - pos - 8:
                raise ProtocolError("malformed message: truncated blob; the transport cut it short")
            blobs.append(mv[pos + 8 : pos + 8 + blen])
            pos += 8 + blen
        try:
            return cls.from_dict(header, blobs)
        except RecursionError:
            raise ProtocolError("malformed message header (nested too deeply)") from None


def decode(data: bytes | bytearray | memoryview) -> ProtocolMessage:
    """Any protocol message from its wire form; raises :class:`ProtocolError` (only) if it is not one."""
    return ProtocolMessage.from_bytes(data)


# ---- stage 0: advertise keys -----------------------------------------------------------------------------
@dataclass
class SetupRequest(ProtocolMessage):
    """S -> C: the round's parameters. Every institution signs :meth:`digest` in its key advertisement, so a
    coordinator that shows institutions different setups is caught when they verify each other. ``nonce`` is
    fresh per round (no two setups share a digest, and an institution refuses one it has answered before);
    ``server_key`` is the coordinator's fresh X25519 key, against which institutions tag their masked inputs.
    The neighbour graph is not in the setup: it is drawn from every key advertisement (``graph``)."""

    STAGE: ClassVar[str] = Stage.ADVERTISE_KEYS
    participants: list[str] = field(default_factory=list)
    threshold: int = 0
    degree: int = 0
    ring_bits: int = 32
    fractional_bits: int = 24
    clip_range: float = 8.0
    vector_len: int = 0
    nonce: bytes = b""
    server_key: bytes = b""

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
            "nonce": self.nonce.hex(),
            "server_key": self.server_key.hex(),
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
    """S -> C: every signed advertisement that reached the server (the roster). Each institution verifies all
    of them and derives the graph seed from all of them, so neither the coordinator nor any institution
    chooses the graph."""

    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    adverts: list[KeyAdvertisement] = field(default_factory=list)


@dataclass
class EncryptedShares(ProtocolMessage):
    """C -> S: for each neighbour, AES-256-GCM(nonce || ciphertext) of the sender's Shamir shares of its
    self-mask seed and mask private key (the AD binds session, round, sender and receiver); for each holder
    (itself included) the SHA-256 commitments to the two shares it holds; and the sender's signature over
    those commitments, which lets the server tell a corrupted share from a good one."""

    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    sender: str = ""
    ciphertexts: dict[str, bytes] = field(default_factory=dict)
    commitments: dict[str, bytes] = field(default_factory=dict)
    signature: bytes = b""


def commitments_payload(session: bytes, round_id: int, dealer: str, commitments: dict[str, bytes]) -> bytes:
    return frame("share-commitments", session, round_id, dealer,
                 *[part for h in sorted(commitments) for part in (h, commitments[h])])


# ---- stage 2: masked input -------------------------------------------------------------------------------
@dataclass
class MaskedInputRequest(ProtocolMessage):
    """S -> C: the ciphertexts addressed to the recipient, keyed by their sender. The senders are the
    recipient's neighbours that finished ``share_keys``; exactly those get a pairwise mask."""

    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    ciphertexts: dict[str, bytes] = field(default_factory=dict)


@dataclass
class MaskedInput(ProtocolMessage):
    """C -> S: the masked, quantised update (uint32 or uint64 ring elements; its last element is the masked
    count of clipped values, so ``vector.size == setup.vector_len + 1``) and a 16-byte AES-GMAC tag over it,
    keyed by the sender's share-encryption key and the coordinator's setup key, bound to session, round and
    sender: a tampered, relabelled or replayed vector is rejected before it reaches the sum."""

    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    sender: str = ""
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    tag: bytes = b""

    @classmethod
    def allocate(cls, round_id: int, sender: str, size: int, dtype: np.dtype) -> tuple[memoryview, np.ndarray,
                                                                                      memoryview]:
        """The wire form of a masked input, with the vector and tag still to be written in place: (buffer,
        vector view, tag view). The masking pass writes straight into the message, so the masked vector is
        never copied to be sent."""
        dtype = np.dtype(dtype).newbyteorder("<")
        header = json.dumps({"type": cls.__name__, "round_id": int(round_id), "sender": str(sender),
                             "vector": {"$b": 0, "dtype": dtype.str}, "tag": {"$b": 1}},
                            separators=(",", ":")).encode()
        # Trailing spaces (valid JSON) put the vector at a multiple of 64 bytes into the message: numpy's loops
        # over a misaligned uint32 array are several times slower, on both ends.
        header += b" " * (-(len(MAGIC) + 4 + len(header) + 8) % 64)
        nbytes = size * dtype.itemsize
        head = MAGIC + struct.pack(">I", len(header)) + header + struct.pack(">Q", nbytes)
        # numpy's allocation, not bytearray's: no zero fill (the masking pass writes every element), and numpy
        # asks the kernel for huge pages, so filling 32 MB takes ~16 page faults instead of ~8000.
        at = len(head) + nbytes
        buf = memoryview(np.empty(at + 8 + TAG_BYTES, dtype=np.uint8))
        buf[: len(head)] = head
        buf[at : at + 8] = struct.pack(">Q", TAG_BYTES)
        vector = np.frombuffer(buf[len(head) : at], dtype=dtype)
        return buf, vector, buf[at + 8 :]

    @classmethod
    def prebuilt(cls, wire: memoryview, round_id: int, sender: str, vector: np.ndarray, tag: bytes) -> MaskedInput:
        """The message whose wire form :meth:`allocate` made and the client filled in."""
        msg = cls(round_id=round_id, sender=sender, vector=vector, tag=tag)
        msg._wire = (wire, round_id, sender, vector, tag)
        return msg

    def to_bytes(self) -> bytes:
        prebuilt = self.__dict__.get("_wire")
        # The buffer is this message only while no field was replaced since (a test or a threat check may
        # relabel or swap one); changes made to the vector in place are in the buffer already.
        if prebuilt is not None and prebuilt[1:3] == (self.round_id, self.sender) and prebuilt[3] is self.vector \
                and prebuilt[4] == self.tag:
            return prebuilt[0]
        return super().to_bytes()


def masked_input_header(session: bytes, round_id: int, sender: str, size: int) -> bytes:
    """What the masked-input tag authenticates before the vector itself."""
    return frame("masked-input", session, round_id, sender, size)


# ---- stage 3: consistency check --------------------------------------------------------------------------
@dataclass
class ConsistencyRequest(ProtocolMessage):
    """S -> C: the survivors (clients whose masked input the server holds)."""

    STAGE: ClassVar[str] = Stage.CONSISTENCY
    survivors: list[str] = field(default_factory=list)


@dataclass
class ConsistencySignature(ProtocolMessage):
    """C -> S: the sender's Ed25519 signature over (session, round, sorted survivors)."""

    STAGE: ClassVar[str] = Stage.CONSISTENCY
    sender: str = ""
    signature: bytes = b""


def survivors_payload(session: bytes, round_id: int, survivors: list[str]) -> bytes:
    return frame("survivors", session, round_id, json.dumps(sorted(survivors)))


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
