"""`fedse audit verify|report` (an institution's audit trail) and `fedse adapter verify` (a signed adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

audit_app = typer.Typer(
    help="An institution's audit trail: verify its chain and its ledger, and write a report for a compliance reviewer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
adapter_app = typer.Typer(help="Global adapters signed by the coordinator.", no_args_is_help=True,
                          pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2):
    from fedse_cli.progress import fail

    fail(message, code)


def _reviews(folder: Path, run: Path | None, registry: Path | None):
    from fedse_secure.audit.review import ReviewError, review_folder

    try:
        return review_folder(folder, run, registry)
    except ReviewError as err:
        _fail(str(err))


@audit_app.command("verify")
def verify(
    folder: Path = typer.Argument(..., help="An institution's folder (audit.jsonl, privacy_ledger.jsonl) or a run folder."),
    run: Path | None = typer.Option(None, "--run", help="The coordinator's run folder: also check the round "
                                                        "attestations and the ledger heads it recorded."),
    registry: Path | None = typer.Option(None, "--registry", help="registry.json pinning the institutions' keys "
                                                                  "(default: the run folder's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (one object)."),
) -> None:
    """Check the audit log's chain, the ledger's chain, and every recorded ledger head. Exit 1 if anything fails."""
    reviews = _reviews(folder, run, registry)
    ok = all(r.ok for r in reviews)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "institutions": [
            {"folder": str(r.folder), "institution": r.name, "ok": r.ok, "audit_entries": r.audit.entries,
             "audit_problem": r.audit.problem, "audit_first_bad_line": r.audit.first_bad_line,
             "ledger": str(r.ledger_path) if r.ledger_path else None,
             "ledger_ok": None if r.ledger is None else r.ledger.ok,
             "ledger_problem": None if r.ledger is None else r.ledger.problem, "heads_checked": r.heads_checked,
             "attestations_verified": r.attestations_verified, "problems": r.problems} for r in reviews]}))
        raise typer.Exit(0 if ok else 1)
    for r in reviews:
        typer.echo(("OK     " if r.ok else "FAILED ") + (r.name or str(r.folder)))
        for line in r.lines():
            typer.echo(f"  {line}")
    if not ok:
        raise typer.Exit(1)


def _is_html(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(64).lstrip().lower().startswith(b"<!doctype html")


@audit_app.command("report")
def report(
    folder: Path = typer.Argument(..., help="An institution's folder or a run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the HTML page."),
    run: Path | None = typer.Option(None, "--run", help="The coordinator's run folder (round attestations)."),
    registry: Path | None = typer.Option(None, "--registry", help="registry.json pinning the institutions' keys."),
) -> None:
    """A self-contained HTML page for a compliance reviewer: the epsilon curve, what left, when and to whom, the
    refusals, and the node policy in force. Written even when a check fails (the page says which)."""
    from fedse_secure.audit.review import render_html
    from fedse_secure.io_utils import atomic_write_text, check_output_file

    check_output_file(out, "--out", "an HTML report", "report.html", _is_html)  # before the review: nothing to undo
    reviews = _reviews(folder, run, registry)
    atomic_write_text(out, render_html(reviews, str(folder)))
    verdict = "every check passed" if all(r.ok for r in reviews) else "a check FAILED (see the page)"
    typer.echo(f"wrote {out}: {len(reviews)} institution(s), {verdict}")


@adapter_app.command("verify")
def adapter_verify(
    folder: Path = typer.Argument(..., help="An adapter folder (adapter_model.safetensors + signature.json)."),
    public_key: Path | None = typer.Option(None, "--public-key", help="The coordinator's identity public key (PEM) "
                                                                      "to pin; without it the embedded key is used."),
    experiment_hash: str | None = typer.Option(None, "--experiment-hash", help="Also require this experiment."),
) -> None:
    """Check the coordinator's signature over an adapter. Exit 1 if it does not verify."""
    from fedse_secure.audit.attest import SIGNATURE_FILE, SignatureError, verify_adapter
    from fedse_secure.models.adapters import ADAPTER_WEIGHTS, load_adapter_state

    if not (folder / ADAPTER_WEIGHTS).is_file():
        _fail(f"{folder}: no {ADAPTER_WEIGHTS}; pass an adapter folder such as RUN/adapters/final")
    sig_path = folder / SIGNATURE_FILE
    if not sig_path.is_file():
        typer.echo(f"FAILED {folder}: no {SIGNATURE_FILE}: the adapter is not signed")
        raise typer.Exit(1)
    key = None
    if public_key is not None:
        from fedse_secure.federation.flower import pki

        try:
            key = pki.raw_public_bytes(pki.load_identity_public(public_key))
        except pki.PkiError as err:
            _fail(str(err))
    try:
        signed = json.loads(sig_path.read_text())
        state = load_adapter_state(folder)
    except (ValueError, OSError) as err:
        typer.echo(f"FAILED {folder}: unreadable adapter or signature ({err})")
        raise typer.Exit(1) from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        typer.echo(f"FAILED {folder}: the adapter file is damaged ({type(err).__name__}: {err})")
        raise typer.Exit(1) from None
    try:
        statement = verify_adapter(signed, state, public_key=key, experiment_hash=experiment_hash)
    except SignatureError as err:
        typer.echo(f"FAILED {folder}: {err}")
        raise typer.Exit(1) from None
    pinned = "the pinned key" if key is not None else \
        f"the embedded key {signed['public_key'][:16]}... (not pinned: pass --public-key)"
    typer.echo(f"OK {folder}: round {statement['round']} of run {statement['run_key']} (experiment "
               f"{statement['experiment_hash'][:16]}...), signed by {pinned}")
