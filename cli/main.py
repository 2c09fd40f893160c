"""The `fedse` command: a thin shell over the fedse_secure library (sub-apps live in their own modules)."""

from __future__ import annotations

import typer

from fedse_secure import __version__

app = typer.Typer(
    name="fedse",
    help="fedse-secure: privacy-hardened federated self-evolution of LLM agents (Fed-SE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedse-secure {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run, deploy and audit federated self-evolution of LLM agents with secure aggregation and DP."""


def _optional(module_name: str):
    """Import a CLI area if it is present in this checkout (areas land independently)."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def _register_subcommands() -> None:
    # Each area registers its own commands; modules keep heavy imports (torch) inside functions so
    # `fedse --help` stays fast.
    from fedse_cli import run as run_commands
    from fedse_cli import sweep as sweep_commands

    run_commands.register(app)
    sweep_commands.register(app)
    for module_name, attr, name in (
        ("fedse_cli.envs", "envs_app", "envs"),
        ("fedse_cli.privacy", "privacy_app", "privacy"),
        ("fedse_cli.threats", "threats_app", "threats"),
    ):
        module = _optional(module_name)
        if module is not None:
            app.add_typer(getattr(module, attr), name=name)
    deploy = _optional("fedse_cli.deploy")
    if deploy is not None:
        deploy.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
