"""Compliance views of a ledger: ε per round and in total under every registered accountant, the remaining
budget, a plot, and verification with ε recomputed from the events (optionally cross-checked with Google's
dp-accounting). Figures are keyed by accountant name (``privacy.accountants``), so a new accountant shows up
in every report without a format change.

ε is reported at the δ the ledger recorded (the smallest, if it changed); a reader may ask for a smaller δ,
never a larger one, which would make the same events look cheaper. Each accountant's curve over the rounds is
one composition (:meth:`Accountant.curve`), so a report grows about linearly with the ledger. A ledger with a
noiseless step is labelled non-private from that round on: its ε is infinite, and shown as such, never as a
number."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedse_secure.errors import FedseError
from fedse_secure.io_utils import writable_dir
from fedse_secure.privacy.accountants import ACCOUNTANTS, AccountingError, composition_relation, get_accountant
from fedse_secure.privacy.accounting import epsilon_dp_accounting
from fedse_secure.privacy.ledger import LedgerCorruptedError, PrivacyLedger, VerificationReport

DEFAULT_DELTA = 1e-5


class ReportError(FedseError, ValueError):
    """A report cannot be made as asked (e.g. a δ larger than the ledger recorded); the message says why."""


def report_delta(ledger: PrivacyLedger, delta: float | None) -> float:
    """The δ to account a ledger at: the smallest it recorded, or a smaller one the reader asks for."""
    recorded = ledger.recorded_delta()
    if delta is None:
        return recorded if recorded is not None else DEFAULT_DELTA
    if recorded is not None and delta > recorded:
        raise ReportError(
            f"delta={delta:g} is larger than the delta={recorded:g} this ledger's events were accounted at; a larger "
            f"delta would make the same events look cheaper. Pass a delta <= {recorded:g}, or none"
        )
    return delta


@dataclass
class RoundRow:
    round: int
    events: int
    steps: int
    levels: list[str]
    #: accountant -> ε of this round on its own (None where that accountant failed).
    epsilon: dict[str, float | None]
    #: accountant -> ε composed over all rounds so far.
    cumulative: dict[str, float | None]


@dataclass
class PrivacyReport:
    ledger: str
    institution: str | None
    delta: float
    budget: float | None
    head_hash: str
    #: The neighbouring relation the ledger is accounted under (replace-one if any event recorded it).
    neighbouring: str = "add-remove"
    #: First round with a noiseless step (ε infinite from there on: the ledger is non-private); None if none.
    non_private_from_round: int | None = None
    accountants: list[str] = field(default_factory=list)
    rows: list[RoundRow] = field(default_factory=list)
    #: accountant -> composed ε of the whole ledger.
    total: dict[str, float | None] = field(default_factory=dict)
    #: accountant -> why it gave no figures.
    errors: dict[str, str] = field(default_factory=dict)

    def remaining(self, accountant: str) -> float | None:
        spent = self.total.get(accountant)
        if self.budget is None or spent is None:
            return None
        return max(0.0, self.budget - spent)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["remaining"] = {a: self.remaining(a) for a in self.accountants}
        data["private"] = self.non_private_from_round is None
        return _json_safe(data)


def _json_safe(obj: Any) -> Any:
    # Strict JSON: an infinite ε (a non-private ledger) is null, next to the explicit non-private label.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def build_report(ledger: PrivacyLedger, delta: float | None = None, budget: float | None = None,
                 accountants: list[str] | None = None) -> PrivacyReport:
    """Per-round and total ε under every accountant (or the named ones) from a verified ledger, at the ledger's
    δ (``delta`` may only be smaller); ``LedgerCorruptedError`` for a ledger that fails verification."""
    from fedse_secure.privacy.ledger import group_by_round

    entries = ledger.entries()
    grouped = group_by_round(entries)
    delta = report_delta(ledger, delta)
    names = accountants or ACCOUNTANTS.names()
    for name in names:
        ACCOUNTANTS.get(name)  # an unknown name fails here, with the known ones listed
    events = [e.event for e in entries]
    noiseless = next((e.round for e in entries if not e.event.is_noop and e.event.noise_multiplier == 0.0), None)
    report = PrivacyReport(
        ledger=str(ledger.path), institution=entries[0].institution if entries else None, delta=delta,
        budget=budget, head_hash=ledger.head_hash(), neighbouring=composition_relation(events),
        non_private_from_round=noiseless, accountants=names,
    )
    alone: dict[str, list[float | None]] = {}
    cumulative: dict[str, list[float | None]] = {}
    for name in report.accountants:
        acc = get_accountant(name)
        try:
            cumulative[name] = list(acc.curve([evs for _, evs in grouped], delta))
            alone[name] = [acc.epsilon(evs, delta) for _, evs in grouped]
        except AccountingError as err:
            report.errors[name] = str(err)
            alone[name] = cumulative[name] = [None] * len(grouped)
        report.total[name] = cumulative[name][-1] if grouped else 0.0
    for i, (rnd, events) in enumerate(grouped):
        report.rows.append(RoundRow(
            round=rnd, events=len(events), steps=sum(e.steps for e in events), levels=sorted({e.level for e in events}),
            epsilon={a: alone[a][i] for a in report.accountants},
            cumulative={a: cumulative[a][i] for a in report.accountants},
        ))
    return report


def png_target(png_path: str | Path) -> Path:
    """Where a plot may go: a ``.png`` file in a folder that can be written (checked before any work). Any other
    name is refused, so that an output option never replaces a ledger, its head or any other non-plot file."""
    png_path = Path(png_path)
    if png_path.is_dir():
        raise ReportError(f"{png_path} is a folder; name the plot file, e.g. {png_path / 'epsilon.png'}")
    if png_path.suffix.lower() != ".png":
        raise ReportError(f"{png_path}: a plot is written as PNG; name a .png file, e.g. "
                          f"{png_path.with_name(png_path.stem + '.png')}")
    writable_dir(png_path.parent)
    return png_path


def plot_report(report: PrivacyReport, png_path: str | Path) -> Path:
    """PNG of cumulative ε over rounds under every accountant, with the budget line if one is set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedse_secure.report import save_png

    png_path = png_target(png_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    rounds = [r.round for r in report.rows]
    # Accountants often agree closely; distinct dashes and marker sizes keep every curve visible on top of another.
    styles = zip(report.accountants, "osD^v<>", ("-", "--", ":", "-."), (9, 6, 4, 3))
    for name, marker, dash, size in styles:
        points = [(x, r.cumulative[name]) for x, r in zip(rounds, report.rows)
                  if r.cumulative[name] is not None and math.isfinite(r.cumulative[name])]
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle=dash, markersize=size, label=ACCOUNTANTS.get(name).title)
    if report.non_private_from_round is not None:
        ax.axvline(report.non_private_from_round, color="black", linestyle=":",
                   label=f"non-private from round {report.non_private_from_round} (no noise)")
    if report.budget is not None:
        ax.axhline(report.budget, color="red", linestyle="--", label=f"budget ε={report.budget:g}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative ε (δ={report.delta:g}, {report.neighbouring})")
    who = f" — {report.institution}" if report.institution else ""
    ax.set_title(f"Privacy spent{who}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty ledger draws no curve, and has no legend
        ax.legend()
    fig.tight_layout()
    try:
        return save_png(fig, png_path)
    finally:
        plt.close(fig)


@dataclass
class LedgerAudit:
    verification: VerificationReport
    delta: float | None = None
    #: accountant -> ε recomputed from the events (None where that accountant failed).
    epsilon: dict[str, float | None] = field(default_factory=dict)
    epsilon_google_rdp: float | None = None  # dp-accounting, same orders as our rdp accountant
    cross_check_error: str | None = None
    cross_check_ok: bool | None = None

    @property
    def ok(self) -> bool:
        return self.verification.ok and self.cross_check_ok is not False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return _json_safe(data)


def audit_ledger(
    ledger: PrivacyLedger, delta: float | None = None, expected_heads: list[str] | tuple[str, ...] = (),
    cross_check: bool = True,
) -> LedgerAudit:
    """Verify the chain, the sealed head and every externally recorded head (each must head a prefix of the
    ledger), then recompute ε from the events under every accountant at the ledger's δ (and, if asked and
    available, with Google's dp-accounting: its RDP value and ours must agree within 1%)."""
    audit = LedgerAudit(verification=ledger.verify(expected_heads=expected_heads))
    if not audit.verification.ok:
        return audit
    try:
        events = ledger.events()
    except LedgerCorruptedError as err:  # changed between the two reads
        audit.verification = err.report
        return audit
    delta = report_delta(ledger, delta)
    audit.delta = delta
    for name in ACCOUNTANTS.names():
        try:
            audit.epsilon[name] = get_accountant(name).epsilon(events, delta)
        except AccountingError as err:
            audit.epsilon[name] = None
            audit.cross_check_error = str(err)
    if cross_check and composition_relation(events) == "add-remove":
        try:
            audit.epsilon_google_rdp = epsilon_dp_accounting(events, delta)
        except ModuleNotFoundError as err:
            audit.cross_check_error = str(err)
        else:
            a, b = audit.epsilon["rdp"], audit.epsilon_google_rdp
            audit.cross_check_ok = (a == b) or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 0.01 * max(a, b))
            if not audit.cross_check_ok:
                # dp-accounting bounds fractional RDP orders more loosely; at very large ε that exceeds 1%.
                audit.cross_check_ok = a <= b and a > 30
                if audit.cross_check_ok:
                    audit.cross_check_error = (
                        f"dp-accounting gives {b:.4g} vs our {a:.4g}: at this large ε its looser bound on fractional "
                        "RDP orders dominates (ours is the exact series; see tests/test_privacy_accounting.py)"
                    )
    return audit
