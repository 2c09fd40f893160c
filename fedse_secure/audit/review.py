"""What a compliance reviewer runs on an institution's folder (its audit log and privacy ledger), optionally
with the coordinator's run folder: ``fedse audit verify`` and ``fedse audit report``.

Checks, per institution:

1. the audit log's chain and sealed head;
2. the privacy ledger's chain and sealed head, and that every ledger head the audit log recorded at an export
   is the head of some prefix of the ledger (a deleted, truncated or rewritten ledger is caught while the log
   survives);
3. with the coordinator's run folder: every round attestation the institution signed verifies against its
   registered identity key, and every ledger head it attested heads a prefix of the ledger (caught even when
   ledger *and* audit log were replaced consistently).
"""

from __future__ import annotations

import base64
import html
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedse_secure.audit.chain import VerificationReport
from fedse_secure.audit.log import AUDIT_FILE, AuditError, AuditLog
from fedse_secure.errors import FedseError


class ReviewError(FedseError, ValueError):
    """The folder to review holds no audit log, or the run folder or registry cannot be read."""


@dataclass
class InstitutionReview:
    folder: Path
    name: str | None
    audit: VerificationReport
    events: list[dict[str, Any]] = field(default_factory=list)
    ledger_path: Path | None = None
    ledger: VerificationReport | None = None
    #: Ledger heads recorded elsewhere that were checked against the ledger: source -> count.
    heads_checked: dict[str, int] = field(default_factory=dict)
    attestations_verified: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.audit.ok and (self.ledger is None or self.ledger.ok) and not self.problems

    def lines(self) -> list[str]:
        who = self.name or self.folder.name
        out = [f"{who}: audit log {self.audit.summary()}"]
        if self.ledger is not None:
            out.append(f"{who}: ledger {self.ledger.summary()}")
        for source, n in self.heads_checked.items():
            out.append(f"{who}: {n} ledger head(s) from {source} checked against the ledger")
        if self.attestations_verified:
            out.append(f"{who}: {self.attestations_verified} round attestation(s) verified against the registry")
        out.extend(f"{who}: PROBLEM: {p}" for p in self.problems)
        return out


def institution_folders(path: str | Path) -> list[Path]:
    """The institution folders under ``path``: itself if it holds an audit log, else ``institutions/*`` of a
    run folder, else its subfolders that hold one."""
    path = Path(path)
    if not path.is_dir():
        raise ReviewError(f"{path}: no such folder; pass an institution's folder (with {AUDIT_FILE}) or a run folder")
    if (path / AUDIT_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in (path / "institutions").glob(f"*/{AUDIT_FILE}"))
    found = found or sorted(p.parent for p in path.glob(f"*/{AUDIT_FILE}"))
    if not found:
        raise ReviewError(f"{path}: no {AUDIT_FILE} here, in institutions/*/ or in a subfolder; an institution writes "
                          "it next to its privacy ledger")
    return found


def _run_folder_of(folder: Path) -> Path | None:
    """A simulation keeps institutions under RUN/institutions/<name>: the run folder, if this is one."""
    run = folder.parent.parent
    return run if folder.parent.name == "institutions" and (run / "metrics.jsonl").is_file() else None


def _attestations(run_dir: Path, name: str) -> list[tuple[int, dict[str, Any]]]:
    from fedse_secure.federation.run_folder import RunFolder

    out = []
    try:
        records = RunFolder(run_dir).records()
    except (OSError, ValueError) as err:
        raise ReviewError(f"{run_dir}: cannot read its round records ({err})") from None
    for record in records:
        inst = record.institutions.get(name)
        if inst is not None and isinstance(inst.report, dict) and "attestation" in inst.report:
            out.append((record.round, inst.report["attestation"]))
    return out


