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
        try:
            if header.get("kind") != "request":
                raise KeyError("kind")
            return cls(stage=str(header["stage"]), round_id=int(header["round_id"]), run_key=str(header["run_key"]),
                       experiment_json=str(header.get("experiment_json", "")),
                       train=bool(header.get("train", False)), blobs=blobs)
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"malformed stage request header ({err})") from None


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
        try:
            if header.get("kind") != "reply":
                raise KeyError("kind")
            report = json.loads(header.get("report_json") or "{}")
            if not isinstance(report, dict):
                raise TypeError("report must be a mapping")
            return cls(stage=str(header["stage"]), round_id=int(header["round_id"]),
                       institution=str(header["institution"]), run_key=str(header.get("run_key", "")),
                       report=report, blobs=blobs, error=str(header.get("error", "")),
                       refusal=str(header.get("refusal", "")))
        except (KeyError, TypeError, ValueError, RecursionError) as err:
            raise WireError(f"malformed stage reply header ({err})") from None


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
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}; rejected")
    try:
        header = json.loads(frame.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("blob_names", []), list):
        raise WireError("header must be a JSON object with a blob_names list")
    names = [str(n) for n in header.pop("blob_names", [])]
    return header, names


def unpack(frames: list[bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The inverse of :func:`pack`."""
    header, names = unpack_header(frames[0])
    if len(names) != len(frames) - 1:
        raise WireError(f"the header names {len(names)} blobs but {len(frames) - 1} followed; rejected")
    return header, dict(zip(names, frames[1:]))
