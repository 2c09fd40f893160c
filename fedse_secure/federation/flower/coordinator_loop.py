"""The coordinator's run in a deployment: the shared :class:`~fedse_secure.federation.driver.RoundDriver` over
the Flower transport, plus what only a long-lived deployment needs: which admitted institutions to ask each
round (connected, and not known to have stopped answering), and a checkpoint after every completed round,
written before anything else happens, so that ``--resume`` continues after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from fedse_secure.errors import FedseError
from fedse_secure.federation.deploy_config import CoordinatorDeployConfig
from fedse_secure.federation.flower.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from fedse_secure.federation.transport import StageTransport


class FlowerStageTransport(StageTransport, Protocol):
    #: Institutions that stopped answering -> since when (epoch s); kept in the checkpoint.
    unresponsive: dict[str, float]

    def reconnected_since(self, name: str, since: float) -> bool:
        """Has this institution's node (re)connected after time ``since`` (epoch seconds)?"""

    def answered_late(self) -> set[str]:
        """Institutions that have since replied to a request after its stage had closed."""


class DeploymentError(FedseError, RuntimeError):
    pass


def load_registry(cfg: CoordinatorDeployConfig):
    from fedse_secure.federation.flower import pki
    from fedse_secure.secagg.masking.identity import PublicKeyRegistry

    return PublicKeyRegistry({i.name: pki.raw_public_bytes(pki.load_identity_public(i.identity_public_key))
                              for i in cfg.institutions})


