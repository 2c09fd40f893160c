"""``secure_aggregation: masking``: SecAgg / SecAgg+ pairwise masking (``fedse_secure.secagg.masking``).

The protocol's state machines work on decoded messages (:class:`SecAggServer`, :class:`SecAggClient`); this
module gives them the backend-neutral bytes interface and is the only place outside ``secagg/masking`` that
constructs them. The seams a threat check needs are constructor arguments of :class:`MaskingBackend`: the
share cipher (``aead``) and the client class (``client_class``), so a protection is switched off by
injection, never by patching a module.
"""

from __future__ import annotations

from collections.abc import Callable

from fedse_secure.secagg.backends import BACKENDS
from fedse_secure.secagg.base import Backend, Capabilities, ClientMachine, ServerMachine
from fedse_secure.secagg.masking.settings import MaskingSettings


class MaskingServer(ServerMachine):
    """Bytes in, bytes out, around :class:`~fedse_secure.secagg.masking.server.SecAggServer`."""

    def __init__(self, machine) -> None:
        self.machine = machine

    @property
    def stage(self) -> str | None:
        return None if self.machine.done or self.machine.stage is None else self.machine.stage

    @property
    def result(self):
        return self.machine.result

    @staticmethod
    def _encode(requests) -> dict[str, bytes]:
        # One stage often sends the same message to everybody: serialise each distinct message once.
        wire: dict[int, bytes] = {}
        return {name: wire.setdefault(id(msg), msg.to_bytes()) for name, msg in requests.items()}

    def start(self) -> dict[str, bytes]:
        return self._encode(self.machine.start())

    def receive(self, sender: str, data: bytes) -> None:
        from fedse_secure.secagg.masking.errors import ProtocolError
        from fedse_secure.secagg.masking.messages import decode

        msg = decode(data)
        claimed = getattr(msg, "sender", sender)
        if claimed != sender:
            raise ProtocolError(f"round {self.machine.round_id}: a reply from {sender!r} claims to come from "
                                f"{claimed!r}; rejected")
        self.machine.receive(msg)

    def advance(self) -> dict[str, bytes]:
        return self._encode(self.machine.advance())

    @property
    def seconds(self) -> dict[str, float]:
        return dict(self.machine.server_seconds)


class MaskingClient(ClientMachine):
    """Bytes in, bytes out, around :class:`~fedse_secure.secagg.masking.client.SecAggClient`."""

    def __init__(self, machine) -> None:
        self.machine = machine

    def set_input(self, vector) -> None:
        self.machine.set_input(vector)

    def handle(self, data: bytes) -> bytes:
        from fedse_secure.secagg.masking.messages import decode

        return self.machine.handle(decode(data)).to_bytes()

    @property
    def done(self) -> bool:
        return self.machine.done

    @property
    def measurements(self) -> dict[str, float]:
        m = self.machine
        return {"mask_s": m.mask_seconds, "mask_cpu_s": m.mask_cpu_seconds, "keystream_bytes": m.keystream_bytes}


@BACKENDS.register("masking")
class MaskingBackend(Backend):
    name = "masking"
    Settings = MaskingSettings
    capabilities = Capabilities(cross_machine=True, tolerates_dropouts=True, hides_inputs=True)
    stages = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")

    def __init__(self, settings: MaskingSettings | None = None, *, aead: Callable | None = None,
                 client_class: type | None = None) -> None:
        super().__init__(settings)
        self.aead = aead
        self.client_class = client_class

    def check(self, n_participants: int) -> None:
        super().check(n_participants)
        from fedse_secure.secagg.base import SecureAggregationError
        from fedse_secure.secagg.masking.quantize import required_ring_bits

        s = self.settings
        if s.threshold is not None and s.threshold > n_participants:
            raise ValueError(f"federation.secure_aggregation.threshold={s.threshold} exceeds the number of clients "
                             f"({n_participants}); lower it")
        p = s.parameters(n_participants)
        if p.threshold > p.neighbourhood:
            raise ValueError(f"federation.secure_aggregation.threshold={p.threshold} exceeds the neighbourhood size "
                             f"{p.neighbourhood} (degree {p.degree} + 1); lower it or raise neighbours")
        if 2 * p.threshold <= p.neighbourhood:
            raise ValueError(f"federation.secure_aggregation.threshold={p.threshold} is not more than half of the "
                             f"neighbourhood size {p.neighbourhood}; use at least {p.neighbourhood // 2 + 1}")
        try:
            required_ring_bits(n_participants, s.clip_range, s.fractional_bits)
        except SecureAggregationError as err:  # the message names the fields to lower
            raise ValueError(str(err)) from None

    def min_contributors(self, n_participants: int) -> int:
        # A round is released only when at least t masked inputs are in (the server aborts below that).
        return min(n_participants, self.settings.parameters(n_participants).threshold)

    @property
    def value_bound(self) -> float:
        return float(self.settings.clip_range)

    def server(self, round_id, participants, vector_len, registry=None, *, seed=None) -> MaskingServer:
        from fedse_secure.secagg.masking.prg import RandomSource
        from fedse_secure.secagg.masking.server import SecAggServer

        rng = RandomSource(seed, f"server/{round_id}") if seed is not None else RandomSource()
        return MaskingServer(SecAggServer(round_id, participants, vector_len, self.settings, registry, rng=rng))

    def client(self, name, identity=None, registry=None, *, seed=None) -> MaskingClient:
        from fedse_secure.secagg.masking.client import SecAggClient
        from fedse_secure.secagg.masking.prg import RandomSource

        rng = RandomSource(seed, f"client/{name}") if seed is not None else RandomSource()
        kwargs = {"aead": self.aead} if self.aead is not None else {}
        cls = self.client_class or SecAggClient
        return MaskingClient(cls(name, identity, registry, self.settings, rng=rng, **kwargs))
