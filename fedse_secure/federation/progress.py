"""Progress reporting as an interface, so the library stays silent and the CLI draws rich progress bars."""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def update(self, *, completed: int | None = None, total: int | None = None, info: str | None = None) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> ProgressTask: ...
    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, *, completed=None, total=None, info=None) -> None:
        pass

    def close(self) -> None:
        pass


class _NullProgress:
    def task(self, description: str, total: int | None) -> ProgressTask:
        return _NullTask()

    def log(self, message: str) -> None:
        pass


NULL_PROGRESS: Progress = _NullProgress()
