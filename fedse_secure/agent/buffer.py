"""The institution's local experience buffer: seeded with expert demonstrations, grown with successes.

Stored on disk as JSON lines (one trajectory per line, with its round and source), appended with fsync, and
de-duplicated by exact content, as the buffer only grows across rounds ("without a capacity limit", paper §2).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedse_secure.envs.trajectory import Trajectory
from fedse_secure.io_utils import CorruptFileError, append_jsonl, read_jsonl


class ExperienceBuffer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._items: list[Trajectory] = [Trajectory(**r) for r in read_jsonl(self.path)]
        except TypeError as err:
            raise CorruptFileError(f"{self.path}: a line is not a trajectory ({err}); the buffer was damaged: restore "
                                   "it from a backup or move it away") from None
        self._keys = {t.content_key() for t in self._items}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def add(self, trajectories: Iterable[Trajectory]) -> int:
        """Add the trajectories not already present; return how many were new."""
        fresh = []
        for t in trajectories:
            key = t.content_key()
            if key not in self._keys:
                self._keys.add(key)
                fresh.append(t)
        if fresh:
            from dataclasses import asdict

            append_jsonl(self.path, [asdict(t) for t in fresh])
            self._items.extend(fresh)
        return len(fresh)

    def items(self, *, round_id: int | None = None, source: str | None = None) -> list[Trajectory]:
        return [t for t in self._items if (round_id is None or t.round == round_id) and (source is None or t.source == source)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._items:
            out[t.source] = out.get(t.source, 0) + 1
        return out
