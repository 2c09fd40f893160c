"""One institution's side of a Fed-SE round, free of any transport.

``Institution.local_round`` is the whole of the paper's local step: reset to the global adapter, explore with
it (temperature 1.0), keep the successes, grow the buffer seeded with expert demonstrations, fine-tune the
LoRA adapter on the buffer (optionally with DP-SGD), and return the *payload* that goes into secure
aggregation. Both the in-process simulation and the Flower client app call exactly this.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedse_secure.agent.buffer import ExperienceBuffer
from fedse_secure.agent.policy import AgentModel
from fedse_secure.agent.rollout import RolloutSettings, run_episodes
from fedse_secure.agent.sft import encode_for_experiment, freeze_matching, train_lora
from fedse_secure.aggregation.rules import AggregationRule
from fedse_secure.config import ClientConfig, ExperimentConfig
from fedse_secure.federation.progress import NULL_PROGRESS, Progress


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any labels (Python's hash() is salted per process, so it can't be used)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class LocalRoundResult:
    institution: str
    round_id: int
    #: Flat vector for secure aggregation (the rule's payload; DP noise already added for client-level DP).
    payload: np.ndarray
    weight: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Institution:
    def __init__(
        self,
        experiment: ExperimentConfig,
        client: ClientConfig,
        workdir: str | Path,
        agent: AgentModel,
        rule: AggregationRule,
        num_clients: int,
        ledger_path: str | Path | None = None,
    ):
        from fedse_secure.envs import make_env

        self.experiment = experiment
        self.client = client
        self.name = client.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.agent = agent
        self.rule = rule
        self.num_clients = num_clients
        self._env_options = dict(client.env_options)
        self._make_env = lambda: make_env(client.env, **self._env_options)
        probe = self._make_env()
        self.env_name = probe.name
        self.max_turns = experiment.exploration.max_turns or probe.max_turns
        self.train_ids = list(probe.train_task_ids())
        self.test_ids = list(probe.test_task_ids())
        self.buffer = ExperienceBuffer(self.workdir / "buffer.jsonl")
        # A deployment may keep the ledger where its compliance office reads it, outside the data folder.
        self.ledger_path = Path(ledger_path) if ledger_path else self.workdir / "privacy_ledger.jsonl"
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)

    # -- seed data ---------------------------------------------------------------------------------------------
    def seed_buffer(self) -> int:
        """Fill the buffer with expert demonstrations once (the paper's AgentTraj share for this environment)."""
        if self.buffer.items(source="expert") or self.client.seed_demos == 0:
            return 0
        from fedse_secure.envs import generate_demonstrations

        rng = random.Random(derive_seed(self.experiment.seed, self.name, "demos"))
        pool = list(self.train_ids)
        rng.shuffle(pool)
        demos = []
        # Oracles solve (nearly) every task, but keep drawing until enough successful demonstrations exist.
        for start in range(0, len(pool), self.client.seed_demos):
            need = self.client.seed_demos - len(demos)
            if need <= 0:
                break
            demos.extend(generate_demonstrations(self.client.env, pool[start : start + need], **self._env_options))
        if self.experiment.exploration.action_mode == "score":
            from fedse_secure.agent.rollout import as_score_format

            # Score mode ranks "Thought: \nAction: <a>"; training on full thoughts would score the model on a
            # context it never saw.
            demos = [as_score_format(d) for d in demos]
        return self.buffer.add(demos[: self.client.seed_demos])

    # -- the local round ---------------------------------------------------------------------------------------
    def local_round(self, round_id: int, global_state, progress: Progress = NULL_PROGRESS) -> LocalRoundResult:
        exp = self.experiment
        timings: dict[str, float] = {}
        metrics: dict[str, Any] = {"round": round_id, "client": self.name, "env": self.env_name}
        if exp.privacy.mode == "client-dp":
            from fedse_secure.privacy import client_event

            self._ensure_affordable(client_event(exp.privacy, self.num_clients))
        self.agent.load_adapter_state(global_state)

        # 1. explore with the current global adapter
        t0 = time.perf_counter()
        explored = []
        episodes = exp.exploration.episodes_per_round if exp.federation.mode == "fedse" else 0
        if episodes:
            rng = random.Random(derive_seed(exp.seed, self.name, "explore", round_id))
            tasks = rng.sample(self.train_ids, episodes) if episodes <= len(self.train_ids) else [
                rng.choice(self.train_ids) for _ in range(episodes)
            ]
            bar = progress.task(f"{self.name}: explore", total=episodes)
            explored, rstats = run_episodes(
                self.agent.model, self.agent.tokenizer, self._make_env, tasks,
                RolloutSettings(
                    max_turns=self.max_turns, max_new_tokens=exp.exploration.max_new_tokens,
                    temperature=exp.exploration.temperature, greedy=False, batch_size=exp.exploration.batch_size,
                    max_context_tokens=exp.model.max_context_tokens, action_mode=exp.exploration.action_mode,
                    history_turns=exp.model.history_turns,
                ),
                round_id=round_id, seed=derive_seed(exp.seed, self.name, "sample", round_id),
                on_episode=lambda _t: bar.advance(1),
            )
            bar.close()
            metrics.update(agent_steps=rstats.agent_steps, generated_tokens=rstats.generated_tokens)
        timings["explore_s"] = time.perf_counter() - t0

        # 2. filter (success == 1 only, as the paper) and grow the buffer
        successes = [t for t in explored if t.success]
        kept = successes if exp.exploration.filter_success else explored
        added = self.buffer.add(kept)
        metrics.update(
            explored=len(explored), explore_success_rate=(len(successes) / len(explored)) if explored else None,
            kept=len(kept), added_to_buffer=added, buffer_size=len(self.buffer),
        )

        # 3. fine-tune on the buffer (or on this round's new trajectories only: the "w/o History" ablation)
        if exp.exploration.keep_history:
            train_set = list(self.buffer)
        else:
            train_set = [t for t in kept] or self.buffer.items(source="expert")
        t0 = time.perf_counter()
        train_metrics = self._train(round_id, train_set, progress)
        metrics.update(train_metrics)
        timings["train_s"] = time.perf_counter() - t0

        # 4. the payload for secure aggregation
        local_state = self.agent.adapter_state()
        # The paper's weighted ablation weights by the number of successful trajectories trained on.
        weight = float(max(1, sum(1 for t in train_set if t.success)))
        payload = self.rule.client_payload(local_state, global_state, weight)
        if exp.privacy.mode == "client-dp":
            payload, dp_metrics = self._client_level_dp(round_id, payload)
            metrics.update(dp_metrics)
        metrics["payload_values"] = int(payload.size)
        metrics.update(timings)
        return LocalRoundResult(self.name, round_id, payload, weight, metrics)

    def _train(self, round_id: int, train_set, progress: Progress) -> dict[str, Any]:
        exp = self.experiment
        tok = self.agent.tokenizer
        examples = encode_for_experiment(tok, train_set, exp)
        model = self.agent.model
        frozen = freeze_matching(model, self.rule.frozen_pattern)
        seed = derive_seed(exp.seed, self.name, "train", round_id)
        try:
            if exp.privacy.mode == "dp-sgd":
                return self._train_dp_sgd(round_id, examples, seed, progress)
            bar = progress.task(f"{self.name}: train", total=None)
            stats = train_lora(
                model, examples, exp.training, tok.pad_token_id, seed,
                on_step=lambda s, total, loss: bar.update(completed=s, total=total, info=f"loss {loss:.3f}"),
            )
            bar.close()
            return {"train_examples": len(examples), "train_steps": stats.steps, "train_loss": stats.mean_loss,
                    "train_target_tokens": stats.target_tokens}
        finally:
            for name, p in model.named_parameters():
                if name in frozen:
                    p.requires_grad_(True)

    def _ledger(self):
        from fedse_secure.privacy import PrivacyLedger

        return PrivacyLedger(self.ledger_path)

    def _ensure_affordable(self, projected_event) -> None:
        """Refuse the round before any training if it would exceed this institution's budget (fail closed)."""
        from fedse_secure.privacy import BudgetGuard

        BudgetGuard(self._ledger(), self.experiment.privacy, institution=self.name).ensure_affordable(projected_event)

    def _train_dp_sgd(self, round_id: int, examples, seed: int, progress: Progress) -> dict[str, Any]:
        from fedse_secure.privacy import project_event, train_dp_sgd

        exp = self.experiment
        if not examples:
            # Nothing to train on: no release of private data, so no privacy is spent and nothing is recorded.
            return {"train_examples": 0, "train_steps": 0, "train_loss": None, "dp_mechanism": "dp-sgd",
                    "dp_epsilon_spent": self.epsilon_spent()}
        self._ensure_affordable(project_event(len(examples), exp.training, exp.privacy))
        bar = progress.task(f"{self.name}: DP-SGD train", total=None)
        self.agent.model.train()
        try:
            result = train_dp_sgd(self.agent.model, examples, exp.training, exp.privacy,
                                  self.agent.tokenizer.pad_token_id, seed)
        finally:
            self.agent.model.eval()
        bar.close()
        self._ledger().append(result.event, round=round_id, institution=self.name)
        return {
            "train_examples": len(examples), "train_steps": result.steps, "train_loss": result.mean_loss,
            "dp_mechanism": "dp-sgd", "dp_sample_rate": result.sample_rate,
            "dp_noise_multiplier": exp.privacy.noise_multiplier, "dp_epsilon_spent": self.epsilon_spent(),
        }

    def _client_level_dp(self, round_id: int, payload: np.ndarray):
        from fedse_secure.privacy import privatize_update

        exp = self.experiment
        # The noise share must be unpredictable to everyone else (whoever can regenerate it can subtract it from
        # the sum), so it comes from OS entropy, never from the experiment seed.
        noisy, info = privatize_update(payload, exp.privacy, self.guaranteed_contributors(), np.random.default_rng())
        clip = exp.federation.secagg.clip_range
        if exp.federation.secure_aggregation != "none" and info.max_abs_value > clip:
            raise ValueError(
                f"{self.name}: the noised update reaches {info.max_abs_value:.3g}, outside the secure-aggregation "
                f"clip range {clip:g}, so clipping it would change the noise the ledger records; raise "
                f"federation.secagg.clip_range or lower privacy.max_grad_norm"
            )
        self._ledger().append(info.event, round=round_id, institution=self.name)
        return noisy, {"dp_mechanism": "client-dp", "dp_clip_norm": exp.privacy.max_grad_norm,
                       "dp_update_norm": info.original_norm, "dp_clipped": info.clipped,
                       "dp_noise_std": info.noise_std, "dp_epsilon_spent": self.epsilon_spent()}

    def guaranteed_contributors(self) -> int:
        """How many institutions' noise shares are sure to be in a released sum.

        Client-level noise is split into shares; if dropouts thinned the shares, the sum would carry less noise
        than the ledger records. A masking round is released only when at least t survive, CrypTen and the
        plaintext path need everyone, so the shares are sized for that minimum.
        """
        fed = self.experiment.federation
        n = self.num_clients
        if fed.secure_aggregation != "masking":
            return n
        from fedse_secure.secagg.masking.graph import default_threshold, resolve_degree

        t = fed.secagg.threshold or default_threshold(resolve_degree(n, fed.secagg.neighbours) + 1)
        return min(n, t)

    def epsilon_spent(self) -> float | None:
        """ε spent so far by this institution (the configured accountant over its ledger's events)."""
        if self.experiment.privacy.mode == "none":
            return None
        from fedse_secure.privacy import epsilon

        events = self._ledger().events()
        return float(epsilon(events, self.experiment.privacy.delta, self.experiment.privacy.accountant)) if events else 0.0

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, state, progress: Progress = NULL_PROGRESS, label: str = "evaluate") -> dict[str, Any]:
        """Greedy success rate of ``state`` on this environment's held-out test tasks (as AgentGym evaluates)."""
        exp = self.experiment
        self.agent.load_adapter_state(state)
        ids = self.test_ids[: exp.evaluation.test_tasks] if exp.evaluation.test_tasks else self.test_ids
        bar = progress.task(f"{self.name}: {label}", total=len(ids))
        t0 = time.perf_counter()
        trajectories, stats = run_episodes(
            self.agent.model, self.agent.tokenizer, self._make_env, ids,
            RolloutSettings(
                max_turns=self.max_turns, max_new_tokens=exp.evaluation.max_new_tokens, greedy=True,
                batch_size=exp.evaluation.batch_size, max_context_tokens=exp.model.max_context_tokens,
                action_mode=exp.exploration.action_mode, history_turns=exp.model.history_turns,
            ),
            seed=derive_seed(exp.seed, self.name, "eval"), on_episode=lambda _t: bar.advance(1),
        )
        bar.close()
        wins = sum(t.success for t in trajectories)
        return {"env": self.env_name, "test_tasks": len(ids), "successes": wins,
                "success_rate": wins / len(ids) if ids else None, "eval_s": time.perf_counter() - t0,
                "eval_agent_steps": stats.agent_steps}
