"""The one round driver: ``fedse simulate`` and a Flower deployment run federated rounds through this code.

Per round it asks the secure-aggregation backend for the coordinator's machine, drives it with
:func:`fedse_secure.secagg.driver.drive` over a :class:`~fedse_secure.federation.transport.StageTransport`
(the first stage carries the global adapter, and institutions run their local round before answering it),
forms the new global adapter from the released sum only, evaluates it when due, and writes the typed records
(:class:`RoundRecord`, :class:`RunSummary`) into the run folder. What differs between a simulation and a
deployment is only the transport, which institutions are asked, and what happens after a round (a
deployment checkpoints first).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedse_secure.config import ExperimentConfig
from fedse_secure.errors import FedseError
from fedse_secure.federation.coordinator import Coordinator
from fedse_secure.federation.run_folder import (
    InstitutionRecord,
    RoundRecord,
    RunFolder,
    RunSummary,
    evaluation_record,
    round_label,
)
from fedse_secure.federation.transport import StageTransport
from fedse_secure.federation.wire import BUDGET_EXHAUSTED, EVALUATE, StageRequest, run_key
from fedse_secure.secagg.base import MessageRejected, RoundAbortedError, SecureAggregationError, ServerMachine
from fedse_secure.secagg.driver import drive

EventSink = Callable[[dict[str, Any]], None]


class BudgetExhausted(FedseError, RuntimeError):
    """Every institution asked refused the round because its privacy budget cannot afford it: the run stops."""

    exit_code = 3


class NoRoundCompleted(FedseError, RuntimeError):
    """Every round of the run was aborted: there is no global adapter to show for it, so the run failed."""

    exit_code = 1


class _GuardedServer(ServerMachine):
    """The backend's server machine, with every reply it cannot parse counted as a rejected message.

    A reply comes from another organisation: whatever bytes it holds, the worst it may do is drop its sender
    out of the round (the backend's contract is to raise MessageRejected; this holds even if a parser slips).
    """

    def __init__(self, inner: ServerMachine) -> None:
        self.inner = inner

    @property
    def stage(self):
        return self.inner.stage

    @property
    def result(self):
        return self.inner.result

    @property
    def seconds(self):
        return self.inner.seconds

    def start(self):
        return self.inner.start()

    def receive(self, sender: str, data: bytes) -> None:
        try:
            self.inner.receive(sender, data)
        except (MessageRejected, RoundAbortedError):
            raise
        except Exception as err:  # noqa: BLE001 - any failure to parse a peer's bytes is that peer's fault
            raise MessageRejected(f"unreadable reply ({type(err).__name__}: {err})") from None

    def advance(self):
        return self.inner.advance()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def report_problem(report: Any) -> str | None:
    """Why an institution's round report cannot be recorded (None: it can). The coordinator only folds
    numbers and short strings from it into the run's records, so those must have the expected types."""
    if not isinstance(report, dict):
        return "the report is not a mapping"
    privacy = report.get("privacy", {})
    if not isinstance(privacy, dict):
        return "report.privacy is not a mapping"
    eps = privacy.get("epsilon_spent")
    if eps is not None and not (_number(eps) or eps == math.inf):
        return "report.privacy.epsilon_spent is not a number"
    if not isinstance(privacy.get("ledger_head", ""), (str, type(None))):
        return "report.privacy.ledger_head is not text"
    return None


def evaluation_problem(report: Any) -> str | None:
    """Why an evaluation reply cannot be recorded (None: it can)."""
    if not isinstance(report, dict):
        return "the evaluation is not a mapping"
    tasks, wins, rate = report.get("test_tasks"), report.get("successes"), report.get("success_rate")
    if not isinstance(report.get("env"), str):
        return "evaluation.env is not text"
    if not (isinstance(tasks, int) and not isinstance(tasks, bool) and tasks >= 0):
        return "evaluation.test_tasks is not a count"
    if not (isinstance(wins, int) and not isinstance(wins, bool) and 0 <= wins <= tasks):
        return "evaluation.successes is not a count within test_tasks"
    if rate is not None and not (_number(rate) and 0.0 <= rate <= 1.0):
        return "evaluation.success_rate is not a fraction"
    return None


@dataclass(frozen=True)
class Timeouts:
    #: Each secure-aggregation stage (the backend's stage_timeout_s).
    stage_s: float
    #: Added to the first stage of a round, which includes the institutions' local training.
    train_s: float = 0.0
    #: An evaluation request.
    evaluate_s: float = math.inf


class _Observer:
    """Turns the stage loop's notices into events and log lines."""

    def __init__(self, driver: RoundDriver, round_id: int) -> None:
        self.driver, self.round_id = driver, round_id
        self.silent: dict[str, list[str]] = {}

    def opened(self, stage, addressees):
        pass  # the exchange announces the stage with the institutions actually asked

    def closed(self, stage, replied, silent, seconds):
        self.silent[stage] = silent
        self.driver.event("stage_closed", round=self.round_id, stage=stage, replied=replied, silent=silent,
                          seconds=seconds)
        if silent:
            self.driver.log(f"round {self.round_id} {stage}: no valid reply from {silent}; treated as dropped")

    def rejected(self, stage, sender, error):
        self.driver.log(f"round {self.round_id} {stage}: reply from {sender} rejected: {error}")


class RoundDriver:
    def __init__(
        self,
        experiment: ExperimentConfig,
        transport: StageTransport,
        run: RunFolder,
        summary: RunSummary,
        coordinator: Coordinator,
        *,
        peft_config: dict,
        registry=None,
        signer=None,
        timeouts: Timeouts | None = None,
        log: Callable[[str], None] = lambda _m: None,
        events: EventSink | None = None,
    ) -> None:
        self.experiment = experiment
        self.transport = transport
        self.run_folder, self.summary = run, summary
        self.coordinator = coordinator
        self.peft_config = peft_config
        self.registry = registry
        #: The coordinator's adapter signer (``audit.attest.AdapterSigner``): every global adapter sent to
        #: institutions and saved in the run folder carries its signature.
        self.signer = signer
        self.backend = experiment.federation.backend()
        self.timeouts = timeouts or Timeouts(self.backend.settings.stage_timeout_s)
        self.log = log
        self._events = events
        self.experiment_json = experiment.model_dump_json()
        self.key = run_key(self.experiment_json)

    def event(self, kind: str, **fields: Any) -> None:
        if self._events is not None:
            self._events({"event": kind, "time": time.time(), **fields})

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self, participants: Callable[[int], tuple[list[str], set[str]]],
            after_round: Callable[[RoundRecord, Any], None] | None = None) -> None:
        """The remaining rounds of the experiment (a resumed run starts after its last completed round).

        ``participants(round_id)`` gives the institutions listed in the round and those actually asked (the
        others count as dropped at once); ``after_round(record, global_state)`` runs once a round's sum is
        released, before anything is written to the run folder (a deployment checkpoints there).
        ``federation.rounds`` counts attempts: an aborted round is one of them (it is retried with the same id).
        A resumed run first makes up an evaluation that was due but not recorded when it stopped. A run in which
        no round completed raises :class:`NoRoundCompleted`.
        """
        exp = self.experiment
        done = self.coordinator.completed_rounds
        evaluated = {r.round for r in self.run_folder.records() if r.status in ("initial", "evaluated")}
        pending = (0 if done == 0 and exp.evaluation.include_initial
                   else done if done and self._evaluation_due(done) else None)
        if pending is not None and pending not in evaluated:
            self._evaluate(pending, self.coordinator.global_state, set(participants(done + 1)[1]))
        attempts = done + len(self.summary.aborted_rounds)
        while attempts < exp.federation.rounds:
            attempts += 1
            listed, asked = participants(self.coordinator.completed_rounds + 1)
            record, state = self.run_round(listed, asked)
            if record.status == "completed":
                if after_round is not None:
                    after_round(record, state)
                folder = self.run_folder.save_adapter(round_label(record.round), state, self.peft_config)
                final = self.run_folder.save_adapter("final", state, self.peft_config)
                if self.signer is not None:
                    self.signer.write(folder, record.round, state)
                    self.signer.write(final, record.round, state)
                self.summary.final_adapter = str(final.relative_to(self.run_folder.path))
            self.run_folder.record(record, self.summary)
            if record.status == "completed":
                # Announced once it is durable: checkpoint (a deployment's after_round), adapters and record.
                self.event("round_completed", round=record.round, survivors=record.survivors, dropped=record.dropped,
                           seconds=record.timing["round_s"])
            if record.status == "completed" and self._evaluation_due(record.round):
                self._evaluate(record.round, state, set(record.survivors) | set(asked))
            if record.status == "aborted" and asked and all(
                    record.institutions[n].refusal == BUDGET_EXHAUSTED for n in asked):
                reasons = "; ".join(record.institutions[n].reason for n in sorted(asked))
                raise BudgetExhausted(f"round {record.round}: every institution refused it for its privacy budget: "
                                      f"{reasons}")
        if self.coordinator.completed_rounds == 0:
            reasons = "; ".join(f"round {a['round']}: {a['reason']}" for a in self.summary.aborted_rounds[-3:])
            raise NoRoundCompleted(f"no round completed ({len(self.summary.aborted_rounds)} aborted; {reasons}); "
                                   "nothing was released: fix the cause named there and run again")

    def _evaluation_due(self, round_id: int) -> bool:
        exp = self.experiment
        return exp.evaluation.every_round or round_id == exp.federation.rounds

    # -- one round ----------------------------------------------------------------------------------------------
    def run_round(self, listed: list[str], asked: set[str]) -> tuple[RoundRecord, Any]:
        """One round: the record, and the new global adapter (the old one if the round was aborted)."""
        from fedse_secure.models.adapters import state_to_bytes

        t_round = time.perf_counter()
        start = self.coordinator.begin_round()
        round_id = start.round_id
        listed = sorted(listed)
        self.log(f"round {round_id}: participants {sorted(asked)}")
        self.event("round_started", round=round_id, participants=listed, asked=sorted(asked))
        adapter, order = state_to_bytes(start.global_state)
        signature = self._signature(round_id - 1, start.global_state)
        reports: dict[str, dict[str, Any]] = {}
        refused: dict[str, tuple[str, str]] = {}  # name -> (refusal kind, the institution's reason)
        first_stage_s: list[float] = []

        def exchange(stage: str, requests: dict[str, bytes]) -> dict[str, bytes]:
            first = not first_stage_s
            t0 = time.perf_counter()
            reqs = {}
            for name, data in requests.items():
                if name not in asked or name in refused:
                    continue
                blobs = {"request": data}
                if first:
                    blobs.update(global_state=adapter, global_state_keys=order, **signature)
                reqs[name] = StageRequest(stage, round_id, self.key, self.experiment_json if first else "",
                                          train=first, blobs=blobs)
            self.event("stage_opened", round=round_id, stage=stage, addressees=sorted(reqs))
            timeout = self.timeouts.stage_s + (self.timeouts.train_s if first else 0.0)
            out = {}
            for name, rep in sorted(self.transport.send_stage(reqs, timeout).items()):
                if (rep.stage, rep.round_id, rep.institution, rep.run_key) != (stage, round_id, name, self.key):
                    self.log(f"round {round_id} {stage}: reply from {name} is for {rep.institution}/{rep.run_key}/"
                             f"{rep.round_id}/{rep.stage}; rejected")
                    continue
                if rep.error:
                    self.log(f"round {round_id} {stage}: {name} refused: {rep.error}")
                    refused[name] = (rep.refusal, rep.error)
                    continue
                if first:
                    problem = report_problem(rep.report)
                    if problem:
                        self.log(f"round {round_id} {stage}: reply from {name} rejected: {problem}")
                        continue
                    reports[name] = rep.report
                if "reply" in rep.blobs:
                    out[name] = rep.blobs["reply"]
            if first:
                first_stage_s.append(time.perf_counter() - t0)
            return out

        participants = list(listed)
        record = RoundRecord(round=round_id, status="completed", participants=participants)
        observer = _Observer(self, round_id)
        try:
            server = _GuardedServer(self.backend.server(round_id, participants,
                                                        self.coordinator.rule.payload_size(start.global_state),
                                                        self.registry))
            t_agg = time.perf_counter()
            result = drive(server, exchange, observer)
        except SecureAggregationError as err:
            self.coordinator.abandon_round()
            self.log(f"round {round_id} abandoned, nothing released: {err}")
            self.event("round_aborted", round=round_id, reason=str(err))
            record.status, record.reason = "aborted", str(err)
            record.secure_aggregation = {"backend": self.backend.name}
            record.dropped = [n for n in participants if n not in refused]
            state = start.global_state
        else:
            outcome = self.coordinator.complete_round(result)
            state = outcome.global_state
            record.survivors, record.dropped = outcome.survivors, [n for n in outcome.dropped if n not in refused]
            record.released_sum_sha256 = hashlib.sha256(np.ascontiguousarray(result.total, "<f8").tobytes()).hexdigest()
            record.secure_aggregation = {"backend": self.backend.name, **outcome.measurements}
            record.timing["secure_aggregation_s"] = time.perf_counter() - t_agg - sum(first_stage_s)
        record.timing["first_stage_s"] = sum(first_stage_s)
        record.timing["round_s"] = time.perf_counter() - t_round
        for name in participants:
            status = ("survivor" if name in record.survivors else "refused" if name in refused
                      else "dropped" if name in asked else "not_asked")
            kind, reason = refused.get(name, (None, None))
            record.institutions[name] = InstitutionRecord(status=status, reason=reason, refusal=kind,
                                                          report=reports.get(name, {}))
        return record, state

    def _signature(self, adapter_round: int, state) -> dict[str, bytes]:
        """The signature blob for the adapter that is the result of ``adapter_round`` (0: the initial one)."""
        if self.signer is None:
            return {}
        import json

        return {"global_state_signature": json.dumps(self.signer.sign(adapter_round, state)).encode()}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluate(self, round_id: int, state, names: set[str]) -> None:
        """Each reachable institution evaluates ``state`` on its own test tasks; one evaluation record."""
        from fedse_secure.models.adapters import state_to_bytes

        targets = sorted(self.transport.reachable(names))
        adapter, order = state_to_bytes(state)
        blobs = {"global_state": adapter, "global_state_keys": order, **self._signature(round_id, state)}
        reqs = {n: StageRequest(EVALUATE, round_id, self.key, self.experiment_json, blobs=dict(blobs))
                for n in targets}
        self.event("stage_opened", round=round_id, stage=EVALUATE, addressees=targets)
        t0 = time.perf_counter()
        replies = self.transport.send_stage(reqs, self.timeouts.evaluate_s)
        evaluations, reasons = {}, {}
        for name in targets:
            rep = replies.get(name)
            problem = None
            if rep is None:
                problem = "no evaluation received"
            elif rep.error:
                problem = rep.error
            elif (rep.stage, rep.round_id, rep.institution, rep.run_key) != (EVALUATE, round_id, name, self.key):
                problem = f"the reply is for {rep.institution}/{rep.run_key}/{rep.round_id}/{rep.stage}; rejected"
            else:
                problem = evaluation_problem(rep.report)
            evaluations[name] = rep.report if problem is None else None
            if problem is not None:
                reasons[name] = problem
                if rep is not None and not rep.error:
                    self.log(f"evaluation of round {round_id}: reply from {name} rejected: {problem}")
        record = evaluation_record(round_id, evaluations, reasons)
        record.timing["evaluation_s"] = time.perf_counter() - t0
        self.event("evaluated", round=round_id, institutions=sorted(n for n, e in evaluations.items() if e))
        self.run_folder.record(record, self.summary)
