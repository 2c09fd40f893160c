"""`fedse sweep CONFIG --seeds 0,1,2`: one simulation per seed, then the report over all of them.

The paper reports single runs; on small models the spread between seeds is as large as the differences
between methods, so every comparison here is meant to be made over seeds (mean ± 95% CI in `fedse report`).
Each seed writes its own run folder, ``OUT/<name>-seed<N>``; a seed whose folder already holds a completed run
is skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedse_cli.progress import RichProgress, console, fail


#: Each seed is a whole simulation; a longer list is a typo (0-1000000000) that would only hang building configs.
MAX_SEEDS = 1000


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (_is_number(lo) and _is_number(hi)) or int(lo) > int(hi):
                raise ValueError(f"bad seed range {part!r}; write e.g. 0-4")
            more = range(int(lo), int(hi) + 1)
        elif _is_number(part):
            more = range(int(part), int(part) + 1)
        else:
            raise ValueError(f"bad seed {part!r}; seeds are non-negative integers, e.g. --seeds 0,1,2 or 0-4")
        if len(seeds) + (more.stop - more.start) > MAX_SEEDS:  # len() of a huge range overflows
            raise ValueError(f"--seeds {text!r} lists more than {MAX_SEEDS} seeds (one simulation each); "
                             "run a shorter list, e.g. --seeds 0-9")
        seeds.extend(more)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} must list distinct seeds, e.g. 0,1,2")
    return seeds


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def sweep(
    config: Path = typer.Argument(..., help="Experiment YAML, e.g. configs/fedse.yaml."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds to run: 0,1,2 or 0-4."),
    out: Path = typer.Option(Path("runs/sweeps"), "--out", "-o", help="Parent folder of the per-seed run folders."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config field for every seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rerun seeds whose run folder already exists."),
    plot_dir: Path | None = typer.Option(None, "--plots", help="Where to write the PNG (default: OUT)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run one experiment over several seeds and report mean ± 95% CI per environment and round."""
    from fedse_secure.config import ConfigError, load_config

    try:
        seed_list = _parse_seeds(seeds)
        configs = {s: load_config(config, [*overrides, f"seed={s}"]) for s in seed_list}
    except (ValueError, ConfigError) as err:
        fail(str(err))
    from fedse_cli.run import _print_table, _quiet_libraries

    _quiet_libraries()
    from fedse_secure.errors import FedseError
    from fedse_secure.federation.run_folder import RunFolder
    from fedse_secure.federation.simulation import resume as resume_simulation
    from fedse_secure.federation.simulation import simulate as run_simulation
    from fedse_secure.io_utils import writable_dir
    from fedse_secure.report import final_table, load_summary, plot_runs

    plots = writable_dir(plot_dir or out)  # before any seed trains, not after the last
    run_dirs = []
    for seed, cfg in configs.items():
        run_dir = out / f"{cfg.name}-seed{seed}"
        run_dirs.append(run_dir)
        if _completed(run_dir) and not overwrite:
            console.print(f"seed {seed}: {run_dir} already completed, skipped (use --overwrite to rerun)")
            continue
        # A seed whose run stopped part-way continues after its last completed round (--overwrite: from scratch).
        resuming = not overwrite and RunFolder(run_dir).is_run_folder() and (run_dir / "metrics.jsonl").is_file()
        console.print(f"seed {seed}: {'resuming' if resuming else 'running into'} {run_dir}")
        progress = RichProgress(enabled=not quiet)
        try:
            with progress:
                if resuming:
                    resume_simulation(run_dir, cfg, progress=progress)
                else:
                    run_simulation(cfg, run_dir, overwrite=True, progress=progress)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/] at seed {seed}; rerun the same command to resume")
            raise typer.Exit(130)
        except FedseError as err:
            fail(f"seed {seed}: {err}", code=err.exit_code)
    summaries = [load_summary(d) for d in run_dirs]
    _print_table(final_table(summaries))
    for p in plot_runs(summaries, plots):
        console.print(f"plot: {p}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
