"""What travels between the coordinator and an institution for one stage of a round. No I/O, no flwr import.

One round, whatever the transport (each line is one exchange with the live institutions)::

    <first stage>   S -> C: global adapter (safetensors), experiment JSON, the backend's first request, train=True
                    C: local_round() -> payload; the backend's client machine takes it and answers the request
                    C -> S: the backend's reply + the institution's round report
    <other stages>  the backend's request -> its reply (masking: share_keys, masked_input, consistency, unmask)
    evaluate        global adapter -> the institution's evaluation (after a round whose result is evaluated)

Local training is folded into the first stage, so a round costs one exchange per backend stage; the payload
never leaves the institution except as the backend's client machine sends it. Every message carries the
run key (a hash of the experiment), and both ends check it, so no message of another experiment or an
earlier run is ever acted on.

The same frames (:func:`pack`: a JSON header, then raw byte blobs; nothing is ever unpickled) are used on
every link: Flower messages, the worker's Unix socket, and the in-process simulation, which round-trips every
request and reply through them so that the codec is exercised on every round.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedse_secure.errors import FedseError

EVALUATE = "evaluate"
# Message type prefix on Flower messages ("query" is the ClientApp handler our app registers).
FLOWER_MESSAGE_TYPE = "query.fedse"
MAX_HEADER_BYTES = 1 << 20
#: Why an institution refused a stage (``StageReply.refusal``); a round in which every institution is out of
#: budget ends the run.
BUDGET_EXHAUSTED = "budget_exhausted"
REFUSED = "refused"


class WireError(FedseError, ValueError):
    """A message that does not have the expected shape (never trusted, always rejected)."""


def run_key(experiment_json: str) -> str:
    """The key that ties every message to one experiment (a hash of its JSON)."""
    return hashlib.sha256(experiment_json.encode()).hexdigest()[:16]


@dataclass
class StageRequest:
    """Coordinator -> institution, for one stage of one round."""

    stage: str
    round_id: int
    run_key: str
    # First stage and evaluate: the experiment as JSON (the institution checks it against run_key).
    experiment_json: str = ""
    # First stage of a round: run the local round on the attached global adapter, then answer the request.
    train: bool = False
    # "request": the backend's request bytes; "global_state" + "global_state_keys": the adapter (models.adapters).
    blobs: dict[str, bytes] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {"kind": "request", "stage": self.stage, "round_id": self.round_id, "run_key": self.run_key,
                "experiment_json": self.experiment_json, "train": self.train}

    @classmethod
    def from_parts(cls, header: dict[str, Any], blobs: dict[str, bytes]) -> StageRequest:
        """The request in a decoded header and blobs; :class:`WireError` (only) for anything malformed."""
        with _malformed("stage request"):
            _expect_kind(header, "request")
            return cls(stage=_field(header, "stage", str), round_id=_round_id(header),
                       run_key=_field(header, "run_key", str),
                       experiment_json=_field(header, "experiment_json", str, ""),
                       train=_field(header, "train", bool, False), blobs=_blobs(blobs))


@dataclass
class StageReply:
    """Institution -> coordinator."""

    stage: str
    round_id: int
    institution: str
    run_key: str = ""
    # The institution's round report (first stage) or evaluation (evaluate): numbers and short strings only.
    report: dict[str, Any] = field(default_factory=dict)
    # "reply": the backend's reply bytes (absent for evaluate and refusals).
    blobs: dict[str, bytes] = field(default_factory=dict)
    # Set when the institution refused the stage: it then drops out of the round. ``refusal`` says why.
    error: str = ""
    refusal: str = ""

    def header(self) -> dict[str, Any]:
        return {"kind": "reply", "stage": self.stage, "round_id": self.round_id, "institution": self.institution,
                "run_key": self.run_key, "report_json": json.dumps(self.report, default=_jsonable),
                "error": self.error, "refusal": self.refusal}

    @classmethod
    def from_parts(cls, header: dict[str, Any], blobs: dict[str, bytes]) -> StageReply:
        """The reply in a decoded header and blobs; :class:`WireError` (only) for anything malformed."""
        with _malformed("stage reply"):
            _expect_kind(header, "reply")
            report_json = _field(header, "report_json", str, "") or "{}"
            if len(report_json) > MAX_HEADER_BYTES:
                raise WireError(f"report of {len(report_json)} characters exceeds {MAX_HEADER_BYTES}")
            report = _json_object(report_json, "report_json")
            return cls(stage=_field(header, "stage", str), round_id=_round_id(header),
                       institution=_field(header, "institution", str), run_key=_field(header, "run_key", str, ""),
                       report=report, blobs=_blobs(blobs), error=_field(header, "error", str, ""),
                       refusal=_field(header, "refusal", str, ""))


_MISSING = object()


class _malformed:
    """Any failure while decoding an untrusted message becomes one :class:`WireError`: a peer must never be
    able to make the receiver raise anything else (a crash of the coordinator would end everyone's run)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, _tb) -> bool:
        if err is None or kind is None or not issubclass(kind, Exception):
            return False
        if isinstance(err, WireError):
            raise WireError(f"malformed {self.what}: {err}") from None
        raise WireError(f"malformed {self.what} ({type(err).__name__})") from None


def _expect_kind(header: Any, kind: str) -> None:
    if not isinstance(header, dict):
        raise WireError(f"the header is a {type(header).__name__}, not a mapping")
    if header.get("kind") != kind:
        raise WireError(f"kind is {header.get('kind')!r}, expected {kind!r}")


def _field(header: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = header.get(name, default)
    if value is _MISSING:
        raise WireError(f"{name} is missing")
    # bool is an int in Python: a field of one kind must not accept the other.
    if type(value) is not kind:
        raise WireError(f"{name} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _round_id(header: dict[str, Any]) -> int:
    value = _field(header, "round_id", int)
    if not -(2**31) <= value < 2**31:  # -1: a refusal of a request that named no round
        raise WireError(f"round_id {value} is out of range")
    return value


def _blobs(blobs: Any) -> dict[str, bytes]:
    if not isinstance(blobs, dict):
        raise WireError(f"blobs are a {type(blobs).__name__}, not a mapping")
    out = {}
    for name, data in blobs.items():
        if not isinstance(name, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f"blob {name!r} is not named bytes")
        out[name] = bytes(data)
    return out


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise WireError(f"{what} is not JSON ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object")
    return value


def _jsonable(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def pack(header: dict[str, Any], blobs: dict[str, bytes]) -> list[bytes]:
    """Frames: header JSON (with the blob names, in order), then each blob."""
    names = sorted(blobs)
    head = json.dumps({**header, "blob_names": names}).encode()
    return [head, *(bytes(blobs[n]) for n in names)]


def unpack_header(frame: bytes) -> tuple[dict[str, Any], list[str]]:
    """The header frame: a JSON object and its blob names. :class:`WireError` (only) for anything else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"the header frame is a {type(frame).__name__}, not bytes")
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}; rejected")
    try:
        header = json.loads(bytes(frame).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"header is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    names = header.pop("blob_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WireError("the header's blob_names must be a list of names")
    if len(set(names)) != len(names):
        raise WireError("the header names a blob twice; rejected")
    return header, names


def unpack(frames: list[bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The inverse of :func:`pack`; :class:`WireError` (only) for any other sequence of frames."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("a message needs at least its header frame")
    header, names = unpack_header(frames[0])
    if len(names) != len(frames) - 1:
        raise WireError(f"the header names {len(names)} blobs but {len(frames) - 1} followed; rejected")
    blobs = {}
    for name, frame in zip(names, frames[1:]):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise WireError(f"blob {name!r} is a {type(frame).__name__}, not bytes")
        blobs[name] = bytes(frame)
    return header, blobs


def decode_request(frames: list[bytes]) -> StageRequest:
    """A :class:`StageRequest` from its frames; :class:`WireError` for any byte strings that are not one."""
    return StageRequest.from_parts(*unpack(frames))


def decode_reply(frames: list[bytes]) -> StageReply:
    """A :class:`StageReply` from its frames; :class:`WireError` for any byte strings that are not one."""
    return StageReply.from_parts(*unpack(frames))


def encode(message: StageRequest | StageReply) -> list[bytes]:
    return pack(message.header(), message.blobs)
