"""``fedse simulate``: every institution in one process, no server, no network.

The federated modes run through the same :class:`~fedse_secure.federation.driver.RoundDriver` as a Flower
deployment, with an :class:`~fedse_secure.federation.transport.InProcessTransport` in place of the network:
each institution is an :class:`~fedse_secure.federation.endpoint.InstitutionEndpoint`, every message passes
through the wire frames, and the configured secure-aggregation backend's machines run the protocol. The base
model is loaded once and shared: institutions swap LoRA adapter states (the frozen base weights are identical
everywhere).

Modes (``federation.mode``), as the paper's experiments:

* ``fedse``       — explore, filter successes, grow the buffer, train, secure-aggregate (the method);
* ``fedit``       — federated LoRA on the static expert demonstrations only (no exploration);
* ``local``       — one adapter per institution on its own static demonstrations, never aggregated;
* ``centralized`` — one adapter on all institutions' demonstrations pooled (needs raw-data sharing; reference);
* ``pretrained``  — the base model (LoRA B = 0), evaluated only.

The three baselines never aggregate, so they run here directly, writing the same records.

``fedse simulate --resume RUN`` (:func:`resume`) continues a run that stopped (killed, Ctrl-C, a full disk)
after the last round recorded in its ``metrics.jsonl``, with the run's own config, buffers and ledgers. Every
random choice is derived from the seed and the round, so the resumed run produces the same adapters as an
uninterrupted one (without DP: DP noise is drawn from the OS CSPRNG on purpose).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

from fedse_secure.config import FEDERATED_MODES, ConfigError, ExperimentConfig, config_diff, load_config
from fedse_secure.errors import FedseError
from fedse_secure.federation.progress import NULL_PROGRESS, Progress
from fedse_secure.federation.run_folder import (
    InstitutionRecord,
    RoundRecord,
    RunFolder,
    RunFolderError,
    RunSummary,
    evaluation_record,
    round_label,
)


class Simulation:
    def __init__(self, config: ExperimentConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                 progress: Progress = NULL_PROGRESS, resuming: bool = False):
        self.config = config
        self.progress = progress
        self.run = RunFolder(out_dir or config.resolved_output_dir())
        self.overwrite = overwrite
        self.resuming = resuming
        self.summary = RunSummary.start(config, transport="in-process")
        #: Rounds already completed (and recorded) when this process started: 0 for a new run.
        self.completed = 0
        self.records: list[RoundRecord] = []

    # ------------------------------------------------------------------------------------------------------------
    def run_all(self) -> RunSummary:
        from fedse_secure.federation.driver import BudgetExhausted
        from fedse_secure.privacy.budget import BudgetExceededError

        cfg = self.config
        started = time.time()
        # Everything that can fail on the config alone fails before the run folder is touched.
        preflight(cfg)
        if not self.resuming:
            self.run.check_creatable(self.overwrite)
        self._load_model()
        if self.resuming:
            self.run.check_resumable()
            self.run.acquire()
        else:
            self.run.create(cfg, overwrite=self.overwrite)
            self.run.acquire()
        try:
            earlier_s = self._prepare_resume() if self.resuming else 0.0
            self.run.write_summary(self.summary)
            try:
                self._setup()
                mode = cfg.federation.mode
                if mode in FEDERATED_MODES:
                    self._run_federated()
                elif mode == "local":
                    self._run_local()
                elif mode == "centralized":
                    self._run_centralized()
                else:
                    self._run_pretrained()
                self.summary.status, self.summary.error = "completed", None
            except KeyboardInterrupt:
                self.summary.status = "interrupted"
                self.summary.error = "stopped by the user (Ctrl-C)"
                raise
            except (BudgetExhausted, BudgetExceededError) as err:
                # Fail closed: the refused round never trained, so every completed round and the ledger stand.
                self.summary.status, self.summary.error = "budget_exhausted", str(err)
                raise
            except Exception as err:
                self.summary.status = "failed"
                self.summary.error = str(err) if isinstance(err, FedseError) else f"{type(err).__name__}: {err}"
                raise
            finally:
                self.summary.wall_s = round(earlier_s + time.time() - started, 3)
                self.run.remove_partial_writes()
                self.run.write_summary(self.summary)
        finally:
            self.run.release()
        return self.summary

    def _prepare_resume(self) -> float:
        """Read where the run stopped, discard what unrecorded rounds left, and set the summary to continue."""
        summary, self.records = self.run.rebuild_summary(self.config, transport="in-process")
        try:
            earlier_s = float(self.run.summary().wall_s or 0.0)
        except FedseError:
            earlier_s = 0.0
        self.completed = summary.rounds_completed if self.config.federation.mode != "pretrained" else 0
        for line in self.run.discard_unrecorded(self.completed, [c.name for c in self.config.clients]):
            self.progress.log(line)
        if self.completed:
            if self.config.federation.mode == "local":
                summary.final_adapter = {c.name: str(Path("adapters") / c.name / "final") for c in self.config.clients}
            else:
                summary.final_adapter = str(Path("adapters") / "final")
        summary.resumes.append({"time": time.time(), "after_round": self.completed})
        summary.status, summary.error = "running", None
        self.summary = summary
        self.progress.log(f"resuming {self.run.path} after round {self.completed}")
        return earlier_s

    def _start_state(self, client: str | None = None):
        """The adapter the run continues from: the initial one, or the last completed round's."""
        from fedse_secure.models.adapters import load_adapter_state

        if not self.completed:
            return OrderedDict(self.initial_state)
        folder = self.run.adapter_dir(round_label(self.completed), client)
        try:
            state = load_adapter_state(folder)
        except Exception as err:  # safetensors raises its own error types on a damaged file
            raise RunFolderError(f"{folder}: the adapter of round {self.completed} is unreadable "
                                 f"({type(err).__name__}); the run cannot be resumed from it: restore it from a backup "
                                 "or start a new run") from None
        if list(state) != list(self.initial_state):
            raise RunFolderError(f"{folder}: the adapter does not match the model's LoRA layers; the run cannot be "
                                 "resumed")
        return state

    def _evaluated(self) -> set[int]:
        return {r.round for r in self.records if r.status in ("initial", "evaluated")}

    def _load_model(self) -> None:
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.policy import NodePolicy, check_model, decide, load_policy, model_hash

        cfg = self.config
        # Each institution decides under its own node policy, exactly as a deployed one does, before any of its
        # data is touched; in a federated mode a refusing institution sits every round out (its endpoint refuses).
        experiment_json = cfg.model_dump_json()
        self.decisions = {c.name: decide(load_policy(c.policy) if c.policy else NodePolicy.open(), cfg, c.name,
                                         experiment_json=experiment_json) for c in cfg.clients}
        if cfg.federation.mode not in FEDERATED_MODES:
            for decision in self.decisions.values():
                decision.raise_if_refused()
        self.progress.log(f"loading model {cfg.model.name_or_path}")
        self.agent = AgentModel.load(cfg.model, cfg.lora, cfg.seed)
        if any(d.policy.approvals.models != "any" for d in self.decisions.values()):
            loaded = model_hash(self.agent.model)
            for decision in self.decisions.values():
                check_model(decision, loaded)
                if cfg.federation.mode not in FEDERATED_MODES:
                    decision.raise_if_refused()
        self.initial_state = self.agent.adapter_state()
        self.peft_config = self.agent.peft_config()

    def _setup(self) -> None:
        from fedse_secure.federation.institution import Institution, release_terms

        cfg = self.config
        terms = release_terms(cfg)
        self.ledgers = {c.name: c.ledger or self.run.institution_dir(c.name) / "privacy_ledger.jsonl"
                        for c in cfg.clients}
        self.institutions = [Institution(self.decisions[c.name].effective, c, self.run.institution_dir(c.name),
                                         self.agent, terms, ledger_path=self.ledgers[c.name])
                             for c in cfg.clients if self.decisions[c.name].accepted]
        bar = self.progress.task("expert demonstrations", total=len(self.institutions))
        for inst in self.institutions:
            inst.seed_buffer()
            bar.advance(1)
        bar.close()

    def _evaluate(self, round_id: int, state_of) -> None:
        """The baselines' evaluation: each institution on its own adapter (``state_of(institution)``)."""
        evaluations = {inst.name: inst.evaluate(state_of(inst), self.progress, label=f"evaluate r{round_id}")
                       for inst in self.institutions}
        self.run.record(evaluation_record(round_id, evaluations), self.summary)

    def _should_evaluate(self, round_id: int) -> bool:
        return self.config.evaluation.every_round or round_id == self.config.federation.rounds

    # ------------------------------------------------------------------------------------------------------------
    def _run_federated(self) -> None:
        from fedse_secure.audit import AuditLog, audit_path_for
        from fedse_secure.audit.attest import AdapterSigner
        from fedse_secure.federation.coordinator import Coordinator
        from fedse_secure.federation.driver import RoundDriver
        from fedse_secure.federation.endpoint import InstitutionEndpoint, institution_backend
        from fedse_secure.federation.transport import InProcessTransport
        from fedse_secure.federation.wire import run_key
        from fedse_secure.io_utils import atomic_write_bytes, atomic_write_text
        from fedse_secure.secagg.masking.identity import PublicKeyRegistry

        cfg = self.config
        backend = cfg.federation.backend()
        # Each institution's long-term identity, and the coordinator's, as `fedse keys init` makes them on disk: kept
        # (mode 0600) in the run folder, so a resumed run signs with the same keys and earlier round attestations
        # still verify. Their public keys go beside them for an auditor (registry.json, coordinator_identity.pub).
        names = [c.name for c in cfg.clients]
        identities = {name: _identity(self.run.institution_dir(name) / "identity_ed25519.pem") for name in names}
        registry = PublicKeyRegistry.from_identities(identities)
        coordinator_identity = _identity(self.run.path / "coordinator_identity.pem")
        atomic_write_text(self.run.path / "registry.json", registry.to_json() + "\n")
        atomic_write_bytes(self.run.path / "coordinator_identity.pub", coordinator_identity.public_pem())
        experiment_json = cfg.model_dump_json()
        key = run_key(experiment_json)
        by_name = {inst.name: inst for inst in self.institutions}
        endpoints = {}
        for c in cfg.clients:
            endpoint = InstitutionEndpoint(
                by_name.get(c.name), institution_backend(cfg, self.decisions[c.name].policy if c.policy else None),
                identities[c.name], registry, key=key, decision=self.decisions[c.name],
                audit=AuditLog(audit_path_for(self.ledgers[c.name])),
                coordinator_key=coordinator_identity.public_bytes(), progress=self.progress)
            endpoint.record_session(cfg, self.ledgers[c.name])
            endpoints[c.name] = endpoint
        transport = InProcessTransport(endpoints, backend.stages, cfg.federation.simulate_dropouts)
        coordinator = Coordinator(cfg.federation.aggregation, self._start_state(), self.completed)
        driver = RoundDriver(cfg, transport, self.run, self.summary, coordinator, peft_config=self.peft_config,
                             registry=registry, signer=AdapterSigner(coordinator_identity, experiment_json),
                             log=self.progress.log)
        everyone = names
        rounds = self.progress.task("federated rounds", total=cfg.federation.rounds)
        driver.run(lambda _r: (everyone, set(everyone)), after_round=lambda _rec, _state: rounds.advance(1))
        rounds.close()

    def _run_local(self) -> None:
        """Each institution trains its own adapter on its static demonstrations; nothing is aggregated."""
        cfg = self.config
        states = {inst.name: self._start_state(inst.name) for inst in self.institutions}
        self._make_up_evaluation(lambda inst: states[inst.name])
        for r in range(self.completed + 1, cfg.federation.rounds + 1):
            t0 = time.perf_counter()
            record = RoundRecord(round=r, status="completed", participants=[i.name for i in self.institutions])
            for inst in self.institutions:
                local = inst.local_round(r, states[inst.name], self.progress)
                states[inst.name] = self.agent.adapter_state()
                self.run.save_adapter(round_label(r), states[inst.name], self.peft_config, client=inst.name)
                record.institutions[inst.name] = InstitutionRecord(status="trained", report=local.report)
            record.timing["round_s"] = time.perf_counter() - t0
            self.summary.final_adapter = {
                inst.name: str(self.run.save_adapter("final", states[inst.name], self.peft_config, client=inst.name)
                               .relative_to(self.run.path)) for inst in self.institutions}
            self.run.record(record, self.summary)
            if self._should_evaluate(r):
                self._evaluate(r, lambda inst: states[inst.name])

    def _make_up_evaluation(self, state_of) -> None:
        """The evaluation due before the first round this process runs, unless it is already recorded (round 0
        for a new run with include_initial; the last completed round's for a run resumed before evaluating it)."""
        due = 0 if not self.completed and self.config.evaluation.include_initial else (
            self.completed if self.completed and self._should_evaluate(self.completed) else None)
        if due is not None and due not in self._evaluated():
            self._evaluate(due, state_of)

    def _run_centralized(self) -> None:
        """All demonstrations pooled into one training set (the paper's non-private reference point)."""
        from fedse_secure.agent.sft import encode_for_experiment, train_lora
        from fedse_secure.federation.institution import derive_seed

        cfg = self.config
        pooled = [t for inst in self.institutions for t in inst.buffer]
        tok = self.agent.tokenizer
        examples = encode_for_experiment(tok, pooled, cfg)
        state = self._start_state()
        self._make_up_evaluation(lambda _i: state)
        for r in range(self.completed + 1, cfg.federation.rounds + 1):
            t0 = time.perf_counter()
            self.agent.load_adapter_state(state)
            bar = self.progress.task("centralized: train", total=None)
            stats = train_lora(self.agent.model, examples, cfg.training, tok.pad_token_id,
                               derive_seed(cfg.seed, "central", r),
                               on_step=lambda s, total, loss: bar.update(completed=s, total=total, info=f"loss {loss:.3f}"))
            bar.close()
            state = self.agent.adapter_state()
            self.run.save_adapter(round_label(r), state, self.peft_config)
            self.summary.final_adapter = str(self.run.save_adapter("final", state, self.peft_config)
                                             .relative_to(self.run.path))
            record = RoundRecord(round=r, status="completed", participants=[i.name for i in self.institutions],
                                 training={"examples": len(examples), "steps": stats.steps, "loss": stats.mean_loss},
                                 timing={"round_s": time.perf_counter() - t0})
            self.run.record(record, self.summary)
            if self._should_evaluate(r):
                self._evaluate(r, lambda _i: state)

    def _run_pretrained(self) -> None:
        if 1 not in self._evaluated():
            self._evaluate(1, lambda _i: self.initial_state)
        self.summary.rounds_completed = 1
        self.summary.final_adapter = str(self.run.save_adapter("final", self.initial_state, self.peft_config)
                                         .relative_to(self.run.path))


