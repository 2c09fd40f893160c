"""`fedse server|node|federation|certs|keys`: run a real multi-machine federation over Flower 1.42.

A thin shell over :mod:`fedse_secure.federation.flower`; heavy imports stay inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

server_app = typer.Typer(help="The coordinator: a Flower SuperLink with TLS and SuperNode authentication.",
                         no_args_is_help=True)
node_app = typer.Typer(help="One institution: a Flower SuperNode plus the institution's worker.", no_args_is_help=True)
federation_app = typer.Typer(help="Submit and resume federated runs on a running coordinator.", no_args_is_help=True)
certs_app = typer.Typer(help="A local CA and TLS certificates (tests and small pilots).", no_args_is_help=True)
keys_app = typer.Typer(help="Node-authentication and identity keys per institution.", no_args_is_help=True)



def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _say(text: str) -> None:
    # Services run for hours with stdout in a log file: flush every line.
    typer.echo(text)
    sys.stdout.flush()


def _errors() -> type[Exception]:
    from fedse_secure.errors import FedseError

    return FedseError


# -- certs / keys ------------------------------------------------------------------------------------------------
@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca/, coordinator/ and institutions/<name>/."),
    institution: list[str] = typer.Option(..., "--institution", "-i", help="Institution name (repeat)."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost", "::1"], "--host",
                                   help="Names/IPs the SuperLink certificate is valid for (repeat)."),
    # X.509 dates end in 9999; ten years is already longer than a pilot should trust one certificate.
    days: int = typer.Option(365, "--days", min=1, max=3650, help="Days the certificates are valid (at most 3650)."),
    force: bool = typer.Option(False, "--force", help="Replace the existing CA and TLS keys (invalidates every "
                                                      "certificate); without it they are kept and certificates "
                                                      "reissued."),
) -> None:
    """Create a local CA, the SuperLink certificate and each institution's SuperNode certificate."""
    from fedse_secure.federation.flower import pki

    try:
        paths = pki.init_certs(out, institution, hosts=host, days=days, force=force)
    except _errors() as err:
        _fail(err)
    typer.echo(f"CA:        {paths.ca_cert}\nSuperLink: {paths.superlink_cert} (valid for {', '.join(host)})")
    for name, (cert, _key) in paths.supernode_certs.items():
        typer.echo(f"{name}: {cert}")
    typer.echo("Bring your own CA instead: put ca.pem and the certificates at the paths your deployment configs name.")


@keys_app.command("init")
def keys_init(
    out: Path = typer.Option(..., "--out", help="Folder; keys go to institutions/<name>/."),
    institution: list[str] = typer.Option(..., "--institution", "-i", help="Institution name (repeat)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing keys."),
    coordinator: bool = typer.Option(True, "--coordinator/--no-coordinator",
                                     help="Also create the coordinator's adapter-signing identity (kept if it exists)."),
) -> None:
    """Create each institution's Flower node-auth key pair and Ed25519 identity key pair, plus registry.json."""
    from fedse_secure.federation.flower import pki

    try:
        pki.read_registry(Path(out) / "registry.json")  # a damaged registry stops us before any key is made
        paths = pki.init_keys(out, institution, force=force, coordinator=coordinator)
    except _errors() as err:
        _fail(err)
    try:
        names = pki.merge_registry(Path(out) / "registry.json", {
            n: pki.raw_public_bytes(pki.load_identity_public(pub)) for n, (_priv, pub) in paths.identity.items()})
    except _errors() as err:
        _fail(err)
    for name, (node_auth, _pub) in paths.node_auth.items():
        typer.echo(f"{name}: {node_auth} (+.pub), {paths.identity[name][0]} (+.pub)")
    typer.echo(f"identity registry: {Path(out) / 'registry.json'} ({', '.join(names)}; give it to every institution "
               "out of band)")
    if paths.coordinator is not None:
        typer.echo(f"coordinator: {paths.coordinator[0]} signs global adapters; give {paths.coordinator[1]} to every "
                   "institution out of band (coordinator_public_key)")


