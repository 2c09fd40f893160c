"""`fedse report` over several run folders: grouping by experiment, mean ± 95% CI over seeds, one plot."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from fedse_secure.federation.run_folder import RunFolderError
from fedse_secure.report import final_table, group_runs, load_summary, mean_ci95, plot_runs


def _summary(name, mode, seed, maze, wordle):
    rounds = range(len(maze))
    return {
        "name": name, "mode": mode, "seed": seed, "status": "completed",
        "success_by_env": {"maze": {str(r): maze[r] for r in rounds}, "wordle": {str(r): wordle[r] for r in rounds}},
        # micro average over 4 maze + 4 wordle test tasks
        "micro_avg": {str(r): (maze[r] + wordle[r]) / 2 for r in rounds},
    }


def _write(tmp_path, s):
    d = tmp_path / f"{s['name']}-seed{s['seed']}"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_mean_ci95_matches_student_t():
    vals = [0.25, 0.5, 0.75, 0.5]
    mean, half = mean_ci95(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=sum(vals) / 4, scale=stats.sem(vals))
    assert mean == pytest.approx(0.5) and half == pytest.approx((hi - lo) / 2)
    assert mean_ci95([0.3]) == (0.3, 0.0)
    assert all(math.isnan(x) for x in mean_ci95([]))


def test_fedse_and_fedit_in_one_table_and_plot(tmp_path):
    runs = [
        _write(tmp_path, _summary("fedse", "fedse", 0, [0.0, 0.25, 0.5], [0.0, 0.0, 0.25])),
        _write(tmp_path, _summary("fedse", "fedse", 1, [0.0, 0.5, 0.75], [0.0, 0.25, 0.25])),
        _write(tmp_path, _summary("fedit", "fedit", 0, [0.0, 0.25, 0.25], [0.0, 0.0, 0.0])),
        _write(tmp_path, _summary("fedit", "fedit", 1, [0.0, 0.0, 0.25], [0.0, 0.0, 0.0])),
    ]
    summaries = [load_summary(d) for d in runs]
    assert [g.label for g in group_runs(summaries)] == ["fedse (fedse)", "fedit (fedit)"]
    table = final_table(summaries)
    assert table["environments"] == ["maze", "wordle"]
    fedse, fedit = table["rows"]
    assert fedse["seeds"] == 2 and fedse["maze"]["round"] == 2 and fedse["maze"]["n"] == 2
    assert fedse["maze"]["mean"] == pytest.approx(0.625)
    assert fedse["maze"]["ci95"] == pytest.approx(mean_ci95([0.5, 0.75])[1])
    assert fedit["wordle"] == {"round": 2, "mean": 0.0, "ci95": 0.0, "n": 2}
    assert fedse["avg"]["mean"] == pytest.approx((0.375 + 0.5) / 2)
    written = plot_runs(summaries, tmp_path / "plots")
    assert len(written) == 1 and written[0].stat().st_size > 10_000
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunFolderError, match="no summary.json"):
        load_summary(tmp_path)


def test_report_cli_compares_two_runs(tmp_path):
    from typer.testing import CliRunner

    from fedse_cli.main import app

    a = _write(tmp_path, _summary("fedse", "fedse", 0, [0.0, 0.5], [0.0, 0.25]))
    b = _write(tmp_path, _summary("fedit", "fedit", 0, [0.0, 0.25], [0.0, 0.0]))
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--json", "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output.strip().splitlines()[-1])
    assert [r["run"] for r in table["rows"]] == ["fedse (fedse)", "fedit (fedit)"]
    assert (tmp_path / "p" / "success_per_round.png").is_file()
