"""The run folder and its typed records: everything a run produces, written so that a crash or Ctrl-C leaves
it consistent, in the same form whether the run was simulated in one process or deployed over Flower.

Layout::

    RUN/
      config.yaml            the resolved configuration (written first, atomically)
      metrics.jsonl          one RoundRecord per line (round 0 = the initial evaluation), appended + fsynced
      adapters/round-001/    the global adapter after each round (peft format, written to a temp folder + rename)
      adapters/final/        the last global adapter (or adapters/<client>/... in the "local" baseline)
      institutions/<name>/   each institution's private state in a simulation (buffer.jsonl, privacy_ledger.jsonl,
                             audit.jsonl, identity_ed25519.pem)
      registry.json          a simulation's institution identity public keys (round attestations verify against it)
      coordinator_identity.pem/.pub  a simulation's adapter-signing key pair (a resumed run signs with the same one)
      summary.json           the RunSummary, rewritten atomically after every round and at the end
      .fedse-run             the marker: this folder was created by fedse (only such a folder is ever overwritten)
      .fedse-lock            held (flock) by the process writing the run: a dead run shows as ``interrupted``
      ledger-archive/        privacy ledgers and audit logs of runs this folder held before an ``--overwrite``
                             (never deleted)

A :class:`RoundRecord` nests its measurements by layer, in the style of TFF's ``MeasuredProcessOutput``:
``secure_aggregation`` (what the backend measured), ``timing``, and per institution its own report
(``explore``, ``train``, ``privacy``, ``timing``) and ``evaluation``. The :class:`RunSummary` is derived from
the records (:meth:`RunSummary.add_round`); ``fedse report`` reads it.

A round counts once its record is in ``metrics.jsonl``: a resumed run (``fedse simulate --resume``) continues
after the last completed round recorded there, and discards what an unrecorded round left behind (its adapter
folders; its buffer lines are kept aside in ``buffer.unrecorded.jsonl``). Privacy ledgers are never rolled back:
an event of an unrecorded round still counts against the budget.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from pydantic import StringConstraints

from fedse_secure.config import ExperimentConfig
from fedse_secure.errors import FedseError
from fedse_secure.io_utils import (
    CorruptFileError,
    StorageError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    is_ledger_or_audit_log,
    read_jsonl,
)
#: Written when fedse creates a run folder; only a folder holding it is ever overwritten.
MARKER = ".fedse-run"
LOCK = ".fedse-lock"
LEDGER_ARCHIVE = "ledger-archive"
#: A round number as a JSON object key: readers (``fedse report``) sort and plot rounds as integers.
RoundKey = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]
#: What fedse writes at the top of a run folder; anything else there is the user's and blocks an overwrite.
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "summary.json", "adapters", "institutions", "events.jsonl",
                         "success_per_round.png", "registry.json", "coordinator_identity.pem",
                         "coordinator_identity.pub", MARKER, LOCK, LEDGER_ARCHIVE})
#: Statuses of a run that no longer runs; "running" with no live process becomes "interrupted" when read.
FINAL_STATUSES = ("completed", "failed", "interrupted", "budget_exhausted")


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
        """A record read back from metrics.jsonl; :class:`CorruptFileError` if it does not have the right types."""
        return _typed(cls, data, "metrics.jsonl record")


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
    success_by_client: dict[str, dict[RoundKey, float | None]] = field(default_factory=dict)
    success_by_env: dict[str, dict[RoundKey, float | None]] = field(default_factory=dict)
    micro_avg: dict[RoundKey, float | None] = field(default_factory=dict)
    aborted_rounds: list[dict[str, Any]] = field(default_factory=list)
    round_s: dict[RoundKey, float] = field(default_factory=dict)
    final_adapter: str | dict[str, str] | None = None
    epsilon_spent: dict[str, float | None] = field(default_factory=dict)
    ledger_heads: dict[str, str] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None
    #: Each ``fedse simulate --resume``: when, and after which completed round.
    resumes: list[dict[str, Any]] = field(default_factory=list)

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
        missing = [k for k in ("name", "mode") if k not in data]
        if missing:
            raise RunFolderError(f"summary.json lacks {missing}; it was not written by this version of fedse")
        return _typed(cls, data, "summary.json")


def _typed(cls, data: Any, what: str):
    """``cls`` (a dataclass) from JSON data, every field checked against its type (pydantic, lax: 3 == 3.0)."""
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(data, dict):
        raise CorruptFileError(f"{what} is not a JSON object; the run folder is damaged")
    known = {f.name for f in fields(cls)}
    try:
        return TypeAdapter(cls).validate_python({k: v for k, v in data.items() if k in known})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CorruptFileError(f"{what}: {where}: {first['msg'].lower()}; the run folder is damaged (was the file "
                               "edited?): restore it from a backup") from None


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

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    def is_run_folder(self) -> bool:
        """Created by fedse (the marker), so fedse may resume or overwrite it."""
        return self.marker_path.is_file()

    def create(self, config: ExperimentConfig, overwrite: bool = False) -> RunFolder:
        """A new run folder for ``config``: an empty or missing folder, or (``overwrite``) a run folder fedse
        created, emptied first (its privacy ledgers are moved to ``ledger-archive/``, never deleted)."""
        with self._bad_path_refused():
            return self._create(config, overwrite)

    def check_creatable(self, overwrite: bool = False) -> None:
        """Refuse (one line, nothing touched) what :meth:`create` would refuse, so that a run stops before it
        loads a model rather than after."""
        with self._bad_path_refused():
            self._check_creatable(overwrite)

    @contextlib.contextmanager
    def _bad_path_refused(self):
        """An OSError that says the path itself is unusable becomes the one-line RunFolderError naming the fix."""
        try:
            yield
        except OSError as err:
            if isinstance(err, StorageError) or err.errno not in _BAD_PATH:
                raise
            from fedse_secure.io_utils import storage_error

            raise RunFolderError(str(storage_error(self.path, err, "create the run folder"))) from None

    def _check_creatable(self, overwrite: bool) -> None:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise RunFolderError(f"{self.path} is a file, not a folder; choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                hint = (f"continue it with `fedse simulate --resume {self.path}`, replace it with --overwrite, "
                        "or choose another --out") if self.is_run_folder() else "choose another --out"
                raise RunFolderError(f"{self.path} already exists and is not empty; {hint}")
            self._check_overwrite()
            return
        # The folder will be made inside the nearest one that exists: it must be a folder this process can write.
        existing = next(p for p in [self.path, *self.path.parents] if p.exists() or p.is_symlink())
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(existing))

    def _create(self, config: ExperimentConfig, overwrite: bool) -> RunFolder:
        self._check_creatable(overwrite)
        if self.path.exists() and any(self.path.iterdir()):
            self._clear_for_overwrite()
        # The topmost folder this call creates: removed again if the run folder cannot be written at all.
        first_new = next((p for p in [*reversed(self.path.parents), self.path] if not p.exists()), None)
        try:
            ensure_dir(self.path)
            atomic_write_json(self.marker_path, {"created_by": f"fedse-secure {_version()}",
                                                 "created": _utc_now()})
            atomic_write_text(self.path / "config.yaml", config.to_yaml())
        except StorageError as err:
            if first_new is not None and first_new.is_dir():
                shutil.rmtree(first_new, ignore_errors=True)
            if err.errno in _BAD_PATH:
                raise RunFolderError(f"{err}") from None
            raise
        return self

    def _check_overwrite(self) -> None:
        """Refuse ``--overwrite`` (nothing is removed) where emptying this folder is not safe."""
        where = self.path.resolve()
        cwd = Path.cwd().resolve()
        if where == cwd or where in cwd.parents:
            raise RunFolderError(f"{self.path} is the working folder or one of its parents; --overwrite never removes "
                                 "it: choose a run folder below it (e.g. --out runs/NAME)")
        if not self.is_run_folder():
            raise RunFolderError(f"{self.path} was not created by fedse (it has no {MARKER} marker), so --overwrite "
                                 "will not remove it; choose another --out")
        foreign = sorted(p.name for p in self.path.iterdir()
                         if p.name not in RUN_ENTRIES and not (p.name.startswith(".") and ".tmp" in p.name))
        if foreign:
            raise RunFolderError(f"{self.path} holds files fedse did not write ({', '.join(foreign[:5])}); move them "
                                 "out first or choose another --out, --overwrite removes only a run's own files")
        self._refuse_if_active("overwrite")

    def _clear_for_overwrite(self) -> None:
        """Empty a run folder for ``--overwrite``; :meth:`_create` has run :meth:`_check_overwrite` just before."""
        archived = self._archive_ledgers()
        for entry in sorted(self.path.iterdir()):
            if entry.name in (LEDGER_ARCHIVE, MARKER, LOCK):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.archived_ledgers = archived

    def _archive_ledgers(self) -> list[Path]:
        """Move every privacy ledger and audit log (with their sealed heads) out of the way of an overwrite,
        keeping their paths."""
        ledgers = [p for p in self.path.rglob("*") if p.is_file() and LEDGER_ARCHIVE not in p.parts
                   and is_ledger_or_audit_log(p)]
        if not ledgers:
            return []
        dest_root = self.path / LEDGER_ARCHIVE / _utc_now().replace(":", "")
        moved = []
        for src in ledgers:
            dest = dest_root / src.relative_to(self.path)
            ensure_dir(dest.parent)
            os.replace(src, dest)
            moved.append(dest)
        return moved

    # -- the lock: which process writes this run --------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def acquire(self) -> None:
        """Mark this process as the one writing the run (released when it exits, however it exits)."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            from fedse_secure.io_utils import storage_error

            raise storage_error(self.lock_path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another fedse process ({self._holder()}); wait for it to "
                                 "finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _utc_now()}).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def is_active(self) -> bool:
        """Is a live process writing this run right now?"""
        if getattr(self, "_lock_fd", None) is not None:
            return True
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def _holder(self) -> str:
        try:
            info = json.loads(self.lock_path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown process"

    def _refuse_if_active(self, action: str) -> None:
        if self.is_active():
            raise RunFolderError(f"cannot {action} {self.path}: a fedse process is still writing it "
                                 f"({self._holder()}); wait for it to finish or stop it first")

    def institution_dir(self, name: str) -> Path:
        return ensure_dir(self.path / "institutions" / name)

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
        from fedse_secure.models.adapters import save_adapter

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
        """The run's summary; a run whose process died without recording its end reads as ``interrupted``."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder; pass the --out folder of a `fedse simulate` run")
        if not self.summary_path.is_file():
            raise RunFolderError(f"{self.path}: no summary.json; is this a run folder written by fedse?")
        try:
            data = json.loads(self.summary_path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else type(err).__name__
            raise RunFolderError(f"{self.summary_path}: unreadable ({reason}); the run folder is damaged: restore it "
                                 "from a backup") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.summary_path}: not a JSON object; the run folder is damaged")
        try:
            summary = RunSummary.from_dict(data)
        except CorruptFileError as err:
            raise RunFolderError(f"{self.summary_path}: {str(err).removeprefix('summary.json: ')}") from None
        if summary.status == "running" and not self.is_active():
            summary.status = "interrupted"
            summary.error = summary.error or "the process writing the run stopped before recording its end"
        return summary

    # -- resuming -------------------------------------------------------------------------------------------------
    def check_resumable(self) -> None:
        """Refuse (one line, nothing changed) unless this is a run folder that no live process is writing."""
        try:
            is_dir = self.path.is_dir()
        except OSError:  # a name too long for the file system, a loop of links
            is_dir = False
        if not is_dir:
            raise RunFolderError(f"{self.path}: no such run folder; pass the --out folder of an earlier "
                                 "`fedse simulate`")
        if not self.is_run_folder() or not (self.path / "config.yaml").is_file():
            raise RunFolderError(f"{self.path} is not a run folder created by fedse ({MARKER} or config.yaml is "
                                 "missing); pass the --out folder of an earlier `fedse simulate`")
        self._refuse_if_active("resume")

    def rebuild_summary(self, config: ExperimentConfig, transport: str) -> tuple[RunSummary, list[RoundRecord]]:
        """The summary as the recorded rounds make it (metrics.jsonl is the truth; summary.json may lag it)."""
        records = self.records()
        summary = RunSummary.start(config, transport)
        for record in records:
            summary.add_round(record)
        try:
            old = self.summary()
            summary.resumes = list(old.resumes)
        except FedseError:
            pass
        return summary, records

    def discard_unrecorded(self, completed: int, clients: list[str]) -> list[str]:
        """Remove what rounds after ``completed`` left without a record (adapter folders written before the
        crash), keep their buffer lines aside, and return a line per thing done."""
        done = []
        adapters = self.path / "adapters"
        for base in [adapters, *(adapters / c for c in clients)]:
            if not base.is_dir():
                continue
            for folder in sorted(base.glob("round-*")):
                try:
                    number = int(folder.name.removeprefix("round-"))
                except ValueError:
                    continue
                if number > completed:
                    shutil.rmtree(folder)
                    done.append(f"removed {folder.relative_to(self.path)} (round {number} was never recorded)")
            final = base / "final"
            if final.is_dir():
                latest = base / round_label(completed)
                if completed and latest.is_dir():
                    from fedse_secure.io_utils import atomic_folder

                    atomic_folder(final, lambda tmp, src=latest: [shutil.copy2(f, tmp / f.name) for f in src.iterdir()],
                                  replace=True)
                else:
                    shutil.rmtree(final)
        for name in clients:
            moved = _set_aside_buffer_lines(self.path / "institutions" / name / "buffer.jsonl", completed)
            if moved:
                done.append(f"{name}: {moved} buffer line(s) of unrecorded rounds kept aside in "
                            "buffer.unrecorded.jsonl")
        return done


def _set_aside_buffer_lines(buffer: Path, completed: int) -> int:
    """Move buffer lines of rounds after ``completed`` to ``buffer.unrecorded.jsonl`` (kept, not trained on)."""
    if not buffer.is_file():
        return 0
    rows = read_jsonl(buffer)
    is_later = [isinstance(r.get("round"), int) and r["round"] > completed for r in rows]
    later = [r for r, flag in zip(rows, is_later) if flag]
    if not later:
        return 0
    keep = [r for r, flag in zip(rows, is_later) if not flag]
    append_jsonl(buffer.with_name("buffer.unrecorded.jsonl"), later)
    atomic_write_text(buffer, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return len(later)


_BAD_PATH = {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR,
             errno.ELOOP}


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version() -> str:
    from fedse_secure import __version__

    return __version__


def round_label(round_id: int) -> str:
    return f"round-{round_id:03d}"
