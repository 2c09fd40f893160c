"""`fedse simulate`, `fedse report`, `fedse config validate`, `fedse model prepare`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from fedse_cli.progress import RichProgress, console, fail


def _quiet_libraries() -> None:
    # Progress bars of our own are the only ones a user should see; HF's loaders print their own otherwise.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Known-harmless library chatter (deps.md §3a/§3b): peft's deprecation notice and Opacus's note that the
    # frozen embedding makes its full backward hook fire on module outputs.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers always present in the pinned set
        pass


def simulate(
    config: Path | None = typer.Argument(None, help="Experiment YAML, e.g. configs/smoke.yaml (optional with "
                                                    "--resume)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default: the config's output_dir)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set federation.rounds=2."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder that fedse created "
                                   "(its privacy ledgers are kept in ledger-archive/)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run folder after its last completed "
                                       "round, with its own config (a CONFIG given too must be the same)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a whole federated experiment in one process (every institution, no network)."""
    from fedse_secure.config import load_config

    if resume is not None:
        if overwrite or out is not None:
            fail("--resume continues the run folder it names; leave out --out and --overwrite")
        if overrides and config is None:
            fail("--set changes the experiment, and a resumed run keeps its own; leave out --set")
    elif config is None:
        fail("missing CONFIG: pass an experiment YAML (e.g. configs/smoke.yaml), or --resume RUN_DIR")
    cfg = load_config(config, overrides) if config is not None else None
    _quiet_libraries()
    from fedse_secure.errors import FedseError
    from fedse_secure.federation.simulation import resume as resume_simulation
    from fedse_secure.federation.simulation import simulate as run_simulation

    out_dir = resume if resume is not None else (out or cfg.resolved_output_dir())
    progress = RichProgress(enabled=not quiet)
    try:
        with progress:
            if resume is not None:
                summary = resume_simulation(resume, cfg, progress=progress)
            else:
                summary = run_simulation(cfg, out_dir, overwrite=overwrite, progress=progress)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {out_dir} holds every completed round (summary status 'interrupted'); "
                      f"continue it with `fedse simulate --resume {out_dir}`")
        raise typer.Exit(130)
    except FedseError as err:
        if err.exit_code == 3:
            fail(f"stopped before round {summary_round(out_dir)}: {err}", code=3)
        fail(str(err), code=err.exit_code)
    from fedse_secure.report import final_table

    _print_table(final_table([summary]))
    console.print(f"run folder: [bold]{out_dir}[/]  (summary.json, metrics.jsonl, adapters/)")


