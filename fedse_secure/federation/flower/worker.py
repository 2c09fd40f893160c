"""An institution's long-lived worker: its model and its :class:`InstitutionEndpoint` (the round's client machine
included).

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

import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedse_secure.errors import FedseError
from fedse_secure.federation.deploy_config import InstitutionDeployConfig
from fedse_secure.federation.wire import REFUSED, StageReply, StageRequest, WireError, pack, run_key, unpack_header

log = logging.getLogger("fedse.node")

MAX_BLOB_BYTES = 4 << 30
#: The worker's exit status after an expected failure (a FedseError), which its last log line states.
EXIT_FAILED = 2


class InstitutionRefused(FedseError, RuntimeError):
    """The institution refuses a request (wrong experiment, unsafe setup); it drops out."""


def read_registry(cfg: InstitutionDeployConfig, identity_public: bytes):
    """The federation's identity registry, which must list this institution with ``identity_public``; a one-line
    FedseError with the fix if it is missing, damaged or says otherwise."""
    from fedse_secure.federation.flower import pki

    if not cfg.registry.is_file():
        raise InstitutionRefused(
            f"{cfg.registry}: no identity registry; get registry.json (every institution's identity public key) "
            "from the federation out of band, or run `fedse keys init`"
        )
    registry = pki.read_registry(cfg.registry)
    if cfg.name not in registry:
        raise InstitutionRefused(f"{cfg.registry} does not list {cfg.name!r}; add this institution's identity key "
                                 f"(`fedse keys init --out DIR -i {cfg.name}` merges it) or get the federation's "
                                 "registry.json")
    if registry.public_bytes(cfg.name) != identity_public:
        raise InstitutionRefused(
            f"{cfg.identity_key} does not match the key {cfg.registry} lists for {cfg.name!r}; use the matching "
            "key pair or update the registry"
        )
    return registry


class InstitutionSession:
    """Everything an institution does for the coordinator, one request at a time. No sockets, no Flower.

    It checks the coordinator's experiment against the institution's node policy (refusing it, before the model
    is even loaded, with one line per violated field), lays the institution's own settings over it, and hands
    each request to the :class:`~fedse_secure.federation.endpoint.InstitutionEndpoint` for that experiment (a new
    experiment gets a new endpoint; the model is reloaded only if the model settings changed).
    """

    def __init__(self, cfg: InstitutionDeployConfig):
        from fedse_secure.audit import AuditLog
        from fedse_secure.policy import load_policy
        from fedse_secure.secagg.masking.identity import IdentityKey

        self.cfg = cfg
        self.policy = load_policy(cfg.policy)
        self.audit = AuditLog(cfg.audit_path)
        self.coordinator_key = None
        if cfg.coordinator_public_key is not None:
            from fedse_secure.federation.flower import pki

            self.coordinator_key = pki.raw_public_bytes(pki.load_identity_public(cfg.coordinator_public_key))
        self._model_hash: tuple | None = None
        self.identity = IdentityKey.load(cfg.identity_key)
        self.registry = read_registry(cfg, self.identity.public_bytes())
        self._agent = None
        self._agent_key: tuple | None = None
        self.endpoint = None
        self.experiment = None

    # -- setup -------------------------------------------------------------------------------------------------
    def _local_experiment(self, experiment_json: str):
        from fedse_secure.config import ExperimentConfig

        exp = ExperimentConfig.model_validate_json(experiment_json)
        names = [c.name for c in exp.clients]
        if self.cfg.name not in names:
            raise InstitutionRefused(f"the coordinator's experiment does not list {self.cfg.name!r} among {names}")
        backend = exp.federation.backend()
        if not (backend.capabilities.hides_inputs and backend.capabilities.cross_machine):
            raise InstitutionRefused(
                f"the coordinator asks for secure_aggregation {backend.name!r}, which does not keep this "
                "institution's update hidden across machines; refusing"
            )
        data = exp.model_dump(mode="json")
        # The institution's own settings win over the coordinator's: its environment and data; its privacy
        # settings are decided against its node policy (_endpoint_for).
        data["clients"] = [self.cfg.client_config().model_dump(mode="json") if c["name"] == self.cfg.name else c
                           for c in data["clients"]]
        if self.cfg.num_threads:
            data["model"]["num_threads"] = self.cfg.num_threads
        return ExperimentConfig.model_validate(data)

    def _endpoint_for(self, experiment_json: str):
        """The endpoint for the coordinator's experiment, built on first sight: decided under the node policy
        (a refused experiment gets an endpoint that refuses everything, and no model is loaded for it), then
        the model loaded and its buffer seeded."""
        key = run_key(experiment_json)
        if self.endpoint is not None and self.endpoint.key == key:
            return self.endpoint
        from fedse_secure.federation.endpoint import InstitutionEndpoint, institution_backend
        from fedse_secure.policy import check_model, decide

        exp = self._local_experiment(experiment_json)
        decision = decide(self.policy, exp, self.cfg.name, experiment_json=experiment_json,
                          epsilon_cap=self.cfg.privacy.epsilon)
        inst = None
        if decision.accepted:
            agent = self._load_agent(exp)
            if self.policy.approvals.models != "any":
                check_model(decision, self._hash_of_model(agent))
        if decision.accepted:
            inst = self._institution(decision.effective, agent)
        else:
            log.warning("%s: refuses run %s under its node policy %s: %s", self.cfg.name, key, self.policy.source,
                        "; ".join(decision.lines))
        endpoint = InstitutionEndpoint(inst, institution_backend(exp, self.policy), self.identity, self.registry, key=key,
                                       decision=decision, audit=self.audit, coordinator_key=self.coordinator_key)
        endpoint.record_session(exp, self.cfg.resolved_ledger_path)
        self.endpoint, self.experiment = endpoint, exp
        return endpoint

    def _load_agent(self, exp):
        from fedse_secure.agent.policy import AgentModel

        agent_key = (exp.model.model_dump_json(), exp.lora.model_dump_json(), exp.seed)
        if agent_key != self._agent_key:
            log.info("%s: loading model %s", self.cfg.name, exp.model.name_or_path)
            self._agent = AgentModel.load(exp.model, exp.lora, exp.seed)
            self._agent_key, self._model_hash = agent_key, None
        return self._agent

    def _hash_of_model(self, agent) -> str:
        from fedse_secure.policy import model_hash

        if self._model_hash is None or self._model_hash[0] != self._agent_key:
            self._model_hash = (self._agent_key, model_hash(agent.model))
        return self._model_hash[1]

    def _institution(self, exp, agent):
        from fedse_secure.federation.institution import Institution, release_terms

        client = next(c for c in exp.clients if c.name == self.cfg.name)
        inst = Institution(exp, client, self.cfg.data_dir, agent, release_terms(exp),
                           ledger_path=self.cfg.resolved_ledger_path)
        inst.seed_buffer()
        return inst

    # -- requests ----------------------------------------------------------------------------------------------
    def handle(self, req: StageRequest) -> StageReply:
        try:
            if req.experiment_json:
                endpoint = self._endpoint_for(req.experiment_json)
            elif self.endpoint is None:
                raise InstitutionRefused(f"no experiment yet for round {req.round_id} {req.stage} (this worker "
                                         "restarted); it rejoins at the next round")
            else:
                endpoint = self.endpoint
            return endpoint.handle(req)
        except Exception as err:  # noqa: BLE001 - any failure means: this institution drops out of the round
            if self.endpoint is not None:
                self.endpoint.forget_round()
            log.error("%s: round %s %s refused: %s: %s", self.cfg.name, req.round_id, req.stage,
                      type(err).__name__, err)
            try:  # a refusal before any endpoint exists (an unreadable experiment) is recorded too
                self.audit.record("refusal", self.cfg.name, round=req.round_id, stage=req.stage, run_key=req.run_key,
                                  refusal=REFUSED, reason=f"{type(err).__name__}: {err}")
            except FedseError as audit_err:
                log.error("%s: the audit log cannot be written: %s", self.cfg.name, audit_err)
            return StageReply(req.stage, req.round_id, self.cfg.name, req.run_key,
                              error=f"{type(err).__name__}: {err}", refusal=REFUSED)


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
    try:
        cfg = load_institution_config(args[0])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve(cfg, Path(args[1]), Path(args[2]).read_bytes(), Path(args[3]) if len(args) == 4 else None)
    except FedseError as err:
        # `fedse node start` shows this one line (the last of the log) instead of a traceback.
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
