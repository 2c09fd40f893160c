"""The run folder: everything a run produces, written so that a crash or Ctrl-C leaves it consistent.

Layout::

    RUN/
      config.yaml            the resolved configuration (written first, atomically)
      metrics.jsonl          one JSON object per round per client, appended + fsynced after each round
      adapters/round-001/    the global adapter after each round (peft format, written to a temp folder + rename)
      adapters/final/        the last global adapter (or adapters/<client>/... in the "local" baseline)
      institutions/<name>/   each institution's private state (buffer.jsonl, privacy_ledger.jsonl)
      summary.json           written atomically at the end, and on interruption with status "interrupted"
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fedse_secure.aggregation.adapter_state import save_adapter
from fedse_secure.config import ExperimentConfig
from fedse_secure.io_utils import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")


class RunFolderError(RuntimeError):
    pass


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

    def append_metrics(self, records: list[dict[str, Any]]) -> None:
        stamp = time.time()
        append_jsonl(self.metrics_path, [{**r, "time": stamp} for r in records])

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

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

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)


def round_label(round_id: int) -> str:
    return f"round-{round_id:03d}"
