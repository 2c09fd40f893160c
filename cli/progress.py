"""Rich progress bars and one-line errors for the CLI (the library reports through a Progress interface)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error (one line per problem) and exit non-zero."""
    for line in message.splitlines() or [message]:
        console.print(f"[bold red]error[/]: {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _Task:
    def __init__(self, owner: RichProgress, task_id):
        self.owner = owner
        self.task_id = task_id

    def advance(self, n: int = 1) -> None:
        self.owner.bars.advance(self.task_id, n)

    def update(self, *, completed=None, total=None, info=None) -> None:
        kwargs = {}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if info is not None:
            kwargs["info"] = info
        self.owner.bars.update(self.task_id, **kwargs)

    def close(self) -> None:
        self.owner.bars.remove_task(self.task_id)


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """Implements fedse_secure.federation.progress.Progress with rich bars on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
            disable=not enabled,
        )

    def __enter__(self) -> RichProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def task(self, description: str, total: int | None):
        if not self.enabled:
            return _Silent()
        return _Task(self, self.bars.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        if self.enabled:
            self.bars.console.log(message)