def review_institution(folder: str | Path, run_dir: str | Path | None = None,
                       registry_path: str | Path | None = None) -> InstitutionReview:
    from fedse_secure.audit.attest import ROUND_ATTESTATION, SignatureError, verify
    from fedse_secure.privacy.ledger import PrivacyLedger

    folder = Path(folder)
    log = AuditLog(folder / AUDIT_FILE)
    review = InstitutionReview(folder=folder, name=None, audit=log.verify())
    if not review.audit.ok:
        return review
    review.events = log.records()
    review.name = review.events[0]["institution"] if review.events else None
    recorded = [e["data"]["ledger"] for e in review.events if e["kind"] == "session" and e["data"].get("ledger")]
    # A ledger beside the log is recorded by its name (resolved here), one elsewhere by its absolute path.
    ledger_path = folder / (recorded[-1] if recorded else "privacy_ledger.jsonl")
    review.ledger_path = ledger_path
    heads = [e["data"].get("privacy", {}).get("ledger_head") for e in review.events if e["kind"] == "export"]
    heads = [h for h in heads if h]
    if run_dir and not (Path(run_dir) / "metrics.jsonl").is_file():
        # Silently skipping the attestation check would report OK for less than was asked.
        raise ReviewError(f"--run {run_dir}: not a run folder (no metrics.jsonl); pass the coordinator's run folder "
                          "(the --out of `fedse simulate`, or run_dir in a deployment)")
    run_dir = Path(run_dir) if run_dir else _run_folder_of(folder)
    attested: list[str] = []
    if run_dir is not None and review.name:
        registry = _registry(run_dir, registry_path)
        for round_id, att in _attestations(run_dir, review.name):
            try:
                key = registry.public_bytes(review.name) if registry is not None else None
                statement = verify(att, ROUND_ATTESTATION, key, what=f"round {round_id} attestation")
            except (SignatureError, FedseError) as err:
                review.problems.append(str(err))
                continue
            if statement.get("institution") != review.name or statement.get("round") != round_id:
                review.problems.append(f"round {round_id}: the attestation is for {statement.get('institution')!r} "
                                       f"round {statement.get('round')!r}; it was moved between records")
                continue
            review.attestations_verified += 1
            if statement.get("ledger_head"):
                attested.append(statement["ledger_head"])
        if registry is None and review.attestations_verified:
            review.problems.append(f"{run_dir}: no registry.json to pin the institutions' keys (pass --registry); the "
                                   "attestations were checked against the keys they carry only")
    if heads or attested or ledger_path.exists():
        if not ledger_path.exists():
            review.problems.append(f"the privacy ledger {ledger_path} is missing, but {len(heads) + len(attested)} "
                                   "ledger head(s) were recorded for it: it was deleted")
        else:
            review.ledger = PrivacyLedger(ledger_path).verify(expected_heads=[*heads, *attested])
            if heads:
                review.heads_checked["the audit log"] = len(heads)
            if attested:
                review.heads_checked[f"the coordinator's round records ({run_dir})"] = len(attested)
    return review


def _registry(run_dir: Path, registry_path: str | Path | None):
    from fedse_secure.secagg.masking.identity import PublicKeyRegistry

    path = Path(registry_path) if registry_path else run_dir / "registry.json"
    if not path.is_file():
        if registry_path:
            raise ReviewError(f"{path}: no such registry file")
        return None
    try:
        return PublicKeyRegistry.from_json(path.read_text())
    except (ValueError, TypeError, AttributeError) as err:
        raise ReviewError(f"{path}: not a registry of hex Ed25519 keys ({err})") from None


