"""The coordinator's run over any message transport: :class:`Coordinator` + one :class:`SecAggServer` per round.

The transport only has to send one request per institution and return the replies that arrive before a
timeout (:class:`StageTransport`); the Flower ServerApp implements it with ``Grid.send_and_receive``. Every
stage follows the state machine's contract: feed each reply to ``server.receive`` (a reply it rejects is
logged and its sender counts as silent), then ``server.advance()`` closes the stage; whoever did not answer
has dropped out, and the protocol either recovers (enough survivors) or abandons the round without
releasing anything. After every completed round the checkpoint is written before anything else happens.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from fedse_secure.federation.deploy_config import CoordinatorDeployConfig
from fedse_secure.federation.flower.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from fedse_secure.federation.flower.wire import EVALUATE, StageReply, StageRequest, WireError


class StageTransport(Protocol):
    def online(self) -> set[str]:
        """Institutions currently connected (authenticated SuperNodes)."""

    def send_stage(self, requests: dict[str, StageRequest], timeout_s: float) -> dict[str, StageReply]:
        """Deliver each request to its institution; return the replies received within ``timeout_s``."""

    def reconnected_since(self, name: str, since: float) -> bool:
        """Has this institution's node (re)connected after time ``since`` (epoch seconds)?"""


class DeploymentError(RuntimeError):
    pass


def experiment_hash(cfg: CoordinatorDeployConfig) -> str:
    return hashlib.sha256(cfg.experiment.model_dump_json().encode()).hexdigest()[:16]


def load_registry(cfg: CoordinatorDeployConfig):
    from fedse_secure.federation.flower import pki
    from fedse_secure.secagg.masking.identity import PublicKeyRegistry

    return PublicKeyRegistry({i.name: pki.raw_public_bytes(pki.load_identity_public(i.identity_public_key))
                              for i in cfg.institutions})


