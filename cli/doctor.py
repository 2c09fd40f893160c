"""`fedse doctor [CONFIG] [--json]`: what this machine offers a run, and what it means for the configs."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def doctor(
    config: Path | None = typer.Argument(None, help="Also check this experiment YAML against the machine."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set model.device=cpu."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (and nothing else) on stdout."),
) -> None:
    """Print the torch build, devices, memory and extras found here; exit 1 when something does not fit."""
    from fedse_cli.progress import fail
    from fedse_cli.run import _quiet_libraries

    cfg = None
    if config is not None:
        from fedse_secure.config import ConfigError, load_config

        try:
            cfg = load_config(config, overrides)
        except ConfigError as err:
            fail(str(err))
    _quiet_libraries()
    from fedse_secure.machine import advice, config_fit, inspect_machine

    machine = inspect_machine()
    report = {**machine, "advice": advice(machine)}
    if cfg is not None:
        report["config"] = {"path": str(config), **config_fit(cfg, machine)}
    ok = not machine["torch"]["problem"] and (cfg is None or report["config"]["fits"] is not False)
    report["ok"] = ok
    if json_output:
        typer.echo(json.dumps(report))
    else:
        _print(report)
    if not ok:
        raise typer.Exit(1)


def _print(r: dict) -> None:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    t = r["torch"]
    out.print(f"[bold]python[/] {r['python']} on {r['platform']}")
    build = f"CUDA {t['cuda']}" if t["cuda"] else "CPU"
    verdict = "[green]matches the machine[/]" if not t["problem"] else f"[red]{t['problem']}[/]"
    out.print(f"[bold]torch[/] {t['version']} ({build} build; this machine should have the {t['expected_build']} "
              f"build: {t['why']}): {verdict}")
    mem = r["cpu"]["memory"]
    ram = f", {mem['available_gib']:.1f} of {mem['total_gib']:.1f} GiB RAM available" if mem else ""
    out.print(f"[bold]cpu[/] {r['cpu']['cores']} cores, torch uses {r['cpu']['torch_threads']} threads{ram}")
    for g in r["gpus"]:
        out.print(f"[bold]cuda:{g['index']}[/] {g['name']} (compute {g['compute_capability']}), {g['free_gib']:.1f} of "
                  f"{g['total_gib']:.1f} GiB free, bfloat16 {'native' if g['bf16_native'] else 'not native'}")
    if not r["gpus"]:
        out.print("[bold]gpu[/] none usable" + (f" (nvidia-smi: {r['nvidia_smi'][0]})" if r["nvidia_smi"] else ""))
    out.print(f"[bold]auto[/] model.device auto = {r['auto']['device']}, model.dtype auto = {r['auto']['dtype']}")
    extras = ", ".join(f"{k} {'yes (' + (v['version'] or '?') + ')' if v['installed'] else 'no'}"
                       for k, v in r["extras"].items())
    out.print(f"[bold]extras[/] {extras}")
    out.print(f"[bold]models prepared[/] {', '.join(r['models_prepared']) or 'none'}")
    k = r["secagg_kernel"]
    out.print(f"[bold]masking kernel[/] {'[green]active[/]' if k['active'] else '[yellow]not active[/]'}: {k['why']}")
    if "config" in r:
        c = r["config"]
        weights = f"{c['weights'] / 1e6:.0f}M weights, {c['weights_gib']:.2f} GiB" if c["weights"] else "size unknown"
        fits = {True: "[green]the weights fit[/]", False: "[red]the weights do not fit[/]", None: ""}[c["fits"]]
        out.print(f"[bold]{c['path']}[/] {c['model']} on {c['device']} in {c['dtype']}"
                  f"{' (nf4 base)' if c['quantization'] == 'nf4' else ''}: {weights}; {fits}")
        for note in c["notes"]:
            out.print(f"  - {note}")
    for line in r["advice"]:
        out.print(f"[yellow]->[/] {line}")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
