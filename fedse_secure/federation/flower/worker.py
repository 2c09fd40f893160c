"""An institution's long-lived worker: its model, :class:`Institution` and the round's :class:`SecAggClient`.

Flower 1.42 starts a fresh ClientApp process for every message, but a secure-aggregation client must keep
its round secrets (X25519 keys, self-mask seed, the peers' shares) in memory across stages, and the model
should not be reloaded five times per round. So ``fedse node start`` runs this worker next to the SuperNode;
the ClientApp is a thin relay that forwards each stage to it over a Unix socket (mode 0600 in a private
0700 folder, HMAC challenge with a per-start secret; frames are bytes and JSON only, nothing is unpickled).
Round secrets never touch the disk: a worker that dies loses its round and the protocol treats it as a
dropout; a restarted worker joins the next round with its buffer and ledger intact (they are files).

:class:`InstitutionSession` is the part without I/O (request in, reply out); :func:`serve` is the socket loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedse_secure.federation.deploy_config import InstitutionDeployConfig
from fedse_secure.federation.flower.wire import EVALUATE, StageReply, StageRequest, WireError, pack, unpack_header

log = logging.getLogger("fedse.node")

MAX_BLOB_BYTES = 4 << 30


class InstitutionRefused(RuntimeError):
    """The institution refuses a request (wrong experiment, budget, protocol violation); it drops out."""


def state_to_bytes(state: "OrderedDict[str, Any]") -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON key order): safetensors does not keep insertion order, the flat layout needs it."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return save(tensors), json.dumps(list(state)).encode()


def state_from_bytes(data: bytes, order: bytes) -> "OrderedDict[str, Any]":
    from safetensors.torch import load

    tensors = load(bytes(data))
    keys = json.loads(order.decode())
    if sorted(keys) != sorted(tensors):
        raise WireError("global adapter keys do not match their declared order; rejected")
    return OrderedDict((k, tensors[k]) for k in keys)


def experiment_key(experiment_json: str) -> str:
    return hashlib.sha256(experiment_json.encode()).hexdigest()[:16]


class InstitutionSession:
    """Everything an institution does for the coordinator, one request at a time. No sockets, no Flower."""

    def __init__(self, cfg: InstitutionDeployConfig):
        from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry

        self.cfg = cfg
        self.identity = IdentityKey.load(cfg.identity_key)
        if not cfg.registry.is_file():
            raise InstitutionRefused(
                f"{cfg.registry}: no identity registry; get registry.json (every institution's identity public key) "
                "from the federation out of band, or run `fedse keys init`"
            )
        self.registry = PublicKeyRegistry.from_json(cfg.registry.read_text())
        if cfg.name not in self.registry:
            raise InstitutionRefused(f"{cfg.registry} does not list {cfg.name!r}; add this institution's identity key")
        if self.registry.public_bytes(cfg.name) != self.identity.public_bytes():
            raise InstitutionRefused(
                f"{cfg.identity_key} does not match the key {cfg.registry} lists for {cfg.name!r}; use the matching "
                "key pair or update the registry"
            )
        self._agent = None
        self._agent_key: tuple | None = None
        self._institution = None
        self._exp_key: str | None = None
        self._client = None
        self._round: int | None = None
        self.experiment = None

    # -- setup -------------------------------------------------------------------------------------------------
    def _local_experiment(self, experiment_json: str):
        from fedse_secure.config import ExperimentConfig

        exp = ExperimentConfig.model_validate_json(experiment_json)
        names = [c.name for c in exp.clients]
        if self.cfg.name not in names:
            raise InstitutionRefused(f"the coordinator's experiment does not list {self.cfg.name!r} among {names}")
        if exp.federation.secure_aggregation != "masking":
            raise InstitutionRefused(
                f"the coordinator asks for secure_aggregation={exp.federation.secure_aggregation!r}; this institution "
                "only sends its update masked (masking); refusing"
            )
        data = exp.model_dump(mode="json")
        # The institution's own settings win over the coordinator's: its environment and data, its DP budget.
        data["clients"] = [self.cfg.client_config().model_dump(mode="json") if c["name"] == self.cfg.name else c
                           for c in data["clients"]]
        if self.cfg.privacy.epsilon is not None:
            theirs = data["privacy"].get("epsilon_budget")
            data["privacy"]["epsilon_budget"] = min(self.cfg.privacy.epsilon, theirs) if theirs else self.cfg.privacy.epsilon
        if self.cfg.num_threads:
            data["model"]["num_threads"] = self.cfg.num_threads
        return ExperimentConfig.model_validate(data)

    def _ensure(self, experiment_json: str) -> None:
        key = experiment_key(experiment_json)
        if key == self._exp_key and self._institution is not None:
            return
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.aggregation.rules import get_rule
        from fedse_secure.federation.institution import Institution

        exp = self._local_experiment(experiment_json)
        agent_key = (exp.model.model_dump_json(), exp.lora.model_dump_json(), exp.seed)
        if agent_key != self._agent_key:
            log.info("%s: loading model %s", self.cfg.name, exp.model.name_or_path)
            self._agent = AgentModel.load(exp.model, exp.lora, exp.seed)
            self._agent_key = agent_key
        client = next(c for c in exp.clients if c.name == self.cfg.name)
        inst = Institution(exp, client, self.cfg.data_dir, self._agent, get_rule(exp.federation.aggregation),
                           len(exp.clients), ledger_path=self.cfg.resolved_ledger_path)
        inst.seed_buffer()
        self._institution, self._exp_key, self.experiment = inst, key, exp

    # -- requests ----------------------------------------------------------------------------------------------
    def handle(self, req: StageRequest) -> StageReply:
        try:
            return self._handle(req)
        except Exception as err:  # noqa: BLE001 - any failure means: this institution drops out of the round
            self._client = None
            log.error("%s: round %s %s refused: %s: %s", self.cfg.name, req.round_id, req.stage,
                      type(err).__name__, err)
            return StageReply(req.stage, req.round_id, self.cfg.name, error=f"{type(err).__name__}: {err}")

    def _handle(self, req: StageRequest) -> StageReply:
        from fedse_secure.secagg.masking.messages import Stage, decode

        if req.stage == EVALUATE:
            self._ensure(req.experiment_json)
            state = state_from_bytes(req.blobs["global_state"], req.blobs["global_state_keys"])
            metrics = self._institution.evaluate(state)
            return StageReply(EVALUATE, req.round_id, self.cfg.name, metrics={"client": self.cfg.name, **metrics})
        if req.stage not in Stage.ALL:
            raise WireError(f"unknown stage {req.stage!r}")
        request = decode(req.blobs["request"])
        metrics: dict[str, Any] = {}
        if req.stage == Stage.ADVERTISE_KEYS:
            from fedse_secure.secagg.masking.client import SecAggClient

            self._client = None
            self._ensure(req.experiment_json)
            state = state_from_bytes(req.blobs["global_state"], req.blobs["global_state_keys"])
            if req.evaluate_first:
                ev = self._institution.evaluate(state)
                metrics["previous_round_eval"] = {"round": req.round_id - 1, **ev}
            t0 = time.perf_counter()
            result = self._institution.local_round(req.round_id, state)
            metrics.update(result.metrics)
            metrics["local_round_s"] = time.perf_counter() - t0
            client = SecAggClient(self.cfg.name, self.identity, self.registry, self.experiment.federation.secagg)
            client.set_input(result.payload)
            reply = client.handle(request)
            self._client, self._round = client, req.round_id
        else:
            if self._client is None or self._round != req.round_id:
                raise InstitutionRefused(
                    f"no secure-aggregation state for round {req.round_id} (this worker restarted or refused an "
                    "earlier stage); it sits this round out and rejoins at the next one"
                )
            reply = self._client.handle(request)
            if self._client.done:
                self._client = None
        return StageReply(req.stage, req.round_id, self.cfg.name, metrics=metrics, blobs={"reply": reply.to_bytes()})


# -- socket I/O ------------------------------------------------------------------------------------------------
def recv_frames(conn) -> tuple[dict[str, Any], dict[str, bytes]]:
    header, names = unpack_header(conn.recv_bytes(maxlength=1 << 20))
    blobs = {n: conn.recv_bytes(maxlength=MAX_BLOB_BYTES) for n in names}
    return header, blobs


def send_frames(conn, header: dict[str, Any], blobs: dict[str, bytes]) -> None:
    for frame in pack(header, blobs):
        conn.send_bytes(frame)


def call_worker(socket_path: str, authkey: bytes, req: StageRequest, timeout_s: float = 7200.0) -> StageReply:
    """ClientApp side: one request, one reply."""
    from multiprocessing.connection import Client

    conn = Client(socket_path, family="AF_UNIX", authkey=authkey)
    try:
        send_frames(conn, req.header(), req.blobs)
        if not conn.poll(timeout_s):
            raise TimeoutError(f"the institution worker did not answer within {timeout_s:.0f} s")
        header, blobs = recv_frames(conn)
        return StageReply.from_parts(header, blobs)
    finally:
        conn.close()


def serve(cfg: InstitutionDeployConfig, socket_path: Path, authkey: bytes, ready_file: Path | None = None) -> None:
    from multiprocessing.connection import Listener

    session = InstitutionSession(cfg)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=authkey)
    finally:
        os.umask(old_umask)
    log.info("%s: worker listening on %s", cfg.name, socket_path)
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as err:  # failed HMAC challenge, or a client that went away
                log.warning("%s: rejected a worker connection: %s", cfg.name, err)
                continue
            try:
                header, blobs = recv_frames(conn)
                try:
                    req = StageRequest.from_parts(header, blobs)
                except WireError as err:
                    reply = StageReply("?", -1, cfg.name, error=str(err))
                else:
                    t0 = time.perf_counter()
                    reply = session.handle(req)
                    log.info("%s: round %d %s done in %.2f s%s", cfg.name, req.round_id, req.stage,
                             time.perf_counter() - t0, f" (refused: {reply.error})" if reply.error else "")
                send_frames(conn, reply.header(), reply.blobs)
            except (OSError, EOFError, WireError) as err:
                log.warning("%s: worker connection failed: %s", cfg.name, err)
            finally:
                conn.close()
    finally:
        listener.close()


def new_authkey(path: Path) -> bytes:
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def main(argv: list[str] | None = None) -> None:
    """``python -m fedse_secure.federation.flower.worker CONFIG SOCKET KEYFILE [READYFILE]`` (started by
    ``fedse node start``; not meant to be typed)."""
    from fedse_secure.federation.deploy_config import load_institution_config

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4):
        sys.exit("usage: python -m fedse_secure.federation.flower.worker CONFIG SOCKET KEYFILE [READYFILE]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_institution_config(args[0])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(cfg, Path(args[1]), Path(args[2]).read_bytes(), Path(args[3]) if len(args) == 4 else None)


if __name__ == "__main__":
    main()