class CoordinatorRun:
    def __init__(self, cfg: CoordinatorDeployConfig, transport: StageTransport, *, resume: bool = False,
                 log: Callable[[str], None] = print, events: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.transport = transport
        self.resume = resume
        self.log = log
        self.events = events or (lambda _e: None)
        self.store = CheckpointStore(cfg.state_dir / "checkpoint")
        # Institutions that stopped answering (no reply at all, not a refusal) -> when. Flower keeps a killed
        # node "online" for up to two heartbeats (60 s), so without this every following round would wait the
        # full training timeout for it; it is invited again once its SuperNode has reconnected.
        self.unresponsive: dict[str, float] = {}

    def _event(self, kind: str, **kw: Any) -> None:
        self.events({"event": kind, "time": time.time(), **kw})

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.aggregation.rules import get_rule
        from fedse_secure.federation.coordinator import Coordinator
        from fedse_secure.federation.run_folder import RunFolder

        cfg, exp = self.cfg, self.cfg.experiment
        exp_hash = experiment_hash(cfg)
        history: list[dict[str, Any]] = []
        self.log(f"loading model {exp.model.name_or_path} for the initial adapter")
        agent = AgentModel.load(exp.model, exp.lora, exp.seed)
        peft_config = agent.peft_config()
        state, completed = agent.adapter_state(), 0
        del agent
        run_folder = RunFolder(cfg.resolved_run_dir)
        if self.store.exists():
            if not self.resume:
                raise DeploymentError(
                    f"{self.store.root} holds a checkpoint of an earlier run; continue it with `fedse server start "
                    "--resume` (or `fedse federation run --resume`), or move the state_dir away to start over"
                )
            ckpt = self.store.load()
            if ckpt.experiment_hash != exp_hash:
                raise CheckpointError(
                    f"{self.store.root}: the checkpoint was made for a different experiment ({ckpt.experiment_hash} != "
                    f"{exp_hash}); resume with the same coordinator config or start a new state_dir"
                )
            state, completed, history = ckpt.global_state, ckpt.completed_rounds, ckpt.history
            self.unresponsive.update(ckpt.unresponsive)
            self.log(f"resuming after round {completed} from {self.store.root}")
            self._event("resumed", completed_rounds=completed)
        elif self.resume:
            self.log("--resume: no checkpoint yet, starting at round 1")
        if not (run_folder.path / "config.yaml").exists():
            run_folder.create(exp, overwrite=False)
        coordinator = Coordinator(get_rule(exp.federation.aggregation), state, completed_rounds=completed)
        registry = load_registry(cfg)
        experiment_json = exp.model_dump_json()
        summary: dict[str, Any] = {"name": exp.name, "status": "running", "transport": "flower",
                                   "rounds_planned": exp.federation.rounds, "rounds_completed": completed,
                                   "aborted_rounds": [h for h in history if h.get("status") == "aborted"],
                                   "round_s": {str(h["round"]): h["round_s"] for h in history if "round_s" in h}}
        run_folder.write_summary(summary)
        try:
            for _ in range(completed, exp.federation.rounds):
                self._one_round(coordinator, registry, experiment_json, exp_hash, history, run_folder,
                                peft_config, summary)
            if exp.evaluation.every_round or exp.federation.rounds == coordinator.completed_rounds:
                self._final_evaluation(coordinator, experiment_json, run_folder, summary)
            summary["status"] = "completed"
        except BaseException as err:
            summary["status"] = "failed"
            summary["error"] = f"{type(err).__name__}: {err}"
            raise
        finally:
            run_folder.write_summary(summary)
        return summary

    # ------------------------------------------------------------------------------------------------------
    def _needed(self) -> int:
        """Institutions that must actually take part for a round to be able to finish (the Shamir threshold)."""
        from fedse_secure.secagg.masking.graph import default_threshold, resolve_degree

        sa = self.cfg.experiment.federation.secagg
        n = len(self.cfg.institutions)
        t = sa.threshold if sa.threshold is not None else default_threshold(resolve_degree(n, sa.neighbours) + 1)
        return max(t, self.cfg.min_institutions or 0)

    def _participants(self, round_id: int) -> tuple[list[str], set[str]]:
        """(listed, asked). Every admitted institution is listed in the round's setup; only those connected
        and answering are asked, the others count as dropped at once. Round 1 waits up to join_s for everybody;
        a round with fewer than the threshold to ask waits up to join_s for more, then fails."""
        admitted = {i.name for i in self.cfg.institutions}
        need = self._needed()
        t0 = time.monotonic()
        while True:
            online = self.transport.online() & admitted
            asked = online - self._still_silent(online, round_id)
            waited = time.monotonic() - t0
            if asked == admitted or (len(asked) >= need and (round_id > 1 or waited >= self.cfg.timeouts.join_s)):
                return sorted(admitted), asked
            if waited >= self.cfg.timeouts.join_s and len(asked) < need:
                raise DeploymentError(
                    f"round {round_id}: only {sorted(asked)} of {sorted(admitted)} are connected and answering after "
                    f"{waited:.0f} s; the round needs at least {need} (the secure-aggregation threshold); start the "
                    "missing institutions (`fedse node start`) and check their logs"
                )
            time.sleep(2.0)

    def _still_silent(self, online: set[str], round_id: int) -> set[str]:
        """Institutions that stopped answering and whose node has not reconnected since: not asked (Flower keeps
        a killed node "online" for up to two heartbeats, and waiting for it would cost the training timeout)."""
        silent = set()
        for name in sorted(online & set(self.unresponsive)):
            if self.transport.reconnected_since(name, self.unresponsive[name]):
                self.log(f"round {round_id}: {name} has reconnected; it rejoins")
                del self.unresponsive[name]
            else:
                silent.add(name)
        return silent

    def _one_round(self, coordinator, registry, experiment_json, exp_hash, history, run_folder, peft_config,
                   summary) -> None:
        from fedse_secure.federation.flower.worker import state_to_bytes
        from fedse_secure.federation.run_folder import round_label
        from fedse_secure.secagg.base import SecureAggregationError
        from fedse_secure.secagg.masking.messages import Stage, decode
        from fedse_secure.secagg.masking.server import SecAggServer

        exp = self.cfg.experiment
        t_round = time.perf_counter()
        round_id = coordinator.completed_rounds + 1
        participants, asked = self._participants(round_id)
        skip = set(participants) - asked
        if skip:
            self.log(f"round {round_id}: {sorted(skip)} not connected or not answering since an earlier stage; "
                     "listed but not asked (each rejoins once its SuperNode reconnects)")
        start = coordinator.begin_round()
        gs, gs_keys = state_to_bytes(start.global_state)
        self.log(f"round {round_id}: participants {sorted(asked)}")
        self._event("round_started", round=round_id, participants=participants, asked=sorted(asked))
        client_metrics: dict[str, dict[str, Any]] = {}
        stage_s: dict[str, float] = {}
        try:
            server = SecAggServer(round_id, participants, coordinator.rule.payload_size(start.global_state),
                                  exp.federation.secagg, registry)
            requests = server.start()
            while requests:
                stage = server.stage
                first = stage == Stage.ADVERTISE_KEYS
                reqs = {}
                for name, msg in requests.items():
                    if name in skip:
                        continue
                    blobs = {"request": msg.to_bytes()}
                    if first:
                        blobs.update(global_state=gs, global_state_keys=gs_keys)
                    reqs[name] = StageRequest(stage, round_id, exp_hash, experiment_json if first else "",
                                              evaluate_first=first and round_id > 1 and exp.evaluation.every_round,
                                              blobs=blobs)
                timeout = exp.federation.secagg.stage_timeout_s + (self.cfg.timeouts.train_s if first else 0.0)
                self._event("stage_opened", round=round_id, stage=stage, addressees=sorted(reqs))
                t0, sent_at = time.perf_counter(), time.time()
                replies = self.transport.send_stage(reqs, timeout)
                for name in set(reqs) - set(replies):
                    self.unresponsive.setdefault(name, sent_at)
                for name in replies:
                    self.unresponsive.pop(name, None)
                for name, rep in sorted(replies.items()):
                    if rep.error:
                        self.log(f"round {round_id} {stage}: {name} refused: {rep.error}")
                        continue
                    if rep.stage != stage or rep.round_id != round_id or rep.institution != name:
                        self.log(f"round {round_id} {stage}: reply from {name} is for {rep.institution}/"
                                 f"{rep.round_id}/{rep.stage}; rejected")
                        continue
                    try:
                        server.receive(decode(rep.blobs.get("reply", b"")))
                    except (SecureAggregationError, WireError, ValueError) as err:
                        self.log(f"round {round_id} {stage}: reply from {name} rejected: {err}")
                        continue
                    if rep.metrics:
                        client_metrics.setdefault(name, {}).update(rep.metrics)
                silent = sorted(set(requests) - set(server.replies))
                stage_s[stage] = time.perf_counter() - t0
                self._event("stage_closed", round=round_id, stage=stage, replied=sorted(server.replies),
                            silent=silent, seconds=stage_s[stage])
                if silent:
                    self.log(f"round {round_id} {stage}: no valid reply from {silent}; treated as dropped")
                requests = server.advance()
        except SecureAggregationError as err:
            coordinator.abandon_round()
            self.log(f"round {round_id} abandoned, nothing released: {err}")
            entry = {"round": round_id, "status": "aborted", "reason": str(err), "participants": participants}
            history.append(entry)
            summary["aborted_rounds"].append(entry)
            self._event("round_aborted", round=round_id, reason=str(err))
            self._record_previous_eval(client_metrics, run_folder)
            return
        outcome = coordinator.complete_round(server.result)
        round_s = time.perf_counter() - t_round
        entry = {"round": round_id, "status": "completed", "survivors": outcome.survivors,
                 "dropped": outcome.dropped, "round_s": round_s, "stage_s": stage_s}
        history.append(entry)
        # Checkpoint first: once it is on disk, this round can never be lost.
        self.store.save(Checkpoint(round_id, outcome.global_state, exp_hash, history, dict(self.unresponsive)))
        run_folder.save_adapter(round_label(round_id), outcome.global_state, peft_config)
        run_folder.save_adapter("final", outcome.global_state, peft_config)
        self._record_previous_eval(client_metrics, run_folder)
        records = []
        for name in participants:
            m = {k: v for k, v in client_metrics.get(name, {}).items() if k != "previous_round_eval"}
            records.append({"round": round_id, "client": name, **m, "round_status": "completed",
                            "survivor": name in outcome.survivors, "round_s": round_s,
                            **{f"secagg_{k}": v for k, v in outcome.measurements.items()}})
        run_folder.append_metrics(records)
        summary["rounds_completed"] = round_id
        summary["round_s"][str(round_id)] = round_s
        summary["final_adapter"] = "adapters/final"
        run_folder.write_summary(summary)
        self.log(f"round {round_id} completed in {round_s:.1f} s: survivors {outcome.survivors}, dropped "
                 f"{outcome.dropped}")
        self._event("round_completed", round=round_id, survivors=outcome.survivors, dropped=outcome.dropped,
                    seconds=round_s)

    def _record_previous_eval(self, client_metrics, run_folder) -> None:
        evals = [m["previous_round_eval"] | {"client": n} for n, m in client_metrics.items()
                 if isinstance(m.get("previous_round_eval"), dict)]
        if evals:
            run_folder.append_metrics([{**e, "kind": "evaluation"} for e in evals])

    def _final_evaluation(self, coordinator, experiment_json, run_folder, summary) -> None:
        from fedse_secure.federation.flower.worker import state_to_bytes

        r = coordinator.completed_rounds
        online = sorted(self.transport.online() & {i.name for i in self.cfg.institutions})
        gs, keys = state_to_bytes(coordinator.global_state)
        reqs = {n: StageRequest(EVALUATE, r, experiment_hash(self.cfg), experiment_json,
                                blobs={"global_state": gs, "global_state_keys": keys}) for n in online}
        self._event("stage_opened", round=r, stage=EVALUATE, addressees=online)
        replies = self.transport.send_stage(reqs, self.cfg.timeouts.evaluate_s)
        evals = {n: rep.metrics for n, rep in replies.items() if not rep.error}
        if evals:
            run_folder.append_metrics([{"round": r, **m, "kind": "evaluation"} for m in evals.values()])
            tasks = sum(int(m.get("test_tasks", 0)) for m in evals.values())
            wins = sum(int(m.get("successes", 0)) for m in evals.values())
            summary["final_eval"] = {n: m.get("success_rate") for n, m in evals.items()}
            summary["micro_avg"] = {str(r): wins / tasks if tasks else None}
        self._event("evaluated", round=r, institutions=sorted(evals))