# ======================================================================================================
# The HTML report
# ======================================================================================================

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;width:100%;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.wide{overflow-wrap:anywhere;width:55%}td.nowrap{white-space:nowrap}
.reason{white-space:pre-wrap;font-family:monospace;font-size:.85em;overflow-wrap:anywhere}
.ok{color:#fff;background:#2e7d32;padding:.1em .5em;border-radius:4px}
.bad{color:#fff;background:#c62828;padding:.1em .5em;border-radius:4px}
.muted{color:#666}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
code{font-size:.9em}img{max-width:100%;border:1px solid #ddd}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _when(ts: str) -> str:
    try:
        return datetime.fromisoformat(ts).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(ts)


def _fmt_eps(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _statistics(report: dict[str, Any]) -> str:
    if not report:
        return '<span class="muted">protocol message only</span>'
    keys: list[str] = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if k in ("withheld", "attestation"):
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}={v}")

    walk(report)
    text = _e(", ".join(keys))
    if "attestation" in report:
        text += "; signed round attestation"
    if report.get("withheld"):
        text += f'<br><span class="muted">withheld by policy: {_e(", ".join(report["withheld"]))}</span>'
    return text


def _epsilon_png(ledger_path: Path, budget: float | None) -> tuple[str | None, Any]:
    from fedse_secure.privacy.ledger import PrivacyLedger
    from fedse_secure.privacy.report import build_report, plot_report

    ledger = PrivacyLedger(ledger_path)
    report = build_report(ledger, None, budget)
    if not report.rows:
        return None, report
    with tempfile.TemporaryDirectory(prefix="fedse-audit-") as tmp:
        png = plot_report(report, Path(tmp) / "epsilon.png")
        return base64.b64encode(png.read_bytes()).decode(), report


def _section(review: InstitutionReview) -> str:
    name = review.name or review.folder.name
    badge = '<span class="ok">verified</span>' if review.ok else '<span class="bad">FAILED</span>'
    parts = [f"<h2>{_e(name)} {badge}</h2>", "<ul>"]
    parts += [f"<li>{_e(line.split(': ', 1)[1])}</li>" for line in review.lines()]
    parts.append("</ul>")
    sessions = [e for e in review.events if e["kind"] == "session"]
    exports = [e for e in review.events if e["kind"] == "export"]
    refusals = [e for e in review.events if e["kind"] == "refusal"]
    budget = None
    if sessions and sessions[-1]["data"].get("privacy"):
        budget = sessions[-1]["data"]["privacy"].get("epsilon_budget")

    parts.append("<h3>Privacy spent</h3>")
    if review.ledger is not None and review.ledger.ok:
        png, report = _epsilon_png(review.ledger_path, budget)
        if png:
            parts.append(f'<img alt="cumulative epsilon over rounds" src="data:image/png;base64,{png}">')
            acc = [a for a in report.accountants if report.total.get(a) is not None]
            totals = ", ".join(f"{a.upper()} {_fmt_eps(report.total[a])}" for a in acc)
            label = "" if report.non_private_from_round is None else \
                f" <b>Non-private from round {report.non_private_from_round}</b> (a step without noise)."
            parts.append(f"<p>Total epsilon at delta={report.delta:g} ({_e(report.neighbouring)}): {_e(totals)}"
                         f"{'' if budget is None else f'; budget {budget:g}'}.{label} Ledger "
                         f"<code>{_e(review.ledger_path)}</code>, {review.ledger.entries} events, head "
                         f"<code>{_e((review.ledger.head_hash or '')[:16])}…</code>.</p>")
        else:
            parts.append("<p class=muted>The ledger records no DP event (no round under a DP mechanism).</p>")
    elif review.ledger is None:
        parts.append("<p class=muted>No privacy ledger: this institution ran no DP mechanism.</p>")
    else:
        parts.append(f"<p><span class=bad>ledger failed verification</span> {_e(review.ledger.summary())}</p>")

    parts.append(f"<h3>What left the institution ({len(exports)} messages)</h3>")
    if exports:
        parts.append("<table><tr><th>time</th><th>round</th><th>stage</th><th>to</th><th>bytes</th><th>SHA-256</th>"
                     "<th>epsilon after</th><th>statistics that left</th></tr>")
        for e in exports:
            d = e["data"]
            privacy = d.get("privacy") or {}
            eps = ""
            if "epsilon_spent" in privacy or "mechanism" in privacy:
                eps = (f"{_fmt_eps(privacy.get('epsilon_spent'))} (δ={privacy.get('delta', '')}, "
                       f"{privacy.get('accountant', '')})" if privacy.get("mechanism") not in (None, "none")
                       else "no DP")
            peers = d.get("peers")
            to = _e(d.get("recipient", "coordinator")) + (f"<br><span class=muted>peers: {_e(', '.join(peers))}"
                                                         "</span>" if peers else "")
            parts.append(f"<tr><td>{_e(_when(e['time']))}</td><td>{_e(d.get('round'))}</td><td class=nowrap>"
                         f"{_e(d.get('stage'))}</td><td>{to}</td><td>{_e(d.get('bytes'))}</td><td><code>"
                         f"{_e(str(d.get('sha256'))[:12])}…</code></td><td>{_e(eps)}</td>"
                         f"<td class=wide>{_statistics(d.get('report') or {})}</td></tr>")
        parts.append("</table>")
        firsts = [e for e in exports if e["data"].get("protocol")]
        if firsts:
            proto = firsts[-1]["data"]["protocol"]
            parts.append(f"<p>Secure aggregation: {_e(proto.get('backend'))}, {_e(proto.get('participants'))} "
                         f"participants, threshold {_e(proto.get('threshold', 'n/a'))}, degree "
                         f"{_e(proto.get('degree', 'n/a'))}; a released sum holds at least "
                         f"{_e(proto.get('min_contributors'))} contributions.</p>")
    parts.append(f"<h3>Refusals ({len(refusals)})</h3>")
    if refusals:
        parts.append("<table><tr><th>time</th><th>round</th><th>stage</th><th>reason</th></tr>")
        for e in refusals:
            d = e["data"]
            parts.append(f"<tr><td class=nowrap>{_e(_when(e['time']))}</td><td>{_e(d.get('round'))}</td>"
                         f"<td class=nowrap>{_e(d.get('stage'))}</td><td class=wide><div class=reason>"
                         f"{_e(d.get('reason'))}</div></td></tr>")
        parts.append("</table>")
    parts.append(f"<h3>Experiments seen ({len(sessions)})</h3>")
    if sessions:
        parts.append("<table><tr><th>time</th><th>run</th><th>experiment SHA-256</th><th>decision</th>"
                     "<th>privacy in force</th></tr>")
        for e in sessions:
            d = e["data"]
            decision = "accepted" if d.get("accepted") else "refused:<br>" + "<br>".join(_e(v) for v in d["violations"])
            if d.get("adjustments"):
                decision += "<br><span class=muted>" + "<br>".join(_e(a) for a in d["adjustments"]) + "</span>"
            p = d.get("privacy") or d.get("requested_privacy") or {}
            keys = ("mode", "noise_multiplier", "delta", "epsilon_budget", "accountant", "neighbouring")
            priv = ", ".join(f"{k}={p.get(k)}" for k in keys if k in p)
            parts.append(f"<tr><td>{_e(_when(e['time']))}</td><td><code>{_e(d.get('run_key'))}</code></td>"
                         f"<td><code>{_e(str(d.get('experiment_hash'))[:16])}…</code></td><td>{decision}</td>"
                         f"<td>{_e(priv)}</td></tr>")
        parts.append("</table>")
        import yaml

        latest = sessions[-1]["data"]
        parts.append(f"<h3>Policy in force</h3><p>From <code>{_e(latest.get('policy_source'))}</code>, SHA-256 "
                     f"<code>{_e(latest.get('policy_sha256'))}</code>.</p>")
        parts.append(f"<pre>{_e(yaml.safe_dump(latest.get('policy'), sort_keys=False))}</pre>")
    return "\n".join(parts)


def render_html(reviews: list[InstitutionReview], source: str) -> str:
    ok = all(r.ok for r in reviews)
    head = ('<span class="ok">every check passed</span>' if ok else '<span class="bad">a check FAILED</span>')
    names = ", ".join(_e(r.name or r.folder.name) for r in reviews)
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [f"<h1>Audit report: {names}</h1>",
            f"<p>{head}. Source <code>{_e(source)}</code>; generated {_e(generated)}"
            " by <code>fedse audit report</code>. Each section lists what left one institution, when and to whom, "
            "the epsilon it spent, what it refused, and the node policy it enforced.</p>"]
    body += [_section(r) for r in reviews]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Audit report: {names}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def review_folder(path: str | Path, run_dir: str | Path | None = None,
                  registry_path: str | Path | None = None) -> list[InstitutionReview]:
    return [review_institution(f, run_dir, registry_path) for f in institution_folders(path)]


__all__ = ["AuditError", "InstitutionReview", "ReviewError", "institution_folders", "render_html",
           "review_folder", "review_institution"]
