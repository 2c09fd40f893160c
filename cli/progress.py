"""Rich progress bars and one-line errors for the CLI (the library reports through a Progress interface)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error (one line per problem) and exit non-zero."""
    for line in message.splitlines() or [message]:  # escaped: "[a, b]" in a message is text, not a style
        console.print(f"[bold red]error[/]: {escape(line)}", highlight=False, soft_wrap=True)
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


class _LineTask:
    """Progress for a log file or pipe (no live bars there): one line when a step starts and when it ends."""

    def __init__(self, owner: RichProgress, description: str, total: int | None):
        import time

        self.owner = owner
        self.description = description
        self.total = total
        self.done = 0
        self.info = ""
        self.started = time.perf_counter()
        owner.console.print(f"[dim]…[/] {description}", highlight=False)

    def advance(self, n: int = 1) -> None:
        self.done += n

    def update(self, *, completed=None, total=None, info=None) -> None:
        if completed is not None:
            self.done = completed
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info

    def close(self) -> None:
        import time

        count = f" {self.done}/{self.total}" if self.total else (f" {self.done}" if self.done else "")
        extra = f" {self.info}" if self.info else ""
        self.owner.console.print(f"[green]✓[/] {self.description}{count}{extra} "
                                 f"({time.perf_counter() - self.started:.1f}s)", highlight=False)


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

    @property
    def console(self) -> Console:
        return self.bars.console

    def task(self, description: str, total: int | None):
        if not self.enabled:
            return _Silent()
        if not self.console.is_terminal:
            return _LineTask(self, description, total)
        return _Task(self, self.bars.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.log(message)
