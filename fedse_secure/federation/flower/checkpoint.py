"""The coordinator's checkpoint: written after every completed round, read by ``fedse server start --resume``.

Layout (under ``state_dir/checkpoint``)::

    round-003/adapter.safetensors   the global adapter after round 3
    round-003/adapter_keys.json     its tensor order (the flat payload layout depends on it)
    round-003/meta.json             completed_rounds, experiment hash, per-round outcome history
    LATEST                          "round-003" (replaced atomically, last)

A round folder is written under a temporary name and renamed, and ``LATEST`` moves only afterwards, so a crash
at any point leaves the previous complete round readable. Older round folders are kept (nothing aggregated is
ever lost). What must survive a crash is only this: an unfinished secure-aggregation round is abandoned, not
resumed, because its secrets live in the institutions' memory; the resumed run repeats that round from the
checkpointed adapter with fresh keys and a fresh setup digest, so no message of the broken attempt is accepted.
Also kept: which institutions had stopped answering (so a resumed run does not wait out the training timeout
for a node Flower still lists as online).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedse_secure.errors import FedseError

FORMAT = 1


class CheckpointError(FedseError, RuntimeError):
    pass


@dataclass
class Checkpoint:
    completed_rounds: int
    global_state: Any  # OrderedDict[str, torch.Tensor]
    experiment_hash: str
    history: list[dict[str, Any]] = field(default_factory=list)
    # Institutions that stopped answering -> since when (epoch s); they are not asked again until they reconnect.
    unresponsive: dict[str, float] = field(default_factory=dict)


class CheckpointStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def latest_file(self) -> Path:
        return self.root / "LATEST"

    def exists(self) -> bool:
        return self.latest_file.is_file()

    def save(self, ckpt: Checkpoint) -> Path:
        from fedse_secure.io_utils import atomic_write_text
        from fedse_secure.models.adapters import state_to_bytes

        label = f"round-{ckpt.completed_rounds:03d}"
        final = self.root / label
        tmp = self.root / f".{label}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        data, order = state_to_bytes(ckpt.global_state)
        (tmp / "adapter.safetensors").write_bytes(data)
        (tmp / "adapter_keys.json").write_bytes(order)
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "completed_rounds": ckpt.completed_rounds,
            "experiment_hash": ckpt.experiment_hash, "history": ckpt.history, "unresponsive": ckpt.unresponsive,
        }, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.latest_file, label + "\n")
        return final

    def load(self) -> Checkpoint:
        from fedse_secure.models.adapters import state_from_bytes

        if not self.exists():
            raise CheckpointError(f"no checkpoint in {self.root}; start without --resume")
        label = self.latest_file.read_text().strip()
        folder = self.root / label
        try:
            meta = json.loads((folder / "meta.json").read_text())
            state = state_from_bytes((folder / "adapter.safetensors").read_bytes(),
                                     (folder / "adapter_keys.json").read_bytes())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: unreadable checkpoint ({err}); restore it from backup or start fresh") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{folder}: checkpoint format {meta.get('format')} is not {FORMAT}")
        return Checkpoint(int(meta["completed_rounds"]), state, str(meta["experiment_hash"]), list(meta["history"]),
                          {str(k): float(v) for k, v in meta.get("unresponsive", {}).items()})
