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


def _register_subcommands() -> None:
    # Each area registers its own commands; modules keep heavy imports (torch) inside functions so
    # `fedse --help` stays fast.
    from fedse_cli import audit, deploy, envs, policy, privacy, run, sweep, threats

    run.register(app)
    sweep.register(app)
    app.add_typer(envs.envs_app, name="envs")
    app.add_typer(privacy.privacy_app, name="privacy")
    app.add_typer(policy.policy_app, name="policy")
    app.add_typer(audit.audit_app, name="audit")
    app.add_typer(audit.adapter_app, name="adapter")
    app.add_typer(threats.threats_app, name="threats")
    deploy.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