def preflight(config: ExperimentConfig) -> None:
    """What can only be checked by building it, checked before a run folder is touched or the model loads: every
    institution's environment accepts its options, and the model is on disk."""
    from fedse_secure.envs import ENVIRONMENTS
    from fedse_secure.models.loading import resolve_model_path

    for i, client in enumerate(config.clients):
        try:
            ENVIRONMENTS.get(client.env).make(**client.env_options)
        except FedseError:
            raise
        except (TypeError, ValueError, KeyError, OSError) as err:
            raise ConfigError(f"clients.{i}.env_options ({client.name}): environment {client.env!r} rejects them "
                              f"({type(err).__name__}: {err}); fix the options") from None
    resolve_model_path(config.model.name_or_path)


def _identity(path: Path):
    """The Ed25519 identity stored at ``path``, made (from the OS CSPRNG) the first time."""
    from fedse_secure.secagg.masking.identity import IdentityKey

    if path.is_file():
        return IdentityKey.load(path)
    key = IdentityKey.generate()
    key.save(path)
    return key


def simulate(config: ExperimentConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
             progress: Progress = NULL_PROGRESS) -> RunSummary:
    """Run a whole experiment in-process and return its summary (also written to ``summary.json``)."""
    return Simulation(config, out_dir, overwrite=overwrite, progress=progress).run_all()


def resume(run_dir: str | Path, config: ExperimentConfig | None = None, *,
           progress: Progress = NULL_PROGRESS) -> RunSummary:
    """Continue the run in ``run_dir`` after its last recorded round, with its own config.

    ``config``, if given, must equal the run's (a changed experiment is a new run): otherwise ConfigError lists
    the fields that differ. A run whose process is still alive is refused, and so is a folder fedse did not
    create.
    """
    folder = RunFolder(run_dir)
    folder.check_resumable()
    saved = load_config(folder.path / "config.yaml")
    if config is not None:
        diff = config_diff(saved, config)
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ConfigError(f"--resume {folder.path}: the config differs from the run's own ({shown}); resume "
                              "without a config (the run's config.yaml is used), or start a new run with another --out")
    return Simulation(saved, folder.path, progress=progress, resuming=True).run_all()
