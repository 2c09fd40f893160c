"""``secure_aggregation: masking``: SecAgg / SecAgg+ pairwise masking (``fedse_secure.secagg.masking``).

The protocol's state machines work on decoded messages (:class:`SecAggServer`, :class:`SecAggClient`); this
module gives them the backend-neutral bytes interface and is the only place outside ``secagg/masking`` that
constructs them.

The institutions' side never takes its strength from the coordinator: ``MaskingBackend(settings,
requirements=...)`` gives every client machine the institution's own :class:`MaskingRequirements` (in ``fedse
simulate`` the experiment's ``settings.requirements()``; a deployed institution its own ``secure_aggregation``
section), and the backend remembers every setup its clients answered, so a replayed setup is refused.

The seams a threat check needs are constructor arguments too: the share cipher (``aead``), the client class
(``client_class``) and the server class (``server_class``), so a protection is switched off by injection,
never by patching a module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from fedse_secure.secagg.backends import BACKENDS
from fedse_secure.secagg.base import Backend, Capabilities, ClientMachine, ServerMachine
from fedse_secure.secagg.masking.requirements import MaskingRequirements
from fedse_secure.secagg.masking.settings import MaskingSettings


class MaskingServer(ServerMachine):
    """Bytes in, bytes out, around :class:`~fedse_secure.secagg.masking.server.SecAggServer`."""

    def __init__(self, machine) -> None:
        self.machine = machine

    @property
    def stage(self) -> str | None:
        stage = self.machine.stage
        return None if stage is None else stage.value

    @property
    def result(self):
        return self.machine.result

    @staticmethod
    def _encode(requests) -> dict[str, bytes]:
        # One stage often sends the same message to everybody: serialise each distinct message once.
        wire: dict[int, bytes] = {}
        out = {}
        for name, msg in requests.items():
            if id(msg) not in wire:  # not setdefault: its default would serialise the message every time
                wire[id(msg)] = msg.to_bytes()
            out[name] = wire[id(msg)]
        return out

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

        # A masked input comes back as the buffer it was masked into (no copy of the vector to send it).
        return self.machine.handle(decode(data)).to_bytes()

    def screen(self, data: bytes) -> None:
        from fedse_secure.secagg.masking.messages import decode

        self.machine.screen(decode(data))

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
    input_stage = "masked_input"

    def __init__(self, settings: MaskingSettings | None = None, *, requirements: MaskingRequirements | None = None,
                 aead: Callable | None = None, client_class: type | None = None,
                 server_class: type | None = None) -> None:
        super().__init__(settings)
        #: What this backend's client machines accept: the institution's own floor, never the coordinator's.
        self.requirements = requirements if requirements is not None else self.settings.requirements()
        self.aead = aead
        self.client_class = client_class
        self.server_class = server_class
        # Setup digests each institution has answered, across the rounds this backend serves.
        self._answered: dict[str, set[bytes]] = defaultdict(set)

    def check(self, n_participants: int) -> None:
        super().check(n_participants)
        from fedse_secure.secagg.base import SecureAggregationError
        from fedse_secure.secagg.masking.requirements import _least_threshold

        s = self.settings
        n = n_participants
        if s.threshold is not None and s.threshold > n:
            raise ValueError(f"federation.secure_aggregation.threshold={s.threshold} exceeds the number of clients "
                             f"({n}); lower it")
        bare = MaskingRequirements(colluder_fraction=s.colluder_fraction, dropout_fraction=s.dropout_fraction)
        try:
            derived = bare.parameters(n)
            p = s.parameters(n)
        except ValueError as err:
            raise ValueError(f"federation.secure_aggregation: {err}") from None
        why = (f"the least that is safe for {n} institutions with colluder_fraction {s.colluder_fraction} (up to "
               f"{bare.colluders(n)} colluding with the coordinator)")
        fix = "raise it or leave it unset" + (", or lower colluder_fraction" if s.colluder_fraction else "")
        if s.neighbours is not None and min(s.neighbours, n - 1) < derived.degree:
            raise ValueError(f"federation.secure_aggregation.neighbours={s.neighbours} is below {derived.degree}, {why}; "
                             f"{fix}")
        least_t = _least_threshold(n, n, bare.colluders(n), p.degree, bare.security_bits)
        if s.threshold is not None and s.threshold < least_t:
            raise ValueError(f"federation.secure_aggregation.threshold={s.threshold} is below {least_t}, {why} and "
                             f"degree {p.degree}; {fix}")
        if p.threshold > p.neighbourhood:
            raise ValueError(f"federation.secure_aggregation.threshold={p.threshold} exceeds the neighbourhood size "
                             f"{p.neighbourhood} (degree {p.degree} + 1); lower it or raise neighbours")
        from fedse_secure.secagg.masking.quantize import required_ring_bits

        try:
            required_ring_bits(n, s.clip_range, s.precision(n))
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
        cls = self.server_class or SecAggServer
        return MaskingServer(cls(round_id, participants, vector_len, self.settings, registry, rng=rng))

    def client(self, name, identity=None, registry=None, *, seed=None) -> MaskingClient:
        from fedse_secure.secagg.masking.client import SecAggClient
        from fedse_secure.secagg.masking.prg import RandomSource

        rng = RandomSource(seed, f"client/{name}") if seed is not None else RandomSource()
        kwargs = {"aead": self.aead} if self.aead is not None else {}
        cls = self.client_class or SecAggClient
        return MaskingClient(cls(name, identity, registry, self.settings, requirements=self.requirements, rng=rng,
                                 answered=self._answered[name], **kwargs))
