"""What travels in one Flower message, and in one request to an institution's worker. No I/O, no flwr import.

One round over Flower (each line is one ``Grid.send_and_receive`` to the live institutions)::

    advertise_keys   S -> C: global adapter (safetensors), experiment JSON, SetupRequest
                     C: [evaluate the global adapter] + local_round() -> payload; SecAggClient.set_input(payload)
                     C -> S: KeyAdvertisement (+ local metrics)
    share_keys       KeysBroadcast        -> EncryptedShares
    masked_input     MaskedInputRequest   -> MaskedInput
    consistency      ConsistencyRequest   -> ConsistencySignature
    unmask           UnmaskRequest        -> UnmaskShares
    (after the last round) evaluate: global adapter -> evaluation metrics

Local training is folded into the first stage so a round costs five message round trips, not six; the
payload never leaves the institution except masked, inside ``MaskedInput``.

The worker link (ClientApp process -> the institution's long-lived worker) reuses :func:`pack`/:func:`unpack`:
a JSON header frame followed by raw byte frames; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

EVALUATE = "evaluate"
# Message type prefix on Flower messages ("query" is the ClientApp handler our app registers).
FLOWER_MESSAGE_TYPE = "query.fedse"
MAX_HEADER_BYTES = 1 << 20


class WireError(ValueError):
    """A message that does not have the expected shape (never trusted, always rejected)."""


@dataclass
class StageRequest:
    """Coordinator -> institution, for one stage of one round."""

    stage: str
    round_id: int
    run_key: str
    # advertise_keys / evaluate: the experiment as JSON (the institution overlays its own local settings).
    experiment_json: str = ""
    # advertise_keys: also evaluate the incoming global adapter before training (the previous round's result).
    evaluate_first: bool = False
    # "request": the secagg request (ProtocolMessage.to_bytes()); "global_state": safetensors bytes.
    blobs: dict[str, bytes] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {"kind": "request", "stage": self.stage, "round_id": self.round_id, "run_key": self.run_key,
                "experiment_json": self.experiment_json, "evaluate_first": self.evaluate_first}

    @classmethod
    def from_parts(cls, header: dict[str, Any], blobs: dict[str, bytes]) -> StageRequest:
        try:
            if header.get("kind") != "request":
                raise KeyError("kind")
            return cls(stage=str(header["stage"]), round_id=int(header["round_id"]), run_key=str(header["run_key"]),
                       experiment_json=str(header.get("experiment_json", "")),
                       evaluate_first=bool(header.get("evaluate_first", False)), blobs=blobs)
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"malformed stage request header ({err})") from None


@dataclass
class StageReply:
    """Institution -> coordinator."""

    stage: str
    round_id: int
    institution: str
    # Local metrics (training loss, explore success, evaluation); numbers and short strings only.
    metrics: dict[str, Any] = field(default_factory=dict)
    # "reply": the secagg reply bytes (absent for evaluate).
    blobs: dict[str, bytes] = field(default_factory=dict)
    # Set when the institution refused the stage (budget exhausted, protocol violation, ...): it then drops out.
    error: str = ""

    def header(self) -> dict[str, Any]:
        return {"kind": "reply", "stage": self.stage, "round_id": self.round_id, "institution": self.institution,
                "metrics_json": json.dumps(self.metrics, default=_jsonable), "error": self.error}

    @classmethod
    def from_parts(cls, header: dict[str, Any], blobs: dict[str, bytes]) -> StageReply:
        try:
            if header.get("kind") != "reply":
                raise KeyError("kind")
            metrics = json.loads(header.get("metrics_json") or "{}")
            if not isinstance(metrics, dict):
                raise TypeError("metrics must be a mapping")
            return cls(stage=str(header["stage"]), round_id=int(header["round_id"]),
                       institution=str(header["institution"]), metrics=metrics, blobs=blobs,
                       error=str(header.get("error", "")))
        except (KeyError, TypeError, ValueError) as err:
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
    """Frames for the worker link: header JSON (with the blob names, in order), then each blob."""
    names = sorted(blobs)
    head = json.dumps({**header, "blob_names": names}).encode()
    return [head, *(bytes(blobs[n]) for n in names)]


def unpack_header(frame: bytes) -> tuple[dict[str, Any], list[str]]:
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}; rejected")
    try:
        header = json.loads(frame.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("blob_names", []), list):
        raise WireError("header must be a JSON object with a blob_names list")
    names = [str(n) for n in header.pop("blob_names", [])]
    return header, names