def summary_round(out_dir: Path) -> int:
    try:
        return int(json.loads((out_dir / "summary.json").read_text())["rounds_completed"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run folders (seeds of one experiment are grouped)."),
    plot_dir: Path | None = typer.Option(None, "--plots", help="Where to write PNGs (default: the run folder, or the "
                                         "folder that holds all the runs given)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
    baseline: str | None = typer.Option(None, "--baseline", help="A run group, e.g. 'fedit (fedit)': also print every "
                                        "other group minus it, with the 95% CI of the difference (paired by seed)."),
) -> None:
    """Table of success per environment (mean ± 95% CI over seeds) and PNG plots per round.

    A run that has not completed is named with its status: a run whose process died shows as interrupted
    (continue it with `fedse simulate --resume RUN`), a run in which no round completed as failed.
    """
    from fedse_secure.io_utils import writable_dir
    from fedse_secure.report import differences, final_table, load_summary, plot_runs

    summaries = [load_summary(d) for d in run_dirs]
    table = final_table(summaries)
    diff = None
    if baseline is not None:
        try:
            diff = differences(summaries, baseline)
        except ValueError as err:
            fail(str(err))
    plots = writable_dir(plot_dir or default_plot_dir(run_dirs))  # before the table: one error, not a table and one
    runs = [{"run": str(d), "status": s.status, "rounds_completed": s.rounds_completed,
             "rounds_planned": s.rounds_planned, "error": s.error} for d, s in zip(run_dirs, summaries)]
    for run in runs:
        if run["status"] != "completed":
            hint = (f"; continue it with `fedse simulate --resume {run['run']}`" if run["status"] == "interrupted"
                    else "")
            console.print(f"[yellow]note[/]: {run['run']} is {run['status']} after {run['rounds_completed']} of "
                          f"{run['rounds_planned']} rounds" + (f" ({run['error']})" if run["error"] else "") + hint,
                          highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({**table, "runs": runs, **({"differences": diff["rows"]} if diff else {})}))
    else:
        _print_table(table)
        if diff:
            _print_differences(diff)
    written = plot_runs(summaries, plots)
    if not as_json:
        for p in written:
            console.print(f"plot: {p}")


def default_plot_dir(run_dirs: list[Path]) -> Path:
    """One run: its own folder. Several: the folder holding them all (a sweep's OUT), so that a comparison's plot
    never lands inside, or overwrites a plot in, one of the runs it compares; the working folder if they share none
    but the filesystem root."""
    resolved = [d.resolve() for d in run_dirs]
    if len(set(resolved)) == 1:
        return run_dirs[0]
    common = Path(os.path.commonpath(resolved))
    return Path.cwd() if common == Path(common.anchor) else common


def _print_table(table: dict) -> None:
    from rich.table import Table

    def pct(c: dict) -> str:
        return f"{100 * c['mean']:.1f} ± {100 * c['ci95']:.1f}" if c["ci95"] else f"{100 * c['mean']:.1f}"

    t = Table(title="success rate (%): first evaluated round -> last (mean ± 95% CI over seeds)")
    t.add_column("run")
    t.add_column("seeds", justify="right")
    t.add_column("rounds", justify="right")
    for env in table["environments"] + ["avg"]:
        t.add_column(env, justify="right")
    for row in table["rows"]:
        cells, rounds = [], "-"
        for env in table["environments"] + ["avg"]:
            c = row.get(env)
            if c is None:
                cells.append("-")
            elif c["first"]["round"] == c["round"]:
                cells.append(pct(c))
            else:
                cells.append(f"{pct(c['first'])} -> {pct(c)}")
            if c is not None:
                rounds = f"{c['first']['round']}-{c['round']}"
        t.add_row(row["run"], str(row["seeds"]), rounds, *cells)
    console.print(t)


def _print_differences(diff: dict) -> None:
    from rich.table import Table

    t = Table(title="difference at the last evaluated round (points; 95% CI, paired by seed where the seeds match)")
    t.add_column("run")
    t.add_column("minus")
    for env in diff["environments"] + ["avg"]:
        t.add_column(env, justify="right")
    for row in diff["rows"]:
        cells = []
        for env in diff["environments"] + ["avg"]:
            c = row.get(env)
            cells.append("-" if c is None else f"{100 * c['mean']:+.1f}" + (
                f" ± {100 * c['ci95']:.1f}" if c["ci95"] is not None else ""))
        t.add_row(row["run"], row["baseline"], *cells)
    console.print(t)


config_app = typer.Typer(help="Check experiment configs.", no_args_is_help=True)


@config_app.command("validate")
def config_validate(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set federation.rounds=2."),
    show: bool = typer.Option(False, "--show", help="Print the resolved config."),
) -> None:
    """Validate a config without running anything; exits non-zero with one line per problem."""
    from fedse_secure.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        fail(str(err))
    if show:
        typer.echo(cfg.to_yaml())
    else:
        console.print(f"[green]ok[/]: {config} ({len(cfg.clients)} clients, {cfg.federation.rounds} rounds, "
                      f"{cfg.federation.mode}, secure aggregation {cfg.federation.secure_aggregation})")


@config_app.command("explain")
def config_explain(
    field: str | None = typer.Argument(None, help="A dotted field, e.g. federation.secure_aggregation.threshold."),
    as_json: bool = typer.Option(False, "--json", help="Print the documentation as JSON."),
) -> None:
    """What a config field means, its type, default and allowed values (every top-level field without FIELD)."""
    from fedse_secure.config import ConfigError, explain

    try:
        docs = explain(field)
    except ConfigError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps([d.__dict__ for d in docs], default=str))
        return
    import textwrap

    for d in docs:
        typer.echo(f"{d.path}  ({d.type}, default {d.default})")
        meaning = d.description + (f" Allowed: {', '.join(d.choices)}." if d.choices else "")
        typer.echo(textwrap.fill(meaning, width=100, initial_indent="    ", subsequent_indent="    "))


model_app = typer.Typer(help="Prepare models offline.", no_args_is_help=True)


@model_app.command("prepare")
def model_prepare(
    name: str = typer.Argument("smollm2-135m-instruct", help="smollm2-135m-instruct or tiny-llama."),
) -> None:
    """Convert the bundled SmolLM2 GGUF (or build the tiny test model) into the local cache, once."""
    _quiet_libraries()
    from fedse_secure.models import DEFAULT_MODEL, TINY_MODEL, ModelNotAvailableError, prepare_default_model, prepare_tiny_model

    builders = {DEFAULT_MODEL: prepare_default_model, TINY_MODEL: prepare_tiny_model}
    if name not in builders:
        fail(f"unknown model {name!r}; choose {DEFAULT_MODEL} or {TINY_MODEL} (other models load from a local path)")
    try:
        path = builders[name]()
    except ModelNotAvailableError as err:
        fail(str(err))
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("report")(report)
    app.add_typer(config_app, name="config")
    app.add_typer(model_app, name="model")