@keys_app.command("registry")
def keys_registry(
    config: Path = typer.Option(..., "--config", help="Coordinator deployment config."),
    out: Path = typer.Option(..., "--out", help="Where to write registry.json."),
    force: bool = typer.Option(False, "--force", help="Replace an existing registry."),
) -> None:
    """Build registry.json from the identity public keys a coordinator config admits."""
    from fedse_secure.federation.deploy_config import load_coordinator_config
    from fedse_secure.federation.flower import pki
    from fedse_secure.federation.flower.coordinator_loop import load_registry
    from fedse_secure.io_utils import check_output_file

    try:
        # A damaged registry.json may be rebuilt (with --force); any other file is never replaced.
        check_output_file(out, "--out", "an identity registry", "registry.json",
                          lambda p: p.name == "registry.json" or bool(pki.read_registry(p).names()))
        if out.exists() and not force:
            raise pki.PkiError(f"{out} already exists; pass --force to replace it (every institution that pinned it "
                               "needs the new one)")
        reg = load_registry(load_coordinator_config(config))
    except _errors() as err:
        _fail(err)

    try:
        pki.write_public_file(out, (reg.to_json() + "\n").encode())
    except _errors() as err:
        _fail(err)
    typer.echo(f"wrote {out} ({', '.join(reg.names())})")


# -- services ----------------------------------------------------------------------------------------------------
@server_app.command("start")
def server_start(
    config: Path = typer.Option(..., "--config", help="Coordinator deployment config (configs/deploy/coordinator.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Also resubmit the run, continuing after the last checkpoint."),
) -> None:
    """Start the SuperLink (TLS + SuperNode authentication) and admit the configured institutions."""
    from fedse_secure.federation.deploy_config import load_coordinator_config
    from fedse_secure.federation.flower.processes import serve_coordinator

    try:
        cfg = load_coordinator_config(config)
        code = serve_coordinator(cfg, config, resume=resume, say=lambda s: _say(f"[coordinator] {s}"))
    except _errors() as err:
        _fail(err)
    raise typer.Exit(code)


@node_app.command("start")
def node_start(
    config: Path = typer.Option(..., "--config", help="Institution deployment config (configs/deploy/institution-*.yaml)."),
    rejoin_timeout: float = typer.Option(150.0, "--rejoin-timeout", min=0,
                                         help="Seconds to keep retrying while the SuperLink refuses this node."),
) -> None:
    """Start this institution's worker and SuperNode."""
    from fedse_secure.federation.deploy_config import load_institution_config
    from fedse_secure.federation.flower.processes import serve_institution

    try:
        cfg = load_institution_config(config)
        code = serve_institution(cfg, config, rejoin_timeout_s=rejoin_timeout,
                                 say=lambda s: _say(f"[node] {s}"))
    except _errors() as err:
        _fail(err)
    raise typer.Exit(code)


@federation_app.command("run")
def federation_run(
    config: Path = typer.Option(..., "--config", help="Coordinator deployment config."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last checkpointed round."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Follow the run's log until it ends."),
) -> None:
    """Submit the run to the coordinator's SuperLink (which must be running: `fedse server start`)."""
    from fedse_secure.federation.deploy_config import load_coordinator_config
    from fedse_secure.federation.flower.processes import coordinator_running, submit_run

    try:
        cfg = load_coordinator_config(config)
        if not coordinator_running(cfg):
            _fail(RuntimeError(f"no coordinator is running for {config}; start it with `fedse server start --config "
                               f"{config}`"))
        code = submit_run(cfg, config, resume=resume, stream=stream)
    except _errors() as err:
        _fail(err)
    from fedse_secure.federation.run_folder import RunFolder

    run = RunFolder(cfg.resolved_run_dir)
    if stream and run.summary_path.is_file():
        s = run.summary()
        typer.echo(f"run {s.status}: {s.rounds_completed} of {s.rounds_planned} rounds; {run.summary_path}")
        if s.status != "completed":
            raise typer.Exit(1)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
    app.add_typer(node_app, name="node")
    app.add_typer(federation_app, name="federation")
    app.add_typer(certs_app, name="certs")
    app.add_typer(keys_app, name="keys")
