"""The `fedse` command: a thin shell over the fedse_secure library (sub-apps live in their own modules).

Every command fails the same way: an expected failure (:class:`~fedse_secure.errors.FedseError`) or a file
system error is one ``error:`` line naming the problem and the fix, with its exit code (2 = bad input); an
unexpected exception is one line too, saying it is a bug. ``fedse --debug ...`` (or ``FEDSE_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import os
from typing import NoReturn

import click
import typer
from typer.core import TyperGroup

from fedse_secure import __version__

_debug = {"on": os.environ.get("FEDSE_DEBUG", "") not in ("", "0")}


def _click_error(err: click.ClickException) -> NoReturn:
    """Click's own errors (a missing argument, a value out of range, an unknown command) as one ``error:`` line
    naming the command's help, instead of click's usage box; the exit code stays click's (2 for usage)."""
    from fedse_cli.progress import fail

    message = " ".join(err.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    if isinstance(err, click.UsageError) and err.ctx is not None:
        message += f"; see `{err.ctx.command_path} --help`"
    fail(message, code=err.exit_code)


class _OneLineErrors(TyperGroup):
    """Turns whatever escapes a command into one line and an exit code, never a traceback (unless --debug)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The top level's own options and a missing command are parsed here, before invoke().
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as err:
            _click_error(err)

    def invoke(self, ctx: click.Context):
        from fedse_cli.progress import fail

        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:  # `fedse privacy`: the sub-command's help, as click prints it
            raise
        except click.ClickException as err:
            _click_error(err)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if _debug["on"]:
                raise
            from fedse_secure.errors import FedseError

            if isinstance(err, FedseError):
                fail(str(err) or type(err).__name__, code=err.exit_code)
            if isinstance(err, BrokenPipeError):  # the reader went away (`fedse ... | head`): nothing to say
                raise typer.Exit(141) from None
            if isinstance(err, OSError):
                from fedse_secure.io_utils import storage_error

                fail(str(storage_error(err.filename, err, "use")) if err.filename else
                     f"{err.strerror or err}; check the files and folders the command uses", code=1)
            if isinstance(err, RecursionError):
                fail("an input is nested too deeply to be read (a damaged or hostile file); check the files the "
                     "command reads", code=2)
            fail(f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (this is a bug in "
                 "fedse; rerun with --debug for the traceback and report it)", code=1)


app = typer.Typer(
    name="fedse",
    help="fedse-secure: privacy-hardened federated self-evolution of LLM agents (Fed-SE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_OneLineErrors,
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
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure (for bug reports)."),
) -> None:
    """Run, deploy and audit federated self-evolution of LLM agents with secure aggregation and DP."""
    if debug:
        _debug["on"] = True


def _register_subcommands() -> None:
    # Each area registers its own commands; modules keep heavy imports (torch) inside functions so
    # `fedse --help` stays fast.
    from fedse_cli import audit, deploy, doctor, envs, policy, privacy, run, sweep, threats

    run.register(app)
    sweep.register(app)
    app.add_typer(envs.envs_app, name="envs")
    app.add_typer(privacy.privacy_app, name="privacy")
    app.add_typer(policy.policy_app, name="policy")
    app.add_typer(audit.audit_app, name="audit")
    app.add_typer(audit.adapter_app, name="adapter")
    app.add_typer(threats.threats_app, name="threats")
    deploy.register(app)
    doctor.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
