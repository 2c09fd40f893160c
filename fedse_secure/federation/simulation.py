"""``fedse simulate``: every institution in one process, no server, no network.

It drives the same pieces as a multi-machine deployment — :class:`Institution` for each client's local round,
the configured secure-aggregation backend for the sum, :class:`Coordinator` for the new global adapter — and
records everything in a :class:`RunFolder`. The base model is loaded once and shared: institutions swap LoRA
adapter states (the frozen base weights are identical everywhere).

Modes (``federation.mode``), as the paper's experiments:

* ``fedse``       — explore, filter successes, grow the buffer, train, secure-aggregate (the method);
* ``fedit``       — federated LoRA on the static expert demonstrations only (no exploration);
* ``local``       — one adapter per institution on its own static demonstrations, never aggregated;
* ``centralized`` — one adapter on all institutions' demonstrations pooled (needs raw-data sharing; reference);
* ``pretrained``  — the base model (LoRA B = 0), evaluated only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedse_secure.config import ExperimentConfig
from fedse_secure.federation.progress import NULL_PROGRESS, Progress
from fedse_secure.federation.run_folder import RunFolder, round_label


def _micro_average(evals: list[dict[str, Any]]) -> float | None:
    tasks = sum(e["test_tasks"] for e in evals)
    return sum(e["successes"] for e in evals) / tasks if tasks else None


class Simulation:
    def __init__(self, config: ExperimentConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                 progress: Progress = NULL_PROGRESS):
        self.config = config
        self.progress = progress
        self.run = RunFolder(out_dir or config.resolved_output_dir())
        self.overwrite = overwrite
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        cfg = self.config
        started = time.time()
        self.run.create(cfg, overwrite=self.overwrite)
        self.summary = {
            "name": cfg.name, "mode": cfg.federation.mode, "status": "running", "seed": cfg.seed,
            "rounds_planned": cfg.federation.rounds if cfg.federation.mode != "pretrained" else 1,
            "rounds_completed": 0, "aggregation": cfg.federation.aggregation,
            "secure_aggregation": cfg.federation.secure_aggregation, "privacy": cfg.privacy.mode,
            "clients": {c.name: c.env for c in cfg.clients},
            "success_by_client": {c.name: {} for c in cfg.clients}, "success_by_env": {}, "micro_avg": {},
            "aborted_rounds": [], "final_adapter": None, "epsilon_spent": {},
        }
        self.run.write_summary(self.summary)
        try:
            self._setup()
            mode = cfg.federation.mode
            if mode in ("fedse", "fedit"):
                self._run_federated()
            elif mode == "local":
                self._run_local()
            elif mode == "centralized":
                self._run_centralized()
            else:
                self._run_pretrained()
            self.summary["status"] = "completed"
        except KeyboardInterrupt:
            self.summary["status"] = "interrupted"
            raise
        except Exception as err:
            if type(err).__name__ != "BudgetExceededError":
                self.summary["status"] = "failed"
                self.summary["error"] = f"{type(err).__name__}: {err}"
                raise
            # Fail closed: the refused round never trained, so every completed round and the ledger stand.
            self.summary["status"] = "budget_exhausted"
            self.summary["error"] = str(err)
            raise
        finally:
            self.summary["wall_s"] = round(time.time() - started, 3)
            self.run.remove_partial_writes()
            self.run.write_summary(self.summary)
        return self.summary

    # ------------------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.aggregation.rules import get_rule
        from fedse_secure.federation.institution import Institution

        cfg = self.config
        self.progress.log(f"loading model {cfg.model.name_or_path}")
        self.agent = AgentModel.load(cfg.model, cfg.lora, cfg.seed)
        self.rule = get_rule(cfg.federation.aggregation)
        self.initial_state = self.agent.adapter_state()
        self.peft_config = self.agent.peft_config()
        self.institutions = [
            Institution(cfg, c, self.run.institution_dir(c.name), self.agent, self.rule, len(cfg.clients))
            for c in cfg.clients
        ]
        bar = self.progress.task("expert demonstrations", total=len(self.institutions))
        for inst in self.institutions:
            inst.seed_buffer()
            bar.advance(1)
        bar.close()

    def _record_eval(self, round_id: int, evals: dict[str, dict[str, Any]]) -> None:
        by_env: dict[str, list[dict[str, Any]]] = {}
        for name, e in evals.items():
            self.summary["success_by_client"][name][str(round_id)] = e["success_rate"]
            by_env.setdefault(e["env"], []).append(e)
        for env, es in by_env.items():
            self.summary["success_by_env"].setdefault(env, {})[str(round_id)] = _micro_average(es)
        self.summary["micro_avg"][str(round_id)] = _micro_average(list(evals.values()))

    def _evaluate_all(self, round_id: int, state_for) -> dict[str, dict[str, Any]]:
        return {inst.name: inst.evaluate(state_for(inst), self.progress, label=f"evaluate r{round_id}")
                for inst in self.institutions}

    def _should_evaluate(self, round_id: int) -> bool:
        return self.config.evaluation.every_round or round_id == self.config.federation.rounds

    def _initial_evaluation(self) -> None:
        if not self.config.evaluation.include_initial:
            return
        evals = self._evaluate_all(0, lambda _i: self.initial_state)
        self.run.append_metrics([{"round": 0, "client": n, **e} for n, e in evals.items()])
        self._record_eval(0, evals)
        self.run.write_summary(self.summary)

    # ------------------------------------------------------------------------------------------------------------
    def _run_federated(self) -> None:
        from fedse_secure.federation.coordinator import Coordinator
        from fedse_secure.secagg.base import RoundAbortedError
        from fedse_secure.secagg.factory import build_aggregator

        cfg = self.config
        aggregator = build_aggregator(cfg)
        coordinator = Coordinator(self.rule, self.initial_state)
        self._initial_evaluation()
        rounds = self.progress.task("federated rounds", total=cfg.federation.rounds)
        for _ in range(cfg.federation.rounds):
            t_round = time.perf_counter()
            start = coordinator.begin_round()
            r = start.round_id
            results = {}
            for inst in self.institutions:
                results[inst.name] = inst.local_round(r, start.global_state, self.progress)
            agg_bar = self.progress.task(f"secure aggregation ({aggregator.name})", total=None)
            t_agg = time.perf_counter()
            try:
                aggregate = aggregator.aggregate(r, {n: res.payload for n, res in results.items()})
            except RoundAbortedError as err:
                coordinator.abandon_round()
                agg_bar.close()
                self.progress.log(f"round {r} abandoned: {err}")
                self.summary["aborted_rounds"].append({"round": r, "reason": str(err)})
                self.run.append_metrics([{**res.metrics, "round_status": "aborted"} for res in results.values()])
                rounds.advance(1)
                continue
            agg_s = time.perf_counter() - t_agg
            agg_bar.close()
            outcome = coordinator.complete_round(aggregate)
            self.run.save_adapter(round_label(r), outcome.global_state, self.peft_config)
            evals = self._evaluate_all(r, lambda _i: outcome.global_state) if self._should_evaluate(r) else {}
            round_s = time.perf_counter() - t_round
            records = []
            for name, res in results.items():
                rec = {**res.metrics, "round_status": "completed", "survivor": name in outcome.survivors,
                       "aggregation_s": agg_s, "round_s": round_s,
                       **{f"secagg_{k}": v for k, v in outcome.measurements.items()}}
                if name in evals:
                    rec.update(evals[name])
                records.append(rec)
            self.run.append_metrics(records)
            if evals:
                self._record_eval(r, evals)
            self.summary["rounds_completed"] = r
            self.summary["final_adapter"] = str(self.run.save_adapter("final", outcome.global_state, self.peft_config)
                                                .relative_to(self.run.path))
            self._record_privacy()
            self.run.write_summary(self.summary)
            rounds.advance(1)
        rounds.close()

    def _record_privacy(self) -> None:
        if self.config.privacy.mode == "none":
            return
        self.summary["epsilon_spent"] = {inst.name: inst.epsilon_spent() for inst in self.institutions}
        # Sealed ledger heads recorded outside each institution's folder, so `fedse privacy verify --expect-head`
        # can catch a ledger rewritten together with its head file.
        from fedse_secure.privacy import PrivacyLedger

        self.summary["ledger_heads"] = {inst.name: PrivacyLedger(inst.ledger_path).head_hash()
                                        for inst in self.institutions if inst.ledger_path.exists()}

    def _run_local(self) -> None:
        """Each institution trains its own adapter on its static demonstrations; nothing is aggregated."""
        cfg = self.config
        states = {inst.name: OrderedDict(self.initial_state) for inst in self.institutions}
        self._initial_evaluation()
        for r in range(1, cfg.federation.rounds + 1):
            records, evals = [], {}
            for inst in self.institutions:
                res = inst.local_round(r, states[inst.name], self.progress)
                states[inst.name] = self.agent.adapter_state()
                self.run.save_adapter(round_label(r), states[inst.name], self.peft_config, client=inst.name)
                if self._should_evaluate(r):
                    evals[inst.name] = inst.evaluate(states[inst.name], self.progress, label=f"evaluate r{r}")
                records.append({**res.metrics, **evals.get(inst.name, {})})
            self.run.append_metrics(records)
            if evals:
                self._record_eval(r, evals)
            self.summary["rounds_completed"] = r
            self.summary["final_adapter"] = {
                inst.name: str(self.run.save_adapter("final", states[inst.name], self.peft_config, client=inst.name)
                               .relative_to(self.run.path)) for inst in self.institutions}
            self.run.write_summary(self.summary)

    def _run_centralized(self) -> None:
        """All demonstrations pooled into one training set (the paper's non-private reference point)."""
        from fedse_secure.agent.sft import encode_for_experiment, train_lora
        from fedse_secure.federation.institution import derive_seed

        cfg = self.config
        pooled = [t for inst in self.institutions for t in inst.buffer]
        tok = self.agent.tokenizer
        examples = encode_for_experiment(tok, pooled, cfg)
        state = self.initial_state
        self._initial_evaluation()
        for r in range(1, cfg.federation.rounds + 1):
            self.agent.load_adapter_state(state)
            bar = self.progress.task("centralized: train", total=None)
            stats = train_lora(self.agent.model, examples, cfg.training, tok.pad_token_id, derive_seed(cfg.seed, "central", r),
                               on_step=lambda s, total, loss: bar.update(completed=s, total=total, info=f"loss {loss:.3f}"))
            bar.close()
            state = self.agent.adapter_state()
            self.run.save_adapter(round_label(r), state, self.peft_config)
            evals = self._evaluate_all(r, lambda _i: state) if self._should_evaluate(r) else {}
            self.run.append_metrics([{"round": r, "client": n, "train_examples": len(examples),
                                      "train_steps": stats.steps, "train_loss": stats.mean_loss, **e}
                                     for n, e in evals.items()])
            if evals:
                self._record_eval(r, evals)
            self.summary["rounds_completed"] = r
            self.summary["final_adapter"] = str(self.run.save_adapter("final", state, self.peft_config).relative_to(self.run.path))
            self.run.write_summary(self.summary)

    def _run_pretrained(self) -> None:
        evals = self._evaluate_all(1, lambda _i: self.initial_state)
        self.run.append_metrics([{"round": 1, "client": n, **e} for n, e in evals.items()])
        self._record_eval(1, evals)
        self.summary["rounds_completed"] = 1
        self.summary["final_adapter"] = str(self.run.save_adapter("final", self.initial_state, self.peft_config)
                                            .relative_to(self.run.path))


def simulate(config: ExperimentConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
             progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Run a whole experiment in-process and return its summary (also written to ``summary.json``)."""
    return Simulation(config, out_dir, overwrite=overwrite, progress=progress).run_all()
