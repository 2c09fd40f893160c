"""One institution's side of a Fed-SE round, free of any transport.

:meth:`Institution.local_round` is the paper's local step: explore with the current global adapter
(temperature 1.0), keep the successes in a buffer seeded with expert demonstrations, fine-tune the LoRA
adapter on the buffer, and hand over the payload for secure aggregation. Everything privacy-specific (budget,
DP-SGD, client-level noise, the ledger) is the institution's :class:`~fedse_secure.privacy.mechanisms.PrivacyMechanism`;
what secure aggregation promises is given as :class:`~fedse_secure.privacy.mechanisms.ReleaseTerms`.
The in-process simulation and a deployed institution both reach it through
:class:`~fedse_secure.federation.endpoint.InstitutionEndpoint`.
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
from fedse_secure.agent.sft import encode_for_experiment, freeze_matching
from fedse_secure.aggregation.rules import get_rule
from fedse_secure.config import ClientConfig, ExperimentConfig
from fedse_secure.envs import ENVIRONMENTS, generate_demonstrations
from fedse_secure.federation.progress import NULL_PROGRESS, Progress
from fedse_secure.privacy.mechanisms import MECHANISMS, ReleaseTerms


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any labels (Python's hash() is salted per process, so it can't be used)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def release_terms(experiment: ExperimentConfig) -> ReleaseTerms:
    """What the experiment's secure-aggregation backend promises about a released sum."""
    backend = experiment.federation.backend()
    return ReleaseTerms(backend.min_contributors(len(experiment.clients)), backend.value_bound)


@dataclass
class LocalRound:
    #: Flat vector for secure aggregation (the rule's payload, after the privacy mechanism's release).
    payload: np.ndarray
    #: What the institution reports about its round (nested by layer: explore, train, privacy, timing).
    report: dict[str, Any] = field(default_factory=dict)


