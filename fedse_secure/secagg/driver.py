"""Driving a backend's machines: :func:`drive`, the one stage loop, and a whole round in one process.

:func:`drive` knows nothing of networks: it asks an *exchange* to deliver one stage's requests and return the
replies that arrived (``exchange(stage, {name: request}) -> {name: reply}``), feeds them to the server machine
and closes the stage. The federation's round driver plugs in a transport (in-process institutions, or Flower)
as the exchange; :class:`InProcessParties` is the exchange for client machines living in this process, and
:func:`aggregate` puts the two together for tests, benchmarks and threat checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np

from fedse_secure.secagg.base import (
    AggregateResult,
    Backend,
    ClientMachine,
    MessageRejected,
    RoundAbortedError,
    SecureAggregationError,
    ServerMachine,
)
from fedse_secure.secagg.encoding import check_update

#: Delivers one stage's requests; returns the replies that arrived, as a mapping or as (name, reply) pairs in
#: arrival order (an in-process exchange yields them one at a time, so the server sums each masked vector as it
#: comes and at most one is held in memory).
Exchange = Callable[[str, dict[str, bytes]], "Mapping[str, bytes] | Iterable[tuple[str, bytes]]"]
#: ``(stage, direction, name, data) -> data | None``; direction is "to_client" or "to_server". Return replacement
#: bytes, or None to let the message through. For tests and threat checks (a tampering network).
Interceptor = Callable[[str, str, str, bytes], "bytes | None"]


class StageObserver(Protocol):
    def opened(self, stage: str, addressees: list[str]) -> None: ...
    def closed(self, stage: str, replied: list[str], silent: list[str], seconds: float) -> None: ...
    def rejected(self, stage: str, sender: str, error: str) -> None: ...


class _Quiet:
    def opened(self, stage, addressees):
        pass

    def closed(self, stage, replied, silent, seconds):
        pass

    def rejected(self, stage, sender, error):
        pass


def _run(server: ServerMachine, exchange: Exchange, observer: StageObserver, until: str | None):
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    stage_s: dict[str, float] = {}
    c0 = time.thread_time()
    requests = server.start()
    server_cpu = time.thread_time() - c0
    for name in requests:
        sent.setdefault(name, 0)
        received.setdefault(name, 0)
    while requests:
        stage = server.stage
        if stage == until:
            return requests, None
        t0 = time.perf_counter()
        observer.opened(stage, sorted(requests))
        for name, data in requests.items():
            received[name] = received.get(name, 0) + len(data)
        replies = exchange(stage, dict(requests))
        accepted = []
        for name, data in (sorted(replies.items()) if isinstance(replies, Mapping) else replies):
            if name not in requests:
                observer.rejected(stage, name, "not asked in this stage")
                continue
            sent[name] = sent.get(name, 0) + len(data)
            c0 = time.thread_time()
            try:
                server.receive(name, data)
            except MessageRejected as err:
                observer.rejected(stage, name, str(err))
                continue
            finally:
                server_cpu += time.thread_time() - c0
            accepted.append(name)
        silent = sorted(set(requests) - set(accepted))
        seconds = time.perf_counter() - t0
        observer.closed(stage, accepted, silent, seconds)
        c0 = time.thread_time()
        try:
            requests = server.advance()
        finally:
            server_cpu += time.thread_time() - c0
        stage_s[stage] = time.perf_counter() - t0
    if until is not None:
        raise SecureAggregationError(f"the round ended before stage {until!r}")
    result = server.result
    if result is None:  # a machine either releases a result or raises RoundAbortedError
        raise SecureAggregationError("the protocol stopped without a result")
    m = result.measurements
    m.setdefault("bytes_sent_per_client", int(max(sent.values(), default=0)))
    m.setdefault("bytes_sent_per_client_mean", float(np.mean(list(sent.values()))) if sent else 0.0)
    m.setdefault("bytes_received_per_client", int(max(received.values(), default=0)))
    m.setdefault("bytes_sent_total", int(sum(sent.values())))
    server_s = server.seconds
    for stage, s in stage_s.items():
        m[f"stage_{stage}_s"] = s
        if stage in server_s:
            m[f"stage_{stage}_server_s"] = server_s[stage]
    m["server_s"] = float(sum(server_s.values()))
    m["server_cpu_s"] = server_cpu
    return None, result


def drive(server: ServerMachine, exchange: Exchange, observer: StageObserver | None = None) -> AggregateResult:
    """Run every stage of ``server``'s round through ``exchange``; the released sum (or RoundAbortedError).

    A reply the server rejects is reported to ``observer`` and its sender counts as silent; the measurements
    gain wire bytes per party and wall seconds per stage (figures the backend reports itself take precedence).
    """
    return _run(server, exchange, observer or _Quiet(), None)[1]


def drive_until(server: ServerMachine, exchange: Exchange, stage: str) -> dict[str, bytes]:
    """Run an honest round up to ``stage`` and return that stage's requests, not yet delivered, so a test or a
    threat check can take over there (lie, tamper, replay)."""
    return _run(server, exchange, _Quiet(), stage)[0]


class InProcessParties:
    """The exchange for client machines in this process: each request and reply passes as bytes.

    ``dropouts`` maps a party to the stage from which it stops answering (``stages`` gives their order);
    ``interceptor`` may replace any message in either direction. A client that refuses (raises) is an error
    of the caller's making here, so it propagates, unless ``refusals="drop"`` makes it a dropout.
    """

    def __init__(self, clients: Mapping[str, ClientMachine], *, stages: Sequence[str] = (),
                 dropouts: Mapping[str, str] | None = None, interceptor: Interceptor | None = None,
                 refusals: str = "raise") -> None:
        self.clients = clients
        self.order = {s: i for i, s in enumerate(stages)}
        self.dropouts = dict(dropouts or {})
        for name, stage in self.dropouts.items():
            if stage not in self.order:
                raise SecureAggregationError(f"dropout stage {stage!r} for {name!r} is not one of {tuple(stages)}")
        self.interceptor = interceptor
        self.refusals = refusals
        self.client_s = {n: 0.0 for n in clients}
        self.stage_client_max: dict[str, float] = {}
        self.stage_client_max_cpu: dict[str, float] = {}

    def silent(self, name: str, stage: str) -> bool:
        return name in self.dropouts and self.order[stage] >= self.order[self.dropouts[name]]

    def __call__(self, stage: str, requests: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
        slowest = slowest_cpu = 0.0
        for name, data in requests.items():
            if self.silent(name, stage):
                continue  # silent from this stage on: the server learns it only when the stage closes
            if self.interceptor is not None:
                data = self.interceptor(stage, "to_client", name, data) or data
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                reply = self.clients[name].handle(data)
            except SecureAggregationError:
                if self.refusals != "drop":
                    raise
                continue
            finally:
                dt = time.perf_counter() - t0
                self.client_s[name] += dt
                slowest, slowest_cpu = max(slowest, dt), max(slowest_cpu, time.thread_time() - c0)
            if self.interceptor is not None:
                reply = self.interceptor(stage, "to_server", name, reply) or reply
            # Recorded before handing over: the server's work on this reply is not this client's time.
            self.stage_client_max[stage] = slowest
            self.stage_client_max_cpu[stage] = slowest_cpu
            yield name, reply

    def measurements(self, server_s: float, server_cpu_s: float) -> dict[str, float]:
        """Client-side figures of the round (only known when every party ran here)."""
        m = {"client_s_max": max(self.client_s.values(), default=0.0),
             "client_s_total": sum(self.client_s.values()),
             # Wall time if clients ran concurrently (a deployment): per stage, the slowest client plus the server.
             "critical_path_s": sum(self.stage_client_max.values()) + server_s,
             "critical_path_cpu_s": sum(self.stage_client_max_cpu.values()) + server_cpu_s}
        per_client = [getattr(c, "measurements", {}) for c in self.clients.values()]
        for key in sorted({k for d in per_client for k in d}):
            values = [d[key] for d in per_client if key in d]
            m[f"client_{key}_max"] = max(values)
            m[f"client_{key}_total"] = sum(values)
        return m


def aggregate(
    backend: Backend,
    round_id: int,
    contributions: Mapping[str, np.ndarray],
    *,
    identities: Mapping | None = None,
    registry=None,
    dropouts: Mapping[str, str] | None = None,
    interceptor: Interceptor | None = None,
    seed: int | None = None,
) -> AggregateResult:
    """One whole round of ``backend`` with every party in this process: the survivors' sum.

    ``identities`` are the institutions' long-term Ed25519 keys (generated when omitted); every party verifies
    against ``registry`` (default: the identities' public keys). ``seed`` makes every random choice
    reproducible, for tests only: production leaves it None (keys from the OS CSPRNG).
    """
    from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry
    from fedse_secure.secagg.masking.prg import RandomSource

    if not contributions:
        raise RoundAbortedError(f"round {round_id}: no contributions to aggregate")
    names = sorted(contributions)
    size = np.asarray(contributions[names[0]]).size
    vectors = {n: check_update(n, contributions[n], size) for n in names}
    if identities is None:
        rng = RandomSource(seed, "identities") if seed is not None else None
        identities = {n: IdentityKey.generate(rng.child(n) if rng else None) for n in names}
    missing = [n for n in names if n not in identities]
    if missing:
        raise SecureAggregationError(f"no identity key for {missing}; pass an IdentityKey for every institution")
    if registry is None:
        registry = PublicKeyRegistry.from_identities({n: identities[n] for n in names})
    # Fresh round secrets every round, reproducibly when seeded.
    seed = None if seed is None else seed * 1_000_003 + round_id
    server = backend.server(round_id, names, size, registry, seed=seed)
    clients = {n: backend.client(n, identities[n], registry, seed=seed) for n in names}
    for n in names:
        clients[n].set_input(vectors[n])
    parties = InProcessParties(clients, stages=backend.stages, dropouts=dropouts, interceptor=interceptor)
    t0 = time.perf_counter()
    result = drive(server, parties)
    result.measurements["wall_s"] = time.perf_counter() - t0
    m = result.measurements
    m.update(parties.measurements(m["server_s"], m["server_cpu_s"]))
    return result
