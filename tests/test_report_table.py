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
    assert fedit["wordle"] == {"round": 2, "mean": 0.0, "ci95": 0.0, "n": 2,
                               "first": {"round": 0, "mean": 0.0, "ci95": 0.0, "n": 2}}
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


def test_a_report_over_several_runs_plots_beside_them_not_inside_one(tmp_path):
    from typer.testing import CliRunner

    from fedse_cli.main import app

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    a = _write(sweep, _summary("fedse", "fedse", 0, [0.0, 0.5], [0.0, 0.25]))
    b = _write(sweep, _summary("fedit", "fedit", 0, [0.0, 0.25], [0.0, 0.0]))
    result = CliRunner().invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert (sweep / "success_per_round.png").is_file()
    assert sorted(p.name for p in a.iterdir()) == ["summary.json"]
    result = CliRunner().invoke(app, ["report", str(a)])
    assert result.exit_code == 0, result.output
    assert (a / "success_per_round.png").is_file()


def test_the_table_shows_the_first_round_and_the_difference_to_a_baseline_has_a_paired_ci(tmp_path):
    from fedse_secure.report import differences

    fedse = [[0.0, 0.5, 0.75], [0.25, 0.5, 1.0], [0.0, 0.25, 0.5]]
    fedit = [[0.0, 0.25, 0.25], [0.25, 0.25, 0.5], [0.0, 0.0, 0.5]]
    runs = [_write(tmp_path, _summary("fedse", "fedse", seed, m, [0.0] * 3)) for seed, m in enumerate(fedse)]
    runs += [_write(tmp_path, _summary("fedit", "fedit", seed, m, [0.0] * 3)) for seed, m in enumerate(fedit)]
    summaries = [load_summary(d) for d in runs]
    row = final_table(summaries)["rows"][0]
    assert row["maze"]["first"] == {"round": 0, "mean": pytest.approx(0.25 / 3), "ci95": pytest.approx(
        mean_ci95([0.0, 0.25, 0.0])[1]), "n": 3}
    (d,) = differences(summaries, "fedit (fedit)")["rows"]
    per_seed = [0.75 - 0.25, 1.0 - 0.5, 0.5 - 0.5]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(per_seed) / 3, scale=stats.sem(per_seed))
    assert d["maze"]["paired"] and d["maze"]["mean"] == pytest.approx(1 / 3)
    assert d["maze"]["ci95"] == pytest.approx((hi - lo) / 2) and d["maze"]["above_zero"] is bool(lo > 0)
    assert d["wordle"]["mean"] == 0.0 and d["wordle"]["above_zero"] is False
    # Different seeds: Welch's interval, as scipy computes it.
    other = _write(tmp_path, _summary("local", "local", 7, [0.0, 0.0, 0.25], [0.0] * 3))
    other2 = _write(tmp_path, _summary("local", "local", 8, [0.0, 0.0, 0.75], [0.0] * 3))
    rows = differences(summaries + [load_summary(other), load_summary(other2)], "fedit (fedit)")["rows"]
    local = next(r for r in rows if r["run"] == "local (local)")
    welch = stats.ttest_ind([0.25, 0.75], [0.25, 0.5, 0.5], equal_var=False).confidence_interval(0.95)
    assert not local["maze"]["paired"] and local["maze"]["ci95"] == pytest.approx((welch.high - welch.low) / 2)
    with pytest.raises(ValueError, match="no run group 'nope'"):
        differences(summaries, "nope")


def test_report_cli_prints_the_difference_to_the_baseline(tmp_path):
    from typer.testing import CliRunner

    from fedse_cli.main import app

    runs = [str(_write(tmp_path, _summary(n, n, s, m, [0.0, 0.0]))) for n, s, m in
            [("fedse", 0, [0.0, 0.5]), ("fedse", 1, [0.0, 0.75]), ("fedit", 0, [0.0, 0.25]), ("fedit", 1, [0.0, 0.25])]]
    result = CliRunner().invoke(app, ["report", *runs, "--json", "--baseline", "fedit (fedit)",
                                      "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["differences"][0]["avg"]["mean"] == pytest.approx((0.25 + 0.5) / 4)
    bad = CliRunner().invoke(app, ["report", *runs, "--baseline", "fedavg"])
    assert bad.exit_code != 0 and "no run group 'fedavg'" in bad.output


def test_one_seed_per_group_gives_a_difference_without_an_interval():
    from fedse_secure.report import difference

    for paired in (True, False):
        mean, ci = difference([0.4], [0.2], paired)
        assert mean == pytest.approx(0.2) and math.isnan(ci)
