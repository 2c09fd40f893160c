"""The run folder and its typed records: everything a run produces, written so that a crash or Ctrl-C leaves
it consistent, in the same form whether the run was simulated in one process or deployed over Flower.

Layout::

    RUN/
      config.yaml            the resolved configuration (written first, atomically)
      metrics.jsonl          one RoundRecord per line (round 0 = the initial evaluation), appended + fsynced
      adapters/round-001/    the global adapter after each round (peft format, written to a temp folder + rename)
      adapters/final/        the last global adapter (or adapters/<client>/... in the "local" baseline)
      institutions/<name>/   each institution's private state in a simulation (buffer.jsonl, privacy_ledger.jsonl)
      summary.json           the RunSummary, rewritten atomically after every round and at the end

A :class:`RoundRecord` nests its measurements by layer, in the style of TFF's ``MeasuredProcessOutput``:
``secure_aggregation`` (what the backend measured), ``timing``, and per institution its own report
(``explore``, ``train``, ``privacy``, ``timing``) and ``evaluation``. The :class:`RunSummary` is derived from
the records (:meth:`RunSummary.add_round`); ``fedse report`` reads it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedse_secure.config import ExperimentConfig
from fedse_secure.errors import FedseError
from fedse_secure.io_utils import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from fedse_secure.models.adapters import save_adapter

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")


class RunFolderError(FedseError, RuntimeError):
    pass


@dataclass
class InstitutionRecord:
    #: survivor / dropped (stopped answering) / refused (said no, with a reason) / not_asked / trained (the
    #: local baseline), or for an evaluation record: evaluated / not_evaluated
    status: str
    reason: str | None = None
    #: Why a refusing institution refused, as a kind (e.g. budget_exhausted); the reason is its own words.
    refusal: str | None = None
    #: What the institution reported about its local round (env, explore, train, privacy, timing).
    report: dict[str, Any] = field(default_factory=dict)
    #: Its evaluation of the round's global adapter, if one ran.
    evaluation: dict[str, Any] | None = None


@dataclass
class RoundRecord:
    round: int
    #: completed / aborted (nothing released) / evaluated (the evaluation of a completed round's adapter) /
    #: initial (round 0: the starting adapter, evaluated only)
    status: str
    participants: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reason: str | None = None
    #: SHA-256 of the released sum (float64 bytes): what the coordinator learned, for an auditor to match.
    released_sum_sha256: str | None = None
    #: The backend's name and everything it measured (bytes, stage times, values clipped, ...).
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    #: The centralized baseline's pooled training (institutions train in the federated and local modes).
    training: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    institutions: dict[str, InstitutionRecord] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        known = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in known})
        rec.institutions = {n: InstitutionRecord(**i) for n, i in rec.institutions.items()}
        return rec


@dataclass
class RunSummary:
    name: str
    mode: str
    #: "in-process" (fedse simulate) or "flower" (a deployment)
    transport: str = ""
    status: str = "running"
    seed: int = 0
    rounds_planned: int = 0
    rounds_completed: int = 0
    aggregation: str = ""
    secure_aggregation: str = ""
    privacy: str = "none"
    clients: dict[str, str] = field(default_factory=dict)
    #: client -> round -> success rate; env -> round -> micro-averaged success; round -> micro average
    success_by_client: dict[str, dict[str, float | None]] = field(default_factory=dict)
    success_by_env: dict[str, dict[str, float | None]] = field(default_factory=dict)
    micro_avg: dict[str, float | None] = field(default_factory=dict)
    aborted_rounds: list[dict[str, Any]] = field(default_factory=list)
    round_s: dict[str, float] = field(default_factory=dict)
    final_adapter: str | dict[str, str] | None = None
    epsilon_spent: dict[str, float | None] = field(default_factory=dict)
    ledger_heads: dict[str, str] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None

    @classmethod
    def start(cls, config: ExperimentConfig, transport: str) -> RunSummary:
        fed = config.federation
        return cls(
            name=config.name, mode=fed.mode, transport=transport, seed=config.seed,
            rounds_planned=fed.rounds if fed.mode != "pretrained" else 1, aggregation=fed.aggregation,
            secure_aggregation=fed.secure_aggregation.backend, privacy=config.privacy.mode,
            clients={c.name: c.env for c in config.clients}, success_by_client={c.name: {} for c in config.clients},
        )

    def add_round(self, record: RoundRecord) -> None:
        """Fold one round's record into the summary's tables."""
        r = str(record.round)
        if record.status == "aborted":
            self.aborted_rounds.append({"round": record.round, "reason": record.reason})
        elif record.status == "completed":
            self.rounds_completed = max(self.rounds_completed, record.round)
            if "round_s" in record.timing:
                self.round_s[r] = record.timing["round_s"]
        by_env: dict[str, list[dict[str, Any]]] = {}
        for name, inst in record.institutions.items():
            privacy = inst.report.get("privacy") or {}
            if "epsilon_spent" in privacy:
                self.epsilon_spent[name] = privacy["epsilon_spent"]
            if privacy.get("ledger_head"):
                self.ledger_heads[name] = privacy["ledger_head"]
            if inst.evaluation:
                self.success_by_client.setdefault(name, {})[r] = inst.evaluation["success_rate"]
                by_env.setdefault(inst.evaluation["env"], []).append(inst.evaluation)
        for env, evals in by_env.items():
            self.success_by_env.setdefault(env, {})[r] = _micro_average(evals)
        if by_env:
            self.micro_avg[r] = _micro_average([e for evals in by_env.values() for e in evals])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "mode") if k not in data]
        if missing:
            raise RunFolderError(f"summary.json lacks {missing}; it was not written by this version of fedse")
        return cls(**{k: v for k, v in data.items() if k in known})


def evaluation_record(round_id: int, evaluations: dict[str, dict[str, Any] | None],
                      reasons: dict[str, str] | None = None) -> RoundRecord:
    """The record of evaluating round ``round_id``'s adapter (round 0: the initial one); ``None`` for an
    institution that gave no evaluation (``reasons`` says why)."""
    record = RoundRecord(round=round_id, status="initial" if round_id == 0 else "evaluated",
                         participants=sorted(evaluations))
    for name, evaluation in sorted(evaluations.items()):
        record.institutions[name] = (
            InstitutionRecord(status="evaluated", evaluation=evaluation) if evaluation is not None
            else InstitutionRecord(status="not_evaluated", reason=(reasons or {}).get(name, "no evaluation received")))
    return record


def _micro_average(evals: list[dict[str, Any]]) -> float | None:
    tasks = sum(e["test_tasks"] for e in evals)
    return sum(e["successes"] for e in evals) / tasks if tasks else None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def create(self, config: ExperimentConfig, overwrite: bool = False) -> RunFolder:
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunFolderError(f"{self.path} already exists and is not empty; pass --overwrite or another --out")
            if not any((self.path / m).exists() for m in RUN_MARKERS):
                raise RunFolderError(f"{self.path} is not a fedse run folder; refusing to overwrite it")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config.to_yaml())
        return self

    def institution_dir(self, name: str) -> Path:
        d = self.path / "institutions" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def append_record(self, record: RoundRecord) -> None:
        append_jsonl(self.metrics_path, [record.to_dict()])

    def record(self, record: RoundRecord, summary: RunSummary) -> None:
        """Append a round's record, fold it into the summary and rewrite the summary (in that order)."""
        self.append_record(record)
        summary.add_round(record)
        self.write_summary(summary)

    def records(self) -> list[RoundRecord]:
        return [RoundRecord.from_dict(d) for d in read_jsonl(self.metrics_path)]

    def adapter_dir(self, label: str, client: str | None = None) -> Path:
        base = self.path / "adapters"
        return (base / client / label) if client else (base / label)

    def save_adapter(self, label: str, state, peft_config: dict, client: str | None = None) -> Path:
        return save_adapter(state, peft_config, self.adapter_dir(label, client))

    def remove_partial_writes(self) -> int:
        """Delete temporary folders/files of writes that an interruption cut short (they were never renamed
        into place, so nothing they held was ever part of the run)."""
        removed = 0
        for tmp in list(self.path.rglob(".*.tmp*")):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary_path, summary.to_dict())

    def summary(self) -> RunSummary:
        if not self.summary_path.is_file():
            raise RunFolderError(f"{self.path}: no summary.json; is this a run folder written by fedse?")
        try:
            data = json.loads(self.summary_path.read_text())
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{self.summary_path}: unreadable ({err}); the run folder is damaged") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.summary_path}: not a JSON object; the run folder is damaged")
        return RunSummary.from_dict(data)


def round_label(round_id: int) -> str:
    return f"round-{round_id:03d}"
