"""`fedse threats list` and `fedse threats verify`: a thin shell over fedse_threat_model."""

from __future__ import annotations

import json

import typer

from fedse_cli.progress import fail
from fedse_threat_model.protections import PROTECTIONS

threats_app = typer.Typer(
    help="The threat model: list the threats, run their executable checks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@threats_app.command("list")
def list_threats(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Every threat with its adversary, mitigations, residual risk, check and tests."""
    from fedse_threat_model.registry import load_threats

    threats = load_threats()
    if as_json:
        typer.echo(json.dumps([t.__dict__ for t in threats], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedse-secure threats (details: threat_model/THREATS.md)", show_lines=True)
    for col in ("id", "threat", "adversary", "stopped by", "residual risk", "check"):
        table.add_column(col, overflow="fold")
    for t in threats:
        table.add_row(t.id, t.title, t.adversary, ", ".join(t.mitigations), t.residual, t.check)
    Console(width=200).print(table)


@threats_app.command("verify")
def verify(
    as_json: bool = typer.Option(False, "--json", help="Print results (with evidence) as JSON."),
    only: list[str] = typer.Option([], "--only", help="Run only this threat's check (repeatable), e.g. --only T3."),
    disable: list[str] = typer.Option(
        [], "--disable",
        help=f"Switch a protection off to see its checks fail (repeatable): {', '.join(PROTECTIONS)}.",
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the simulated data and keys."),
) -> None:
    """Run the threat checks and print threat -> check -> pass/fail. Exits 1 if any check fails."""
    from fedse_cli.run import _quiet_libraries

    _quiet_libraries()
    from fedse_threat_model.harness import ProtectionSettings, UnknownProtectionError
    from fedse_threat_model.registry import load_threats, select, verify as run_verify

    try:
        settings = ProtectionSettings(disabled=frozenset(disable), seed=seed)
        select(load_threats(), only)
    except (UnknownProtectionError, ValueError) as err:
        fail(str(err))
    if as_json:
        rows = run_verify(settings, only)
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        out = Console(width=200)
        if settings.disabled:
            out.print(f"[bold yellow]protections switched OFF:[/] {', '.join(sorted(settings.disabled))} "
                      "(demonstration: the checks that rely on them must fail)")

        def progress(row) -> None:
            mark = "[green]PASS[/]" if row.result.passed else "[bold red]FAIL[/]"
            out.print(f"  {row.threat.id:<4} {mark} {row.threat.check} ({row.result.seconds:.1f}s)", highlight=False)

        rows = run_verify(settings, only, on_row=progress)
        table = Table(title="fedse threats verify", show_lines=True)
        for col in ("threat", "check", "result", "evidence"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(f"{r.threat.id} {r.threat.title}", r.threat.check,
                          "[green]PASS[/]" if r.result.passed else "[bold red]FAIL[/]", r.result.summary)
        out.print(table)
        failed = [r.threat.id for r in rows if not r.result.passed]
        out.print(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if any(not r.result.passed for r in rows):
        raise typer.Exit(1)
