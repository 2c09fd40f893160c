"""``secure_aggregation: none``: every institution sends its update in the clear and the coordinator sums.

For baselines and benchmarks only: the coordinator sees every individual update. One stage: the server asks
for the input, each institution replies with its vector (in the float dtype it was given), the server checks it
is finite and adds it. Every participant must reply (a partial sum would be a different experiment).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedse_secure.secagg.backends import BACKENDS
from fedse_secure.secagg.base import Backend, BackendSettings, Capabilities, MessageRejected, SecureAggregationError
from fedse_secure.secagg.encoding import check_finite
from fedse_secure.secagg.single_stage import INPUT, InputClient, InputServer

_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}


class PlaintextSettings(BackendSettings):
    """``federation.secure_aggregation`` for the plaintext baseline (no protection)."""

    backend: Literal["none"] = "none"


class PlaintextServer(InputServer):
    missing_means = "the plaintext baseline sums every participant, so the round is abandoned"

    def __init__(self, round_id, participants, vector_len) -> None:
        super().__init__(round_id, participants, vector_len, PlaintextBackend.min_participants)
        # Allocated by the first input's copy, not by np.zeros: numpy backs the copy with huge pages, calloc's
        # fresh zero pages fault in 4 KiB at a time (16k faults, ~35 ms a round at 8M parameters on this VM).
        self._sum: np.ndarray | None = None

    def accept(self, sender, header, body):
        dtype = _DTYPES.get(header.get("dtype"))
        if dtype is None or body.nbytes != self.vector_len * dtype.itemsize:
            raise MessageRejected(f"round {self.round_id}: the input of {sender!r} is not {self.vector_len} float32 "
                                  "or float64 values; rejected")
        vector = np.frombuffer(body, dtype=dtype)
        try:
            check_finite(vector, sender)
        except SecureAggregationError as err:
            raise MessageRejected(f"round {self.round_id}: {err}; rejected") from None
        if self._sum is None:
            self._sum = vector.astype(np.float64)
        else:
            self._sum += vector

    def release(self):
        return (self._sum if self._sum is not None else np.zeros(self.vector_len, dtype=np.float64)), {}


class PlaintextClient(InputClient):
    def encode(self, vector):
        # check_update kept float32/float64 as they are; the server checks finiteness on arrival.
        v = np.ascontiguousarray(vector, dtype=vector.dtype.newbyteorder("<"))
        return {"dtype": v.dtype.str}, memoryview(v)


@BACKENDS.register("none")
class PlaintextBackend(Backend):
    name = "none"
    Settings = PlaintextSettings
    capabilities = Capabilities(cross_machine=True, tolerates_dropouts=False, hides_inputs=False)
    stages = (INPUT,)
    input_stage = INPUT
    min_participants = 1

    def server(self, round_id, participants, vector_len, registry=None, *, seed=None) -> PlaintextServer:
        return PlaintextServer(round_id, participants, vector_len)

    def client(self, name, identity=None, registry=None, *, seed=None) -> PlaintextClient:
        return PlaintextClient(name)
