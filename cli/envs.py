"""`fedse envs list|check|serve`: a thin shell over fedse_secure.envs (heavy imports inside commands)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

envs_app = typer.Typer(
    help="The five local environments (BabyAI, WebShop, TextCraft, Maze, Wordle), their oracles, AgentGym serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2):
    from fedse_cli.progress import fail

    fail(message, code)


def _validate(names: list[str] | None) -> list[str] | None:
    from fedse_secure.envs import oracle_environments

    if not names:
        return None
    bad = [n for n in names if n not in oracle_environments()]
    if bad:
        _fail(f"unknown environment(s) {', '.join(bad)}; choose from {', '.join(oracle_environments())}")
    return names


@envs_app.command("list")
def list_envs() -> None:
    """Print each environment's turn limit and split sizes."""
    from fedse_secure.envs import make_env, oracle_environments

    for name in oracle_environments():
        env = make_env(name)
        typer.echo(
            f"{name:10s} max_turns={env.max_turns:<3d} test={len(env.test_task_ids()):<4d} "
            f"train={len(env.train_task_ids())}"
        )


@envs_app.command("check")
def check(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (and nothing else) on stdout."),
    env: list[str] = typer.Option(None, "--env", help="Check only this environment (repeatable)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Check only the first N test tasks of each environment."),
    config: Path = typer.Option(
        None, "--config", help="Check under this experiment config's turn limit, on the test tasks it evaluates."
    ),
) -> None:
    """Run the oracles on the test tasks; exit 1 when an oracle falls below its bar.

    Without --config: every test task at the paper's turn limits (the oracle's ceiling per environment). With
    --config: each institution's environment at that config's limits, beside the ceiling on the same tasks.
    """
    if config is not None:
        return _check_config(config, json_output, bool(env or limit))
    from fedse_secure.envs.check import THRESHOLDS, check_oracles, failures

    names = _validate(env)
    if json_output:
        report = check_oracles(names, limit=limit)
        typer.echo(json.dumps(report))
    else:
        from fedse_cli.progress import console

        with console.status("checking oracles") as status:

            def on_task(name: str, done: int, total: int) -> None:
                status.update(f"{name}: {done}/{total} test tasks")

            report = check_oracles(names, limit=limit, on_task=on_task)
        for name, row in report.items():
            typer.echo(
                f"{name:10s} tasks={row['tasks']:<4d} max_turns={row['max_turns']:<3d} "
                f"oracle_success={row['oracle_success']:.2%} (required {THRESHOLDS[name]:.0%})  "
                f"steps/s={row['steps_per_s']}"
            )
    _exit_on(failures(report), json_output)


def _check_config(path: Path, json_output: bool, extra_filters: bool) -> None:
    from fedse_secure.config import ConfigError
    from fedse_secure.envs.check import check_config, config_failures

    if extra_filters:
        _fail("--config checks the config's own environments and test tasks; drop --env and --limit")
    try:
        cfg = _experiment_of(path)
    except ConfigError as err:
        _fail(str(err))
    report = check_config(cfg)
    if json_output:
        typer.echo(json.dumps(report))
    else:
        for key, row in report.items():
            if row.get("oracle", True) is None:
                typer.echo(f"{key:16s} (remote AgentGym server: no local oracle)")
                continue
            typer.echo(
                f"{key:16s} tasks={row['tasks']:<4d} max_turns={row['max_turns']:<3d} "
                f"oracle_success={row['oracle_success']:.0%} (required {row['required']:.0%}; "
                f"{row['ceiling']:.0%} at the paper's {row['paper_max_turns']})"
            )
    _exit_on(config_failures(report), json_output)


def _experiment_of(path: Path):
    """The experiment of an experiment config, or of a deployment's coordinator config (its ``experiment``)."""
    import yaml

    from fedse_secure.config import load_config

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        data = None  # load_config reports the syntax error
    if isinstance(data, dict) and "experiment" in data:
        from fedse_secure.federation.deploy_config import load_coordinator_config

        return load_coordinator_config(path).experiment
    return load_config(path)


def _exit_on(problems: list[str], json_output: bool) -> None:
    if problems:
        if not json_output:
            from fedse_cli.progress import console

            for line in problems:
                console.print(f"[bold red]error[/]: {line}", highlight=False)
        raise typer.Exit(1)


def _bind_problem(host: str, port: int, err: OSError) -> str:
    """Name the option at fault: a host that does not resolve or is no local interface, else the port."""
    import errno
    import socket

    if isinstance(err, socket.gaierror):
        return (f"cannot serve on --host {host}: the name does not resolve ({err.strerror or err}); pass a local "
                "interface's name or address, e.g. --host 127.0.0.1")
    if err.errno == errno.EADDRNOTAVAIL:
        return (f"cannot serve on --host {host}: it is not an address of this machine; pass a local interface's "
                "address, e.g. --host 127.0.0.1")
    return f"cannot bind {host}:{port} ({err.strerror or err}); pick another --port"


@envs_app.command("serve")
def serve(
    port: int = typer.Option(36001, min=0, max=65535, help="TCP port (0 picks a free one)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; keep it local unless you mean to expose it."),
    env: list[str] = typer.Option(None, "--env", help="Environment to serve (repeatable; default: all five)."),
) -> None:
    """Serve local environments over AgentGym's HTTP protocol at http://HOST:PORT/<env>."""
    from fedse_secure.envs import oracle_environments
    from fedse_secure.envs.agentgym_server import make_server

    names = _validate(env) or oracle_environments()
    try:
        server = make_server(host, port, names)
    except OSError as err:
        _fail(_bind_problem(host, port, err))
    typer.echo(f"serving {', '.join(names)} on http://{host}:{server.server_address[1]}/<env> (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
