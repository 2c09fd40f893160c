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
    """Rows per group: the last evaluated round's success per environment and the micro average."""
    envs = environments(summaries)
    rows = []
    for g in group_runs(summaries):
        row: dict[str, Any] = {"run": g.label, "seeds": len(g.runs)}
        for env in envs + [None]:
            series = g.series(env)
            key = env or "avg"
            if series:
                last = max(series)
                mean, ci, n = series[last]
                row[key] = {"round": last, "mean": mean, "ci95": ci, "n": n}
            else:
                row[key] = None
        rows.append(row)
    return {"environments": envs, "rows": rows}


def plot_runs(summaries: list[RunSummary], out_dir: str | Path) -> list[Path]:
    """One PNG per environment plus the micro average: success per round, one line per group, CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        ax.set_xlabel("round")
        ax.set_ylabel("success (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "success_per_round.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