class CoordinatorRun:
    def __init__(self, cfg: CoordinatorDeployConfig, transport: FlowerStageTransport, *, resume: bool = False,
                 log: Callable[[str], None] = print, events: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.transport = transport
        self.resume = resume
        self.log = log
        self.events = events or (lambda _e: None)
        self.store = CheckpointStore(cfg.state_dir / "checkpoint")

    def _event(self, kind: str, **kw: Any) -> None:
        self.events({"event": kind, "time": time.time(), **kw})

    # ------------------------------------------------------------------------------------------------------
    def run(self):
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.federation.coordinator import Coordinator
        from fedse_secure.federation.driver import BudgetExhausted, RoundDriver, Timeouts
        from fedse_secure.federation.run_folder import RunFolder, RunSummary
        from fedse_secure.federation.wire import run_key

        cfg, exp = self.cfg, self.cfg.experiment
        key = run_key(exp.model_dump_json())
        history: list[dict[str, Any]] = []
        self.log(f"loading model {exp.model.name_or_path} for the initial adapter")
        agent = AgentModel.load(exp.model, exp.lora, exp.seed)
        peft_config = agent.peft_config()
        state, completed = agent.adapter_state(), 0
        del agent
        run_folder = RunFolder(cfg.resolved_run_dir)
        summary = RunSummary.start(exp, transport="flower")
        if self.store.exists():
            if not self.resume:
                raise DeploymentError(
                    f"{self.store.root} holds a checkpoint of an earlier run; continue it with `fedse server start "
                    "--resume` (or `fedse federation run --resume`), or move the state_dir away to start over"
                )
            ckpt = self.store.load()
            if ckpt.experiment_hash != key:
                raise CheckpointError(
                    f"{self.store.root}: the checkpoint was made for a different experiment ({ckpt.experiment_hash} != "
                    f"{key}); resume with the same coordinator config or start a new state_dir"
                )
            state, completed, history = ckpt.global_state, ckpt.completed_rounds, ckpt.history
            self.transport.unresponsive.update(ckpt.unresponsive)
            summary = run_folder.summary() if run_folder.summary_path.is_file() else summary
            summary.status, summary.error = "running", None
            self.log(f"resuming after round {completed} from {self.store.root}")
            self._event("resumed", completed_rounds=completed)
        elif self.resume:
            self.log("--resume: no checkpoint yet, starting at round 1")
        if not (run_folder.path / "config.yaml").exists():
            run_folder.create(exp, overwrite=False)
        run_folder.acquire()  # released when this process ends: a dead coordinator's run reads as interrupted
        run_folder.write_summary(summary)
        backend = exp.federation.backend()
        signer = None
        if cfg.identity_key is not None:
            from fedse_secure.audit.attest import AdapterSigner
            from fedse_secure.secagg.masking.identity import IdentityKey

            signer = AdapterSigner(IdentityKey.load(cfg.identity_key), exp.model_dump_json())
        driver = RoundDriver(
            exp, self.transport, run_folder, summary, Coordinator(exp.federation.aggregation, state, completed),
            peft_config=peft_config, registry=load_registry(cfg), signer=signer, log=self.log, events=self.events,
            timeouts=Timeouts(backend.settings.stage_timeout_s, cfg.timeouts.train_s, cfg.timeouts.evaluate_s),
        )

        def checkpoint(record, global_state) -> None:
            # Checkpoint first: once it is on disk, this round can never be lost.
            history.append({"round": record.round, "status": record.status, "survivors": record.survivors,
                            "dropped": record.dropped, "round_s": record.timing.get("round_s")})
            self.store.save(Checkpoint(record.round, global_state, key, history, dict(self.transport.unresponsive)))
            self.log(f"round {record.round} completed in {record.timing.get('round_s', 0):.1f} s: survivors "
                     f"{record.survivors}, dropped {record.dropped}")

        try:
            driver.run(self._participants(backend.min_contributors(len(cfg.institutions))), after_round=checkpoint)
            summary.status = "completed"
        except BudgetExhausted as err:
            summary.status, summary.error = "budget_exhausted", str(err)
            raise
        except BaseException as err:
            summary.status = "failed"
            summary.error = str(err) if isinstance(err, FedseError) else f"{type(err).__name__}: {err}"
            raise
        finally:
            run_folder.write_summary(summary)
            run_folder.release()
        return summary

    # ------------------------------------------------------------------------------------------------------
    def _participants(self, contributors: int) -> Callable[[int], tuple[list[str], set[str]]]:
        """(listed, asked) per round. Every admitted institution is listed in the round's setup; only those
        connected and answering are asked, the others count as dropped at once. Round 1 waits up to join_s for
        everybody; a round with fewer than the backend needs to ask waits up to join_s for more, then fails."""
        admitted = {i.name for i in self.cfg.institutions}
        need = max(contributors, self.cfg.min_institutions or 0)

        def select(round_id: int) -> tuple[list[str], set[str]]:
            t0 = time.monotonic()
            while True:
                online = self.transport.online() & admitted
                asked = online - self._still_silent(online, round_id)
                waited = time.monotonic() - t0
                if asked == admitted or (len(asked) >= need and (round_id > 1 or waited >= self.cfg.timeouts.join_s)):
                    skip = admitted - asked
                    if skip:
                        self.log(f"round {round_id}: {sorted(skip)} not connected or not answering since an earlier "
                                 "stage; listed but not asked (each rejoins once its SuperNode reconnects)")
                    return sorted(admitted), asked
                if waited >= self.cfg.timeouts.join_s and len(asked) < need:
                    raise DeploymentError(
                        f"round {round_id}: only {sorted(asked)} of {sorted(admitted)} are connected and answering "
                        f"after {waited:.0f} s; the round needs at least {need} (the fewest contributors the "
                        "secure-aggregation backend releases a sum for); start the missing institutions (`fedse node "
                        "start`) and check their logs"
                    )
                time.sleep(2.0)

        return select

    def _still_silent(self, online: set[str], round_id: int) -> set[str]:
        """Institutions that stopped answering and have shown no sign of life since: not asked (Flower keeps a
        killed node "online" for up to two heartbeats, and waiting for it would cost the training timeout). A
        sign of life is a reconnected node, or a late reply: a node that was only slow never reconnects, and
        excluding it for good could leave too few institutions for any later round."""
        silent = set()
        unresponsive = self.transport.unresponsive
        late = self.transport.answered_late() if unresponsive else set()
        for name in sorted(late & set(unresponsive)):
            self.log(f"round {round_id}: {name} answered after its stage had closed; it rejoins")
            del unresponsive[name]
        for name in sorted(online & set(unresponsive)):
            if self.transport.reconnected_since(name, unresponsive[name]):
                self.log(f"round {round_id}: {name} has reconnected; it rejoins")
                del unresponsive[name]
            else:
                silent.add(name)
        return silent
