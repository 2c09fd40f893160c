"""StageRequest/StageReply <-> Flower ``RecordDict`` (a ``ConfigRecord`` header + an ``ArrayRecord`` of byte
blobs, so large payloads go through Flower's chunked object store rather than one config value)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedse_secure.federation.wire import StageReply, StageRequest, WireError

HEADER = "fedse"
BLOBS = "blobs"


def _to_record(header: dict[str, Any], blobs: dict[str, bytes]) -> RecordDict:
    arrays = ArrayRecord({name: Array(np.frombuffer(bytes(b), dtype=np.uint8)) for name, b in blobs.items()})
    return RecordDict({HEADER: ConfigRecord(dict(header)), BLOBS: arrays})


def _from_record(content: RecordDict) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Header and blobs of a received message; :class:`WireError` (only) for anything that is not ours: the
    content comes from another organisation's process, so nothing in it may crash the receiver."""
    try:
        header = content.config_records[HEADER]
        arrays = content.array_records[BLOBS]
    except KeyError as err:
        raise WireError(f"Flower message lacks the {err} record; not a fedse message") from None
    except Exception as err:
        raise WireError(f"not a Flower RecordDict ({type(err).__name__})") from None
    try:
        header = dict(header)
        blobs = {}
        for name in arrays.keys():
            arr = arrays[name].numpy()
            if not isinstance(name, str) or arr.dtype != np.uint8 or arr.ndim != 1:
                raise WireError(f"blob {name!r} is {arr.dtype}{list(arr.shape)}, expected a flat uint8 array")
            blobs[name] = arr.tobytes()
    except WireError:
        raise
    except Exception as err:
        raise WireError(f"unreadable blobs in the Flower message ({type(err).__name__})") from None
    return header, blobs


def request_to_record(req: StageRequest) -> RecordDict:
    return _to_record(req.header(), req.blobs)


def request_from_record(content: RecordDict) -> StageRequest:
    return StageRequest.from_parts(*_from_record(content))


def reply_to_record(reply: StageReply) -> RecordDict:
    return _to_record(reply.header(), reply.blobs)


def reply_from_record(content: RecordDict) -> StageReply:
    return StageReply.from_parts(*_from_record(content))
