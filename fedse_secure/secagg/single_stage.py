"""The shape both one-stage backends (``none``, ``crypten``) share: the server asks every participant once for
its input, checks each reply as it arrives, and releases the sum when the stage closes; every participant must
answer (neither backend can leave one out). A subclass says how an input is sent (:meth:`InputClient.encode`),
accepted (:meth:`InputServer.accept`) and summed (:meth:`InputServer.release`).

Wire form of their messages: u32 header length | JSON header | raw body.
"""

from __future__ import annotations

import json
import struct
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedse_secure.secagg.base import (
    AggregateResult,
    ClientMachine,
    MessageRejected,
    RoundAbortedError,
    SecureAggregationError,
    ServerMachine,
)
from fedse_secure.secagg.encoding import check_update

INPUT = "input"
MAX_HEADER_BYTES = 1 << 16


#: Bodies from this size on are framed into a numpy buffer (see :func:`frame`).
_LARGE_BODY = 1 << 20


def frame(header: dict, body: bytes | memoryview = b"") -> bytes | memoryview:
    """The framed message; ``body`` may be any contiguous buffer (an array's memory is copied once, here)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    body = memoryview(body).cast("B")
    if body.nbytes < _LARGE_BODY:
        return b"".join((struct.pack(">I", len(head)), head, body))
    # A large body goes into numpy's allocation, as the masked input does (MaskedInput.allocate): numpy asks for
    # huge pages, so a 32 MB message faults ~16 times instead of ~8000 (15 ms instead of 3.4 on this VM). Trailing
    # spaces (valid JSON) put the body at a multiple of 64 bytes, where numpy's loops over it run at full speed.
    head += b" " * (-(4 + len(head)) % 64)
    out = np.empty(4 + len(head) + body.nbytes, dtype=np.uint8)
    out[:4] = np.frombuffer(struct.pack(">I", len(head)), dtype=np.uint8)
    out[4 : 4 + len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[4 + len(head) :] = np.frombuffer(body, dtype=np.uint8)
    return memoryview(out)


def unframe(data: bytes, who: str) -> tuple[dict, memoryview]:
    """(header, body) of a framed message; anything malformed is :class:`MessageRejected`."""
    mv = memoryview(data)
    try:
        (n,) = struct.unpack(">I", mv[:4])
        if n > MAX_HEADER_BYTES or 4 + n > mv.nbytes:
            raise ValueError("header length out of range")
        header = json.loads(bytes(mv[4 : 4 + n]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise MessageRejected(f"{who}: malformed message ({err}); rejected") from None
    return header, mv[4 + n :]


class InputServer(ServerMachine):
    #: Why a round with a missing participant is abandoned (ends the RoundAbortedError message).
    missing_means: str = "the round is abandoned"

    def __init__(self, round_id: int, participants: Sequence[str], vector_len: int, min_participants: int) -> None:
        self.round_id, self.participants, self.vector_len = int(round_id), sorted(participants), int(vector_len)
        if len(set(self.participants)) != len(self.participants) or len(self.participants) < min_participants:
            raise SecureAggregationError(
                f"round {round_id}: this backend needs at least {min_participants} distinct institutions (with "
                f"fewer, the sum reveals an input), got {self.participants}; add clients"
            )
        self._received: set[str] = set()

    def start(self) -> dict[str, bytes]:
        if self.stage is not None or self.result is not None:
            raise MessageRejected(f"round {self.round_id} already started")
        self.stage = INPUT
        request = frame({"round_id": self.round_id, "vector_len": self.vector_len})
        return {p: request for p in self.participants}

    def receive(self, sender: str, data: bytes) -> None:
        if self.stage != INPUT:
            raise MessageRejected(f"round {self.round_id}: no stage is open; the reply of {sender!r} is rejected")
        if sender not in self.participants or sender in self._received:
            raise MessageRejected(f"round {self.round_id}: unexpected or duplicate input from {sender!r}; rejected")
        header, body = unframe(data, f"round {self.round_id}")
        if header.get("round_id") != self.round_id:
            raise MessageRejected(f"round {self.round_id}: the input of {sender!r} is for round "
                                  f"{header.get('round_id')!r}; rejected")
        self.accept(sender, header, body)
        self._received.add(sender)

    def advance(self) -> dict[str, bytes]:
        if self.stage != INPUT:
            raise MessageRejected(f"round {self.round_id}: advance() before start() or after the round ended")
        self.stage = None
        missing = sorted(set(self.participants) - self._received)
        if missing:
            raise RoundAbortedError(f"round {self.round_id}: {missing} sent no input; {self.missing_means}")
        total, measurements = self.release()
        n = len(self.participants)
        self.result = AggregateResult(total=total, survivors=list(self.participants),
                                      measurements={"n_participants": n, "n_survivors": n, "n_dropped": 0,
                                                    **measurements})
        return {}

    @abstractmethod
    def accept(self, sender: str, header: dict[str, Any], body: memoryview) -> None:
        """Check one input and take it in; :class:`MessageRejected` (state unchanged) if it does not fit."""

    @abstractmethod
    def release(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The sum of every input (float64) and what was measured."""


class InputClient(ClientMachine):
    def __init__(self, name: str) -> None:
        self.name = name
        self._vector: np.ndarray | None = None
        self._done = False

    def set_input(self, vector: np.ndarray) -> None:
        self._vector = check_update(self.name, vector)

    def handle(self, data: bytes) -> bytes:
        if self._done:
            raise MessageRejected(f"{self.name}: this round's input was already sent; a second request is refused")
        header, _ = unframe(data, self.name)
        if self._vector is None:
            raise SecureAggregationError(f"{self.name}: no update to send; call set_input() first")
        extra, body = self.encode(check_update(self.name, self._vector, header.get("vector_len")))
        self._done = True
        return frame({"round_id": header.get("round_id"), **extra}, body)

    @property
    def done(self) -> bool:
        return self._done

    @abstractmethod
    def encode(self, vector: np.ndarray) -> tuple[dict[str, Any], memoryview]:
        """What is sent for ``vector``: header fields and the body."""