class Institution:
    def __init__(
        self,
        experiment: ExperimentConfig,
        client: ClientConfig,
        workdir: str | Path,
        agent: AgentModel,
        terms: ReleaseTerms,
        ledger_path: str | Path | None = None,
    ):
        self.experiment = experiment
        self.client = client
        self.name = client.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.agent = agent
        self.rule = get_rule(experiment.federation.aggregation)
        spec, self._env_options = ENVIRONMENTS.get(client.env), dict(client.env_options)
        self._make_env = lambda: spec.make(**self._env_options)
        probe = self._make_env()
        self.env_name = probe.name
        self.max_turns = experiment.exploration.max_turns or probe.max_turns
        self.train_ids = list(probe.train_task_ids())
        self.test_ids = list(probe.test_task_ids())
        self._ceiling: tuple[list[int], float | None] | None = None  # (test ids, the oracle's success on them)
        self.buffer = ExperienceBuffer(self.workdir / "buffer.jsonl")
        # A deployment may keep the ledger where its compliance office reads it, outside the data folder.
        self.ledger_path = Path(ledger_path) if ledger_path else self.workdir / "privacy_ledger.jsonl"
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.privacy = MECHANISMS.get(experiment.privacy.mode)(experiment.privacy, self.ledger_path, self.name, terms)

    # -- seed data ---------------------------------------------------------------------------------------------
    def seed_buffer(self) -> int:
        """Fill the buffer with expert demonstrations once (the paper's AgentTraj share for this environment)."""
        if self.buffer.items(source="expert") or self.client.seed_demos == 0:
            return 0
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

            # Score mode ranks an empty thought and the action; training on full thoughts would score the model on a
            # context it never saw.
            demos = [as_score_format(d) for d in demos]
        return self.buffer.add(demos[: self.client.seed_demos])

    # -- the local round ---------------------------------------------------------------------------------------
    def local_round(self, round_id: int, global_state, progress: Progress = NULL_PROGRESS) -> LocalRound:
        """The paper's four local steps on the global adapter ``global_state``. The privacy mechanism holds the
        ledger for the whole round: order and budget are checked before any data is touched."""
        with self.privacy.round(round_id):
            self.agent.load_adapter_state(global_state)
            t0 = time.perf_counter()
            explored, explore = self.explore(round_id, progress)                   # 1. explore
            train_set, buffer = self.keep(explored)                                # 2. filter, grow the buffer
            t1 = time.perf_counter()
            train = self.train(round_id, train_set, progress)                      # 3. fine-tune
            t2 = time.perf_counter()
            # The paper's weighted ablation weights by the number of successful trajectories trained on.
            weight = float(max(1, sum(1 for t in train_set if t.success)))
            update = self.rule.client_payload(self.agent.adapter_state(), global_state, weight)
            payload, released = self.privacy.release(round_id, update)             # 4. the payload
            report = {
                "env": self.env_name, "explore": {**explore, **buffer}, "train": train,
                "privacy": {**self.privacy.report(), **released}, "payload_values": int(payload.size),
                "timing": {"explore_s": t1 - t0, "train_s": t2 - t1},
            }
        return LocalRound(payload, report)

    def explore(self, round_id: int, progress: Progress) -> tuple[list, dict[str, Any]]:
        """Episodes sampled with the current adapter at the exploration temperature (fedse only)."""
        exp = self.experiment
        episodes = exp.exploration.episodes_per_round if exp.federation.mode == "fedse" else 0
        if not episodes:
            return [], {"episodes": 0}
        rng = random.Random(derive_seed(exp.seed, self.name, "explore", round_id))
        tasks = rng.sample(self.train_ids, episodes) if episodes <= len(self.train_ids) else [
            rng.choice(self.train_ids) for _ in range(episodes)
        ]
        bar = progress.task(f"{self.name}: explore", total=episodes)
        explored, stats = run_episodes(
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
        wins = sum(1 for t in explored if t.success)
        return explored, {"episodes": len(explored), "successes": wins, "success_rate": wins / len(explored),
                          "agent_steps": stats.agent_steps, "generated_tokens": stats.generated_tokens}

    def keep(self, explored: list) -> tuple[list, dict[str, Any]]:
        """Keep the successes (success == 1 only, as the paper) and grow the buffer; the training set."""
        exp = self.experiment
        kept = [t for t in explored if t.success] if exp.exploration.filter_success else explored
        added = self.buffer.add(kept)
        # Without history (the "w/o History" ablation) only this round's trajectories are trained on.
        train_set = list(self.buffer) if exp.exploration.keep_history else (kept or self.buffer.items(source="expert"))
        return train_set, {"kept": len(kept), "added_to_buffer": added, "buffer_size": len(self.buffer)}

    def train(self, round_id: int, train_set: list, progress: Progress) -> dict[str, Any]:
        exp = self.experiment
        tok = self.agent.tokenizer
        examples = encode_for_experiment(tok, train_set, exp)
        model = self.agent.model
        frozen = freeze_matching(model, self.rule.frozen_pattern)
        try:
            return self.privacy.train(round_id, model, examples, exp.training, tok.pad_token_id,
                                      derive_seed(exp.seed, self.name, "train", round_id), progress, self.name)
        finally:
            for name, p in model.named_parameters():
                if name in frozen:
                    p.requires_grad_(True)

    # -- evaluation --------------------------------------------------------------------------------------------
    def evaluation_ids(self) -> list[int]:
        """This institution's share of the environment's test tasks (all of them when it is alone on it).

        Institutions that share an environment and evaluate one shared adapter split its test tasks: the
        environment's figure is then over each task once, at 1/k of the cost for each of k of them. Local
        institutions each evaluate their own adapter on every task, and so does each when there are fewer tasks
        than institutions.
        """
        exp = self.experiment
        ids = self.test_ids[: exp.evaluation.test_tasks] if exp.evaluation.test_tasks else self.test_ids
        peers = [c.name for c in exp.clients if c.env == self.client.env]
        if exp.federation.mode == "local" or self.name not in peers or len(ids) < len(peers):
            return ids
        return ids[peers.index(self.name) :: len(peers)]

    def evaluate(self, state, progress: Progress = NULL_PROGRESS, label: str = "evaluate") -> dict[str, Any]:
        """Greedy success rate of ``state`` on this environment's held-out test tasks (as AgentGym evaluates)."""
        exp = self.experiment
        self.agent.load_adapter_state(state)
        ids = self.evaluation_ids()
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
                "success_rate": wins / len(ids) if ids else None, "seconds": time.perf_counter() - t0,
                "agent_steps": stats.agent_steps, "oracle_success_rate": self.oracle_ceiling(ids)}

    def oracle_ceiling(self, ids: list[int]) -> float | None:
        """The expert oracle's success on these test tasks at this run's turn limit: the ceiling to read the
        agent's success against (test sets are not filtered by what the oracle can do). None without an oracle
        (a remote AgentGym server). Computed once per run."""
        if self._ceiling is None or self._ceiling[0] != ids:
            from fedse_secure.envs.check import oracle_success

            if ENVIRONMENTS.get(self.client.env).oracle_class is None or not ids:
                value = None
            else:
                options = {k: v for k, v in self._env_options.items() if k != "max_turns"}
                value = oracle_success(self.client.env, ids, options, self.max_turns)["oracle_success"]
            self._ceiling = (list(ids), value)
        return self._ceiling[1]
