"""Reports over one or more run folders: a table and PNG plots of success per environment per round.

Several runs of the same experiment with different seeds are grouped (by run name and mode) and shown as a
mean with a 95% confidence interval (Student t), which the paper does not report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedse_secure.federation.run_folder import RunFolder, RunSummary
from fedse_secure.io_utils import atomic_write_bytes, ensure_dir


def load_summary(run_dir: str | Path) -> RunSummary:
    """The typed summary of a run folder, simulated or deployed alike (``RunFolderError`` if there is none)."""
    return RunFolder(run_dir).summary()


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t interval (0 half-width for a single value)."""
    from scipy.stats import t as student_t

    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, float(student_t.ppf(0.975, n - 1)) * math.sqrt(var / n)


@dataclass
class Group:
    label: str
    runs: list[RunSummary] = field(default_factory=list)

    def series(self, env: str | None) -> dict[int, tuple[float, float, int]]:
        """round -> (mean, ci half-width, number of runs) for one environment (None = micro average)."""
        per_round: dict[int, list[float]] = defaultdict(list)
        for s in self.runs:
            table = s.micro_avg if env is None else s.success_by_env.get(env, {})
            for r, v in table.items():
                if v is not None:
                    per_round[int(r)].append(float(v))
        return {r: (*mean_ci95(vs), len(vs)) for r, vs in sorted(per_round.items())}


def group_runs(summaries: list[RunSummary]) -> list[Group]:
    groups: dict[str, Group] = {}
    for s in summaries:
        label = f"{s.name} ({s.mode})"
        groups.setdefault(label, Group(label)).runs.append(s)
    return list(groups.values())


def environments(summaries: list[RunSummary]) -> list[str]:
    envs: list[str] = []
    for s in summaries:
        for e in s.success_by_env:
            if e not in envs:
                envs.append(e)
    return envs


def final_table(summaries: list[RunSummary]) -> dict[str, Any]:
    """Rows per group: the last evaluated round's success per environment and the micro average, each with the
    first evaluated round's (round 0 when the initial adapter was evaluated) under ``first``."""
    envs = environments(summaries)
    rows = []
    for g in group_runs(summaries):
        row: dict[str, Any] = {"run": g.label, "seeds": len(g.runs)}
        for env in envs + [None]:
            series = g.series(env)
            key = env or "avg"
            if series:
                last, first = max(series), min(series)
                mean, ci, n = series[last]
                row[key] = {"round": last, "mean": mean, "ci95": ci, "n": n,
                            "first": {"round": first, "mean": series[first][0], "ci95": series[first][1],
                                      "n": series[first][2]}}
            else:
                row[key] = None
        rows.append(row)
    return {"environments": envs, "rows": rows}


def _last_by_seed(group: Group, env: str | None) -> dict[int, float]:
    """seed -> success at that run's last evaluated round (one environment, or the micro average)."""
    out = {}
    for s in group.runs:
        table = s.micro_avg if env is None else s.success_by_env.get(env, {})
        done = {int(r): v for r, v in table.items() if v is not None}
        if done:
            out[s.seed] = float(done[max(done)])
    return out


def difference(a: list[float], b: list[float], paired: bool) -> tuple[float, float]:
    """Mean of a - b and the half-width of its two-sided 95% Student-t interval: over the per-seed differences
    when ``paired`` (the same seeds, hence the same demonstrations and test tasks), else Welch's interval."""
    from scipy.stats import ttest_ind

    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan  # a single run has no spread to estimate
    if paired:
        return mean_ci95([x - y for x, y in zip(a, b)])
    if len(set(a)) == 1 and len(set(b)) == 1:
        return diff, 0.0  # scipy answers nan for zero spread
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return diff, float(ci.high - ci.low) / 2


def differences(summaries: list[RunSummary], baseline: str) -> dict[str, Any]:
    """Every other group minus ``baseline`` (a group label, e.g. ``"fedit (fedit)"``) at the last evaluated round,
    per environment and micro-averaged: mean and 95% CI of the difference, paired by seed where both groups ran
    the same seeds."""
    groups = {g.label: g for g in group_runs(summaries)}
    if baseline not in groups:
        raise ValueError(f"no run group {baseline!r} to compare against; choose one of {sorted(groups)}")
    envs = environments(summaries)
    rows = []
    for label, g in groups.items():
        if label == baseline:
            continue
        row: dict[str, Any] = {"run": label, "baseline": baseline}
        for env in envs + [None]:
            mine, theirs = _last_by_seed(g, env), _last_by_seed(groups[baseline], env)
            if not mine or not theirs:
                row[env or "avg"] = None
                continue
            paired = set(mine) == set(theirs)
            seeds = sorted(mine)
            a = [mine[s] for s in seeds]
            b = [theirs[s] for s in seeds] if paired else list(theirs.values())
            mean, ci = difference(a, b, paired)
            finite = math.isfinite(ci)
            row[env or "avg"] = {"mean": mean, "ci95": ci if finite else None, "n": len(a), "paired": paired,
                                 "above_zero": bool(mean - ci > 0) if len(a) > 1 and finite else None}
        rows.append(row)
    return {"environments": envs, "rows": rows}


def save_png(fig, path: str | Path, dpi: float | str = "figure") -> Path:
    """Write a matplotlib figure as PNG atomically (readers see the old plot or the new one, never half)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_runs(summaries: list[RunSummary], out_dir: str | Path) -> list[Path]:
    """One PNG per environment plus the micro average: success per round, one line per group, CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = ensure_dir(out_dir)
    envs = environments(summaries)
    groups = group_runs(summaries)
    panels = envs + [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    written = []
    for ax, env in zip(axes[0], panels):
        for g in groups:
            series = g.series(env)
            if not series:
                continue
            rounds = sorted(series)
            means = [100 * series[r][0] for r in rounds]
            cis = [100 * series[r][1] for r in rounds]
            ax.plot(rounds, means, marker="o", label=g.label)
            if any(cis):
                ax.fill_between(rounds, [m - c for m, c in zip(means, cis)], [m + c for m, c in zip(means, cis)], alpha=0.2)
        ax.set_title(env or "micro average")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("success (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # no evaluated round: no lines, and no legend to draw
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    try:
        path = save_png(fig, out_dir / "success_per_round.png", dpi=110)
    finally:
        plt.close(fig)
    written.append(path)
    return written
