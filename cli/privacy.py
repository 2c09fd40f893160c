"""`fedse privacy report|verify|plan`: a thin shell over fedse_secure.privacy (heavy imports inside commands)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

privacy_app = typer.Typer(
    help="Audit and plan differential privacy: per-institution ledgers, ε under every accountant, noise planning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_DEFAULT_DELTA = 1e-5
#: Planning bounds: above ε=100 DP promises nothing useful, and the accountants' noise search over more composed
#: steps than this runs for minutes to hours (PLD and PRV discretise ever wider privacy-loss distributions).
_MAX_PLAN_EPSILON = 100.0
_MAX_PLAN_STEPS = 100_000
#: The plan options that set a config field, by the field's name in a validation error.
_PLAN_FLAGS = {"mode": "--mode", "delta": "--delta", "expected_batch_size": "--expected-batch-size",
               "epochs_per_round": "--epochs", "max_steps_per_round": "--max-steps"}


def _fail(message: str, code: int = 2):
    from fedse_cli.progress import fail

    fail(message, code)


def _out():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        _fail(f"--delta {delta:g}: δ must lie strictly between 0 and 1, e.g. --delta 1e-5")
    return delta


def _privacy_from(config: Path | None, overrides: list[str] | None = None):
    from fedse_secure.config import ConfigError, load_config

    if config is None:
        return None, None
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    return cfg.privacy, cfg.training


def _ledger(path: Path):
    from fedse_secure.privacy import PrivacyLedger

    if not path.exists():
        _fail(f"{path}: no such ledger; institutions write theirs to <run>/institutions/<name>/privacy_ledger.jsonl")
    if path.is_dir():
        _fail(f"{path} is a folder; pass the ledger file (…/privacy_ledger.jsonl)")
    return PrivacyLedger(path)


@privacy_app.command("report")
def report(
    ledger: Path = typer.Argument(..., help="An institution's ledger (privacy_ledger.jsonl)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML: takes the ε budget."),
    delta: float | None = typer.Option(None, "--delta", help="δ (default: the smallest the ledger recorded; only a "
                                                             "smaller one may be asked for)."),
    budget: float | None = typer.Option(None, "--budget", help="ε budget (default: the config's epsilon_budget)."),
    accountant: list[str] = typer.Option([], "--accountant", "-a", help="Only this accountant (repeat; default all)."),
    png: Path | None = typer.Option(None, "--png", help="Where to write the plot (default: LEDGER.epsilon.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (one object)."),
) -> None:
    """ε spent per round and in total (every accountant), the remaining budget, and a PNG of ε over rounds."""
    from fedse_secure.privacy import LedgerCorruptedError
    from fedse_secure.privacy.report import ReportError, build_report, plot_report, png_target
    from fedse_secure.registry import UnknownComponentError

    privacy, _ = _privacy_from(config)
    if delta is not None:
        _check_delta(delta)
    b = budget if budget is not None else (privacy.epsilon_budget if privacy else None)
    if b is not None and not (math.isfinite(b) and b > 0):
        _fail(f"--budget {b:g}: an ε budget must be a positive finite number")
    led = _ledger(ledger)
    try:  # before any accounting: a bad plot path is refused first, and never replaces another file
        png_path = png_target(png or ledger.with_name(ledger.name + ".epsilon.png"))
    except ReportError as err:
        _fail(f"--png {err}")
    try:
        rep = build_report(led, delta, b, accountants=accountant or None)
    except LedgerCorruptedError as err:
        _fail(f"{err} (the ledger failed verification, so no ε is reported; `fedse privacy verify {ledger}` "
              "lists every check)", 1)
    except (ReportError, UnknownComponentError) as err:
        _fail(str(err))
    d = rep.delta
    png_path = plot_report(rep, png_path)
    if as_json:
        data = rep.to_dict()
        data["png"] = str(png_path)
        typer.echo(json.dumps(data))
        return
    from rich.table import Table

    from fedse_secure.privacy import ACCOUNTANTS

    out = _out()
    out.print(f"[bold]{ledger}[/] — institution {rep.institution or '(empty ledger)'}, δ={d:g} ({rep.neighbouring}), "
              f"head {rep.head_hash[:16]}…")
    if rep.non_private_from_round is not None:
        out.print(f"[bold red]NON-PRIVATE[/] from round {rep.non_private_from_round}: a step ran without noise, so ε is "
                  "infinite from there on")
    names = rep.accountants
    table = Table("round", "events", "steps", "level", *(f"ε {a.upper()} (round)" for a in names),
                  *(f"ε {a.upper()} (total)" for a in names))
    for r in rep.rows:
        table.add_row(str(r.round), str(r.events), str(r.steps), ",".join(r.levels),
                      *(_fmt(r.epsilon[a]) for a in names), *(_fmt(r.cumulative[a]) for a in names))
    out.print(table)
    totals = ", ".join(f"{a.upper()} {_fmt(rep.total[a])}" for a in names)
    out.print(f"total ε: {totals} (rounds compose; ε does not add up)")
    for a, err in rep.errors.items():
        out.print(f"[yellow]{ACCOUNTANTS.get(a).title} unavailable[/]: {err}")
    if b is None:
        out.print("budget: none configured (pass --budget or --config)")
    else:
        left = ", ".join(f"{a.upper()} {_fmt(rep.remaining(a))}" for a in names)
        out.print(f"budget ε={b:g}: remaining {left}")
    out.print(f"plot: {png_path}")


@privacy_app.command("verify")
def verify(
    ledger: Path = typer.Argument(..., help="An institution's ledger (privacy_ledger.jsonl)."),
    expect_head: list[str] = typer.Option(
        [], "--expect-head", help="A head hash recorded outside the institution at any earlier time (repeat); each "
                                  "must head a prefix of the ledger, which detects a deleted or rewritten ledger."),
    delta: float | None = typer.Option(None, "--delta", help="δ (default: the smallest the ledger recorded; only a "
                                                             "smaller one may be asked for)."),
    cross_check: bool = typer.Option(True, "--cross-check/--no-cross-check",
                                     help="Also recompute ε with Google's dp-accounting (needs the audit extra)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (one object)."),
) -> None:
    """Check the hash chain, the sealed head and the recorded heads, then recompute ε from the events. Exit 1 if
    anything fails."""
    from fedse_secure.privacy.report import ReportError, audit_ledger

    if delta is not None:
        _check_delta(delta)
    try:
        audit = audit_ledger(_ledger(ledger), delta, expected_heads=expect_head, cross_check=cross_check)
    except ReportError as err:
        _fail(str(err))
    d = audit.delta
    if as_json:
        typer.echo(json.dumps(audit.to_dict()))
        raise typer.Exit(0 if audit.ok else 1)
    out = _out()
    v = audit.verification
    if not v.ok:
        out.print(f"[bold red]FAILED[/] {v.summary()}")
        raise typer.Exit(1)
    out.print(f"[bold green]OK[/] {v.summary()}")
    figures = ", ".join(f"{a.upper()} {_fmt(e)}" for a, e in audit.epsilon.items())
    out.print(f"ε recomputed from {v.entries} events at δ={d:g}: {figures}" if d is not None else
              "the ledger records no events")
    if audit.epsilon_google_rdp is not None:
        verdict = "agrees" if audit.cross_check_ok else "DISAGREES"
        out.print(f"Google dp-accounting RDP: {_fmt(audit.epsilon_google_rdp)} ({verdict})")
    if audit.cross_check_error:
        out.print(f"[yellow]note[/]: {audit.cross_check_error}")
    if not audit.ok:
        raise typer.Exit(1)


@privacy_app.command("plan")
def plan(
    target_epsilon: float = typer.Option(..., "--target-epsilon", "-e", help="ε budget for all planned rounds."),
    rounds: int | None = typer.Option(None, "--rounds", "-r", help="Planned rounds (default: federation.rounds)."),
    records: int | None = typer.Option(
        None, "--records", "-n", help="Trajectories per institution per round (dp-sgd; sets the sample rate)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Experiment YAML: mode, δ, batch, epochs."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set privacy.delta=1e-6."),
    mode: str | None = typer.Option(None, "--mode", help="dp-sgd or client-dp (default: the config's, else dp-sgd)."),
    delta: float | None = typer.Option(None, "--delta", help=f"δ (default: the config's, else {_DEFAULT_DELTA:g})."),
    expected_batch_size: int | None = typer.Option(None, "--expected-batch-size", help="DP-SGD expected batch."),
    epochs: int | None = typer.Option(None, "--epochs", help="training.epochs_per_round."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="training.max_steps_per_round."),
    ledger: Path | None = typer.Option(None, "--ledger", help="Subtract what this ledger already spent."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (one object)."),
) -> None:
    """The noise multiplier needed for a target ε over the planned rounds, under every accountant."""
    from pydantic import ValidationError

    from fedse_secure.config import PrivacyConfig, TrainingConfig
    from fedse_secure.privacy import ACCOUNTANTS, AccountingError, epsilon, noise_multiplier_for_target, project_event

    if not (math.isfinite(target_epsilon) and 0 < target_epsilon <= _MAX_PLAN_EPSILON):
        _fail(f"--target-epsilon {target_epsilon:g}: ε must be a positive number up to {_MAX_PLAN_EPSILON:g} (beyond "
              "it DP guarantees nothing useful), e.g. --target-epsilon 8")
    if overrides and config is None:
        _fail("--set overrides a field of --config; without a config pass the plan's values as options (--mode, "
              "--delta, --expected-batch-size, --epochs, --max-steps)")
    for flag, value in (("--rounds", rounds), ("--records", records), ("--expected-batch-size", expected_batch_size),
                        ("--max-steps", max_steps)):
        if value is not None and value < 1:
            _fail(f"{flag} {value}: must be at least 1")
    if epochs is not None and epochs < 0:
        _fail(f"--epochs {epochs}: must be 0 or more")
    if delta is not None and not 0.0 < delta < 1.0:
        _fail(f"--delta {delta:g}: δ must lie strictly between 0 and 1, e.g. --delta 1e-5")
    cfg_privacy, cfg_training = None, None
    rounds_from_cfg = None
    if config is not None:
        from fedse_secure.config import ConfigError, load_config

        try:
            cfg = load_config(config, overrides)
        except ConfigError as err:
            _fail(str(err))
        cfg_privacy, cfg_training, rounds_from_cfg = cfg.privacy, cfg.training, cfg.federation.rounds
    privacy = (cfg_privacy or PrivacyConfig()).model_copy()
    training = (cfg_training or TrainingConfig()).model_copy()
    try:
        if mode is not None:
            privacy.mode = mode
        elif privacy.mode == "none":
            privacy.mode = "dp-sgd"
        if delta is not None:
            privacy.delta = delta
        if expected_batch_size is not None:
            privacy.expected_batch_size = expected_batch_size
        if epochs is not None:
            training.epochs_per_round = epochs
        if max_steps is not None:
            training.max_steps_per_round = max_steps
    except ValidationError as err:
        first = err.errors()[0]
        flag = _PLAN_FLAGS.get(str(first["loc"][-1])) if first["loc"] else None
        message = first["msg"].removeprefix("Value error, ")
        _fail(f"{flag} {first['input']}: {message}" if flag else message)
    n_rounds = rounds or rounds_from_cfg
    if not n_rounds:
        _fail("--rounds is required without --config (how many rounds must fit in the budget?)")
    if privacy.mode == "dp-sgd" and not records:
        _fail("--records is required for dp-sgd: the sample rate is expected_batch_size / records")
    try:
        event = project_event(records or 1, training, privacy)
    except ValueError as err:  # a mode that records no DP event (none): nothing to plan
        _fail(f"--mode {privacy.mode}: {err}")
    if event.steps == 0:
        _fail("the planned rounds run no training steps (epochs_per_round is 0); nothing to plan")
    if n_rounds * event.steps > _MAX_PLAN_STEPS:
        _fail(f"{n_rounds} rounds × {event.steps} steps is more than the {_MAX_PLAN_STEPS} composed steps a plan can "
              "search; plan fewer --rounds, or fewer steps per round (--max-steps, --epochs, --records)")
    spent = []
    if ledger is not None:
        from fedse_secure.privacy import LedgerCorruptedError
        from fedse_secure.privacy.report import ReportError, report_delta

        led = _ledger(ledger)
        try:
            spent = led.events()
            # As `privacy report` and `verify`: a larger δ than the ledger's would understate what it spent.
            privacy.delta = report_delta(led, privacy.delta if delta is not None or config is not None else None)
        except LedgerCorruptedError as err:
            _fail(str(err), 1)
        except ReportError as err:
            _fail(f"--delta {err}" if delta is not None else f"privacy.delta of {config}: {err}")
    result = {"mode": privacy.mode, "target_epsilon": target_epsilon, "delta": privacy.delta, "rounds": n_rounds,
              "sample_rate": event.sample_rate, "steps_per_round": event.steps, "already_spent_events": len(spent)}
    result["accountants"] = {}
    for acc in ACCOUNTANTS.names():
        try:
            if privacy.neighbouring not in ACCOUNTANTS.get(acc).relations:
                result["accountants"][acc] = {"error": f"accounts {', '.join(ACCOUNTANTS.get(acc).relations)} only, "
                                                       f"not {privacy.neighbouring}"}
                continue
            sigma = noise_multiplier_for_target(
                target_epsilon, privacy.delta, event.sample_rate, event.steps, n_rounds, acc,
                spent_events=spent, level=event.level, neighbouring=privacy.neighbouring,
            )
            planned = [event.__class__(**{**event.to_dict(), "noise_multiplier": sigma})] * n_rounds
            result["accountants"][acc] = {"noise_multiplier": sigma,
                                          "epsilon": epsilon([*spent, *planned], privacy.delta, acc)}
        except AccountingError as err:
            result["accountants"][acc] = {"error": str(err)}
    planned = any("error" not in r for r in result["accountants"].values())
    if as_json:
        typer.echo(json.dumps(result))
        raise typer.Exit(0 if planned else 1)
    out = _out()
    out.print(f"{privacy.mode}: {n_rounds} rounds × {event.steps} steps at sample rate {event.sample_rate:.4g}, "
              f"target ε={target_epsilon:g}, δ={privacy.delta:g}"
              + (f", after {len(spent)} recorded events" if spent else ""))
    for acc, r in result["accountants"].items():
        if "error" in r:
            out.print(f"  {acc.upper()}: [red]{r['error']}[/]")
        else:
            out.print(f"  {acc.upper()}: noise_multiplier ≥ {r['noise_multiplier']:.4f} (ε = {r['epsilon']:.4f})")
    if not planned:
        _fail(f"no accountant found a noise level that keeps {n_rounds} rounds within ε={target_epsilon:g} (each "
              "says why above); raise --target-epsilon or plan fewer rounds or steps", 1)
    out.print(f"set privacy.noise_multiplier to the value for your accountant (privacy.accountant: {privacy.accountant})")
