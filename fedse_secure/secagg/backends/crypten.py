"""``secure_aggregation: crypten``: the sum computed by CrypTen MPC parties on one host.

Single-site by declaration (``cross_machine=False``): each institution's client machine hands its checked
update to the coordinator's host, where :class:`~fedse_secure.secagg.crypten_backend.aggregator.CryptenParties`
starts one CrypTen party per institution (plus the coordinator's) and only the sum is revealed. Across
organisations that hand-over would put every update on the network in the clear, and CrypTen's gloo traffic
is unauthenticated, so a deployment refuses this backend. The sharing is n-of-n: a missing institution aborts
the round. Protocol, trust model and limits: ``secagg/crypten_backend/aggregator.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from fedse_secure.secagg.backends import BACKENDS
from fedse_secure.secagg.base import Backend, Capabilities, FixedPointSettings, MessageRejected, SecureAggregationError
from fedse_secure.secagg.encoding import check_finite, count_out_of_range, refuse_out_of_range
from fedse_secure.secagg.single_stage import INPUT, InputClient, InputServer


class CryptenSettings(FixedPointSettings):
    """``federation.secure_aggregation`` for CrypTen MPC parties on the coordinator's host (single-site)."""

    backend: Literal["crypten"] = "crypten"


class CryptenServer(InputServer):
    missing_means = ("CrypTen's n-of-n sharing cannot leave a party out, so the round is abandoned and nothing is "
                     "revealed (secure_aggregation: masking tolerates dropouts)")

    def __init__(self, backend: CryptenBackend, round_id: int, participants: Sequence[str], vector_len: int) -> None:
        super().__init__(round_id, participants, vector_len, backend.min_participants)
        self.backend = backend
        self._inputs: dict[str, np.ndarray] = {}
        self._clipped = 0
        self._seconds = {INPUT: 0.0}

    def accept(self, sender, header, body):
        clipped = header.get("values_clipped")
        if not isinstance(clipped, int) or clipped < 0 or body.nbytes != 8 * self.vector_len:
            raise MessageRejected(f"round {self.round_id}: the input of {sender!r} does not fit this round; rejected")
        self._inputs[sender] = np.frombuffer(body, dtype="<f8")
        self._clipped += clipped

    def release(self):
        from fedse_secure.secagg.crypten_backend.aggregator import CryptenParties

        names = list(self.participants)
        engine = CryptenParties(self.backend.settings, **self.backend.engine_options)
        total, measurements = engine.sum(self.round_id, names, [self._inputs[n] for n in names])
        self._seconds[INPUT] = float(measurements.get("crypten_wall_s", 0.0))
        self._inputs = {}
        return total, {"values_clipped": self._clipped, **measurements}

    @property
    def seconds(self) -> dict[str, float]:
        return dict(self._seconds)


class CryptenClient(InputClient):
    def __init__(self, name: str, settings: CryptenSettings) -> None:
        super().__init__(name)
        self.settings = settings

    def encode(self, vector):
        check_finite(vector, self.name)
        c = self.settings.clip_range
        clipped = count_out_of_range(vector, c)
        if clipped and self.settings.on_out_of_range == "refuse":
            refuse_out_of_range(self.name, vector, c, clipped)
        return {"values_clipped": clipped}, memoryview(np.ascontiguousarray(vector, dtype="<f8"))


@BACKENDS.register("crypten")
class CryptenBackend(Backend):
    name = "crypten"
    Settings = CryptenSettings
    capabilities = Capabilities(cross_machine=False, tolerates_dropouts=False, hides_inputs=True)
    stages = (INPUT,)
    input_stage = INPUT

    def __init__(self, settings: CryptenSettings | None = None, **engine_options) -> None:
        """``engine_options`` go to :class:`CryptenParties` (``python``, ``workdir_root``, ``startup_allowance_s``)."""
        super().__init__(settings)
        self.engine_options = engine_options

    def check(self, n_participants: int) -> None:
        super().check(n_participants)
        from fedse_secure.secagg.crypten_backend import fixed_point

        try:
            fixed_point.check_headroom(n_participants, self.settings.clip_range, self.settings.fractional_bits)
        except SecureAggregationError as err:
            raise ValueError(str(err)) from None

    @property
    def value_bound(self) -> float:
        return float(self.settings.clip_range)

    def server(self, round_id, participants, vector_len, registry=None, *, seed=None) -> CryptenServer:
        from fedse_secure.secagg.crypten_backend.compat import check_crypten_installed

        # Fail before anyone trains if CrypTen is missing (the import itself happens only in the parties).
        check_crypten_installed()
        return CryptenServer(self, round_id, participants, vector_len)

    def client(self, name, identity=None, registry=None, *, seed=None) -> CryptenClient:
        return CryptenClient(name, self.settings)
