"""In-process runner: every client and the server of a round in one process, messages passed as bytes.

:class:`MaskingAggregator` is the ``secure_aggregation: masking`` backend. Each message is serialised with
``to_bytes()`` and parsed again with :func:`decode` on the way, exactly as a network transport would, so the
byte counts in the measurements are the real wire sizes and the codec is exercised on every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from fedse_secure.config import SecAggConfig
from fedse_secure.secagg.base import AggregateResult, RoundAbortedError, SecureAggregationError, SecureAggregator
from fedse_secure.secagg.masking.client import SecAggClient
from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry
from fedse_secure.secagg.masking.messages import ProtocolMessage, Stage, decode
from fedse_secure.secagg.masking.prg import RandomSource
from fedse_secure.secagg.masking.server import SecAggServer
from fedse_secure.secagg.masking.tensors import TensorLayout

#: Hook for tests: ``(stage, direction, name, message) -> message | None`` where direction is "to_client" or
#: "to_server"; return a replacement message, or None to let it through unchanged.
Interceptor = Callable[[str, str, str, ProtocolMessage], ProtocolMessage | None]


def run_stages(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    until: str,
    on_reply: Callable[[str, str, ProtocolMessage], None] | None = None,
) -> dict[str, ProtocolMessage]:
    """Drive an honest round (every client answers, through the wire codec) up to stage ``until``.

    Returns the server's requests for ``until``, not yet delivered, so a test or a threat check can take over
    there (lie, tamper, replay). ``on_reply(stage, client, reply)`` sees each reply as the server receives it:
    what a curious coordinator holds.
    """
    if until not in Stage.ALL:
        raise SecureAggregationError(f"stage {until!r} is not one of {Stage.ALL}")
    requests = server.start()
    while server.stage != until:
        if not requests:
            raise SecureAggregationError(f"round {server.round_id} ended before stage {until!r}")
        stage = server.stage
        for name, req in requests.items():
            reply = decode(clients[name].handle(decode(req.to_bytes())).to_bytes())
            if on_reply is not None:
                on_reply(stage, name, reply)
            server.receive(reply)
        requests = server.advance()
    return requests


def run_round(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    dropouts: Mapping[str, str] | None = None,
    interceptor: Interceptor | None = None,
) -> AggregateResult:
    """Drive one round to completion. ``dropouts`` maps a client to the stage at which it stops answering."""
    dropouts = dict(dropouts or {})
    for name, stage in dropouts.items():
        if stage not in Stage.ALL:
            raise SecureAggregationError(f"dropout stage {stage!r} for {name!r} is not one of {Stage.ALL}")
    sent = {n: 0 for n in clients}
    received = {n: 0 for n in clients}
    client_s = {n: 0.0 for n in clients}
    stage_wall: dict[str, float] = {}
    stage_client_max: dict[str, float] = {}
    stage_client_max_cpu: dict[str, float] = {}
    server_cpu = 0.0
    requests = server.start()
    while requests:
        stage = server.stage
        t_stage = time.perf_counter()
        slowest = slowest_cpu = 0.0
        for name, req in requests.items():
            if name in dropouts and Stage.ALL.index(stage) >= Stage.ALL.index(dropouts[name]):
                continue  # silent from this stage on: the server learns it only when the stage closes
            if interceptor is not None:
                req = interceptor(stage, "to_client", name, req) or req
            wire = req.to_bytes()
            received[name] += len(wire)
            t0, c0 = time.perf_counter(), time.thread_time()
            reply = clients[name].handle(decode(wire))
            rw = reply.to_bytes()
            dt = time.perf_counter() - t0
            client_s[name] += dt
            slowest = max(slowest, dt)
            slowest_cpu = max(slowest_cpu, time.thread_time() - c0)
            sent[name] += len(rw)
            msg = decode(rw)
            if interceptor is not None:
                msg = interceptor(stage, "to_server", name, msg) or msg
            c0 = time.thread_time()
            server.receive(msg)
            server_cpu += time.thread_time() - c0
        c0 = time.thread_time()
        requests = server.advance()
        server_cpu += time.thread_time() - c0
        stage_wall[stage] = time.perf_counter() - t_stage
        stage_client_max[stage] = slowest
        stage_client_max_cpu[stage] = slowest_cpu
    result = server.result
    if result is None:  # cannot happen: the server either finishes or raises RoundAbortedError
        raise SecureAggregationError(f"round {server.round_id}: the protocol stopped before the unmask stage")
    m = result.measurements
    live = [n for n in clients if n not in dropouts]
    m["bytes_sent_per_client"] = int(max(sent[n] for n in live)) if live else 0
    m["bytes_sent_per_client_mean"] = float(np.mean([sent[n] for n in clients]))
    m["bytes_received_per_client"] = int(max(received.values()))
    m["bytes_sent_total"] = int(sum(sent.values()))
    for stage, s in stage_wall.items():
        m[f"stage_{stage}_s"] = s
        m[f"stage_{stage}_server_s"] = server.server_seconds[stage]
        m[f"stage_{stage}_client_max_s"] = stage_client_max[stage]
    m["server_s"] = sum(server.server_seconds.values())
    m["server_cpu_s"] = server_cpu
    m["client_s_max"] = max(client_s.values())
    m["client_s_total"] = sum(client_s.values())
    # Wall time if clients ran concurrently (a deployment): per stage, the slowest client plus the server.
    m["critical_path_s"] = sum(stage_client_max.values()) + m["server_s"]
    m["critical_path_cpu_s"] = sum(stage_client_max_cpu.values()) + server_cpu
    m["client_mask_s_max"] = max(c.mask_seconds for c in clients.values())
    m["client_mask_cpu_s_max"] = max(c.mask_cpu_seconds for c in clients.values())
    cpu = sum(c.mask_cpu_seconds for c in clients.values())
    # Keystream bytes expanded and added per CPU-second of masking (quantisation and checks included).
    m["client_mask_gb_per_s_cpu"] = sum(c.keystream_bytes for c in clients.values()) / cpu / 1e9 if cpu > 0 else 0.0
    m["client_keystream_bytes_max"] = max(c.keystream_bytes for c in clients.values())
    return result


class MaskingAggregator(SecureAggregator):
    """SecAgg / SecAgg+ pairwise masking (Bonawitz et al. 2017; Bell et al. 2020), run in-process.

    ``identities`` are the institutions' long-term Ed25519 keys; without them, fresh keys are generated once
    per aggregator (and reused across rounds). ``rng_seed`` makes every random choice reproducible, for tests
    only: production runs must leave it ``None`` so that keys come from the OS CSPRNG.
    """

    name = "masking"

    def __init__(
        self,
        config: SecAggConfig | None = None,
        identities: dict[str, IdentityKey] | None = None,
        rng_seed: int | None = None,
    ) -> None:
        self.config = config or SecAggConfig()
        self.identities: dict[str, IdentityKey] = dict(identities or {})
        self._provided_identities = identities is not None
        self.rng_seed = rng_seed
        self._rng = RandomSource(rng_seed, "aggregator") if rng_seed is not None else RandomSource()
        self.last_result: AggregateResult | None = None

    def registry(self) -> PublicKeyRegistry:
        return PublicKeyRegistry.from_identities(self.identities)

    def _identities_for(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.identities]
        if missing and self._provided_identities:
            raise SecureAggregationError(
                f"no identity key for {missing}; pass an IdentityKey for every institution in identities="
            )
        for n in missing:
            self.identities[n] = IdentityKey.generate(self._rng.child(f"identity/{n}"))

    def aggregate(
        self,
        round_id: int,
        contributions: Mapping[str, np.ndarray],
        *,
        dropouts: Mapping[str, str] | None = None,
        interceptor: Interceptor | None = None,
    ) -> AggregateResult:
        """Sum ``contributions`` over the survivors. ``dropouts`` adds to ``config.simulate_dropouts``."""
        if not contributions:
            raise RoundAbortedError(f"round {round_id}: no contributions to aggregate")
        names = sorted(contributions)
        sizes = {n: np.asarray(v).size for n, v in contributions.items()}
        size = sizes[names[0]]
        for n, v in contributions.items():
            if np.asarray(v).ndim != 1 or sizes[n] != size:
                raise SecureAggregationError(
                    f"round {round_id}: {n} sent shape {np.asarray(v).shape}, expected ({size},); send one flat vector"
                )
        unknown = set(self.config.simulate_dropouts) - set(names)
        schedule = {k: v for k, v in self.config.simulate_dropouts.items() if k not in unknown}
        schedule.update(dropouts or {})
        self._identities_for(names)
        registry = self.registry()
        server = SecAggServer(round_id, names, size, self.config, registry, rng=self._rng.child("server"))
        clients = {
            n: SecAggClient(
                n, self.identities[n], registry, self.config, vector=contributions[n], rng=self._rng.child(f"client/{n}")
            )
            for n in names
        }
        t0 = time.perf_counter()
        result = run_round(server, clients, schedule, interceptor)
        result.measurements["wall_s"] = time.perf_counter() - t0
        self.last_result = result
        return result

    def aggregate_tensors(
        self, round_id: int, updates: Mapping[str, Mapping[str, np.ndarray]], **kwargs
    ) -> tuple[dict[str, np.ndarray], AggregateResult]:
        """Sum named adapter tensors: each client's tensors travel as one flat vector, shapes are restored."""
        if not updates:
            raise RoundAbortedError(f"round {round_id}: no contributions to aggregate")
        layout = TensorLayout.of(next(iter(updates.values())))
        flat = {c: layout.flatten(t) for c, t in updates.items()}
        result = self.aggregate(round_id, flat, **kwargs)
        return layout.unflatten(result.total), result
