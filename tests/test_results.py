"""The committed experiment results are what their READMEs say: every run a README reports is in the repository,
holds only its summary, metrics and config (no adapter, key or registry), and `fedse report`'s arithmetic over
those runs gives the numbers the README prints.

A `.gitignore` rule once kept a results folder's runs out of a commit while its README said they were there;
this is the check that would have caught it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedse_secure.report import differences, final_table, load_summary

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUN_FILES = {"summary.json", "metrics.jsonl", "config.yaml"}
WEBSHOP = RESULTS / "cpu-evidence" / "webshop"
EPOCH_LEVER_ROWS = {
    "epoch1": {"cpu-evidence-webshop-fedit-rounds8-epoch1 (fedit)": "FedIT, 8 rounds, one epoch a round",
               "cpu-evidence-webshop-fedse-rounds8-epoch1 (fedse)": "Fed-SE, 8 rounds, one epoch a round"},
    "epoch2": {"cpu-evidence-webshop-fedit-rounds8-epoch2 (fedit)": "FedIT, two epochs a round",
               "cpu-evidence-webshop-fedse-rounds8-epoch2 (fedse)": "Fed-SE, two epochs a round"}}


def _run_folders() -> list[Path]:
    # more-seeds/: runs added to an experiment after its pre-registered seeds were seen, kept apart from them.
    return sorted(p.parent for pattern in ("**/runs/*/summary.json", "**/more-seeds/*/summary.json")
                  for p in RESULTS.glob(pattern))


def test_every_committed_run_holds_its_summary_metrics_and_config_and_nothing_secret():
    folders = _run_folders()
    assert folders, "no committed runs under results/"
    for run in folders:
        present = {p.name for p in run.iterdir()}
        assert present == RUN_FILES, (run, sorted(present))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed", (run, summary["status"])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["round"] for r in records) == summary["rounds_completed"], run


def _pct(x: float) -> str:
    return f"{100 * x:.1f}".replace("-", "−")


def _assert_readme_shows(readme: str, summaries: list, shown: dict[str, str], baseline: str, seeds: int) -> None:
    """The README's "| name | first → last ± CI |" line for each run group (``shown`` maps the group's label to the
    name the README gives it), and its bold Fed-SE − baseline difference, paired over ``seeds`` seeds."""
    rows = {row["run"]: row["avg"] for row in final_table(summaries)["rows"]}
    for label, name in shown.items():
        cell = rows[label]
        assert cell["n"] == seeds, (label, cell)
        line = f"| {name} | {_pct(cell['first']['mean'])} → {_pct(cell['mean'])} ± {_pct(cell['ci95'])} |"
        assert line in readme, line
    (diff,) = differences(summaries, baseline)["rows"]
    d = diff["avg"]
    assert d["paired"] and d["n"] == seeds
    difference = f"{'+' if d['mean'] >= 0 else '−'}{abs(100 * d['mean']):.1f} ± {100 * d['ci95']:.1f}"
    assert f"**{difference}**" in readme, difference


def _completed_rounds(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["status"] == "completed"]


def _exploration_successes(records: list[dict]) -> list[int]:
    """Successful exploration episodes per round, summed over the institutions."""
    return [sum(i["report"]["explore"]["successes"] for i in r["institutions"].values()) for r in records]


def _goals_solved(summaries, at_round: str) -> dict[tuple[str, int], int]:
    """Held-out goals solved of WebShop-simple's 24 at ``at_round``, by (method, seed)."""
    return {(s.mode, s.seed): round(24 * s.micro_avg[at_round]) for s in summaries}


def test_the_webshop_evidence_readme_reports_what_its_ten_runs_give():
    runs = sorted((WEBSHOP / "runs").glob("cpu-evidence-webshop-*-seed*"))
    assert [r.name for r in runs] == sorted(f"cpu-evidence-webshop-{m}-seed{s}" for m in ("fedse", "fedit")
                                            for s in range(5)), [r.name for r in runs]
    readme = (WEBSHOP / "README.md").read_text()
    summaries = [load_summary(r) for r in runs]
    _assert_readme_shows(readme, summaries, {"cpu-evidence-webshop-fedit (fedit)": "FedIT",
                                             "cpu-evidence-webshop-fedse (fedse)": "Fed-SE"},
                         "cpu-evidence-webshop-fedit (fedit)", seeds=5)
    # The per-seed table: test goals solved of 24 after round 4, FedIT then Fed-SE.
    solved = _goals_solved(summaries, "4")
    for seed in range(5):
        fedit, fedse = solved[("fedit", seed)], solved[("fedse", seed)]
        assert f"| {seed} | {fedit} | {fedse} |" in readme, (seed, fedit, fedse)


@pytest.mark.parametrize("run", _run_folders(), ids=lambda p: p.name)
def test_a_committed_run_reports_the_seed_and_config_it_ran(run):
    import yaml

    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (summary["name"], summary["seed"], summary["mode"]) == (config["name"], config["seed"],
                                                                   config["federation"]["mode"])


def test_the_exploration_lever_readme_reports_what_its_runs_give_against_fedit():
    """Fed-SE with 16 exploration episodes a round (seeds 0-3) against the FedIT runs of the same seeds."""
    folder = RESULTS / "cpu-evidence" / "webshop-explore16"
    runs = sorted((folder / "runs").glob("cpu-evidence-webshop-fedse-explore16-seed*"))
    assert [r.name[-1] for r in runs] == ["0", "1", "2", "3"]
    baseline = [WEBSHOP / "runs" / f"cpu-evidence-webshop-fedit-seed{s}" for s in range(4)]
    summaries = [load_summary(r) for r in runs + baseline]
    readme = (folder / "README.md").read_text()
    _assert_readme_shows(readme, summaries, {
        "cpu-evidence-webshop-fedit (fedit)": "FedIT, seeds 0-3",
        "cpu-evidence-webshop-fedse-explore16 (fedse)": "Fed-SE, 16 episodes a round",
    }, "cpu-evidence-webshop-fedit (fedit)", seeds=4)
    # Per seed: goals solved by FedIT, Fed-SE with 4 episodes (../webshop/) and with 16, then the 16-episode run's
    # exploration successes per round and each retailer's final buffer in the order the header names.
    four = _goals_solved((load_summary(WEBSHOP / "runs" / f"cpu-evidence-webshop-fedse-seed{s}") for s in range(4)),
                         "4")
    solved = _goals_solved(summaries, "4")
    for seed, run in enumerate(runs):
        records = _completed_rounds(run)
        found = _exploration_successes(records)
        buffers = [records[-1]["institutions"][f"retailer-{n}"]["report"]["explore"]["buffer_size"]
                   for n in ("north", "south", "east")]
        row = (f"| {seed} | {solved[('fedit', seed)]} | {four[('fedse', seed)]} | {solved[('fedse', seed)]} | "
               f"{', '.join(map(str, found))} | {', '.join(map(str, buffers))} |")
        assert row in readme, row
    assert "| exploration successes, rounds 1-4 | buffer at the end (north, south, east) |" in readme


def test_the_rounds_lever_readme_reports_what_its_runs_give():
    """Both methods run for 8 rounds instead of 4 (seeds 0-2), paired by seed; the per-seed row also shows what the
    same seeds solved after 4 rounds (../webshop/) and what Fed-SE's exploration found each round."""
    folder = RESULTS / "cpu-evidence" / "webshop-rounds8"
    runs = sorted((folder / "runs").glob("cpu-evidence-webshop-*-rounds8-seed*"))
    assert [r.name for r in runs] == sorted(f"cpu-evidence-webshop-{m}-rounds8-seed{s}" for m in ("fedse", "fedit")
                                            for s in range(3)), [r.name for r in runs]
    summaries = [load_summary(r) for r in runs]
    readme = (folder / "README.md").read_text()
    _assert_readme_shows(readme, summaries, {"cpu-evidence-webshop-fedit-rounds8 (fedit)": "FedIT, 8 rounds",
                                             "cpu-evidence-webshop-fedse-rounds8 (fedse)": "Fed-SE, 8 rounds"},
                         "cpu-evidence-webshop-fedit-rounds8 (fedit)", seeds=3)
    four = _goals_solved((load_summary(WEBSHOP / "runs" / f"cpu-evidence-webshop-{m}-seed{k}")
                          for m in ("fedse", "fedit") for k in range(3)), "4")
    eight = _goals_solved(summaries, "8")
    for seed in range(3):
        found = _exploration_successes(
            _completed_rounds(folder / "runs" / f"cpu-evidence-webshop-fedse-rounds8-seed{seed}"))
        row = (f"| {seed} | {four[('fedit', seed)]} | {eight[('fedit', seed)]} | {four[('fedse', seed)]} | "
               f"{eight[('fedse', seed)]} | {', '.join(map(str, found))} |")
        assert row in readme, row


def _assert_epoch_lever_readme(lever: str, before: str) -> None:
    """An 8-round epoch lever (runs ``webshop-{m}-rounds8-<lever>``, seeds 0-2, paired by seed) against the lever run
    before it (``webshop-rounds8[-<before>]``): its README's table and difference, and per seed the goals solved before
    and after the lever by FedIT and by Fed-SE, Fed-SE's exploration successes per round, each retailer's final
    buffer and the SFT steps of each run."""
    folder = RESULTS / "cpu-evidence" / f"webshop-rounds8-{lever}"
    runs = sorted((folder / "runs").glob("cpu-evidence-webshop-*"))
    assert [r.name for r in runs] == sorted(f"cpu-evidence-webshop-{m}-rounds8-{lever}-seed{s}"
                                            for m in ("fedse", "fedit") for s in range(3)), [r.name for r in runs]
    summaries = [load_summary(r) for r in runs]
    readme = (folder / "README.md").read_text()
    baseline = f"cpu-evidence-webshop-fedit-rounds8-{lever} (fedit)"
    _assert_readme_shows(readme, summaries, EPOCH_LEVER_ROWS[lever], baseline, seeds=3)
    suffix = f"-{before}" if before else ""
    earlier = _goals_solved((load_summary(RESULTS / "cpu-evidence" / f"webshop-rounds8{suffix}" / "runs" /
                                          f"cpu-evidence-webshop-{m}-rounds8{suffix}-seed{k}")
                             for m in ("fedse", "fedit") for k in range(3)), "8")
    now = _goals_solved(summaries, "8")
    for seed in range(3):
        fedse, fedit = (_completed_rounds(folder / "runs" / f"cpu-evidence-webshop-{m}-rounds8-{lever}-seed{seed}")
                        for m in ("fedse", "fedit"))
        found = _exploration_successes(fedse)
        buffers = [fedse[-1]["institutions"][f"retailer-{n}"]["report"]["explore"]["buffer_size"]
                   for n in ("north", "south", "east")]
        steps = [sum(i["report"]["train"]["steps"] for r in records for i in r["institutions"].values())
                 for records in (fedit, fedse)]
        row = (f"| {seed} | {earlier[('fedit', seed)]} | {now[('fedit', seed)]} | {earlier[('fedse', seed)]} | "
               f"{now[('fedse', seed)]} | {', '.join(map(str, found))} | {', '.join(map(str, buffers))} | "
               f"{steps[0]} / {steps[1]} |")
        assert row in readme, row


def test_the_epoch_lever_readme_reports_what_its_runs_give():
    """Both methods train one epoch a round over their buffers for 8 rounds, instead of 15 steps
    (../webshop-rounds8/)."""
    _assert_epoch_lever_readme("epoch1", "")


def test_the_two_epoch_levers_readme_reports_what_its_runs_give():
    """Both methods train two epochs a round over their buffers, the paper's count, instead of one
    (../webshop-rounds8-epoch1/)."""
    _assert_epoch_lever_readme("epoch2", "epoch1")


@pytest.mark.parametrize("lever", sorted(EPOCH_LEVER_ROWS))
def test_an_epoch_levers_added_seeds_are_reported_beside_the_preregistered_ones(lever):
    """Seeds 3-4 were added after seeds 0-2 were seen; they live in more-seeds/, and the README's five-seed table,
    difference and per-seed rows are what those runs and the pre-registered ones give together."""
    folder = RESULTS / "cpu-evidence" / f"webshop-rounds8-{lever}"
    added = sorted((folder / "more-seeds").glob("cpu-evidence-webshop-*"))
    assert [r.name for r in added] == sorted(f"cpu-evidence-webshop-{m}-rounds8-{lever}-seed{s}"
                                             for m in ("fedse", "fedit") for s in (3, 4)), [r.name for r in added]
    summaries = [load_summary(r) for r in [*sorted((folder / "runs").glob("cpu-evidence-webshop-*")), *added]]
    assert sorted(s.seed for s in summaries) == sorted([*range(5)] * 2)
    readme = (folder / "README.md").read_text()
    _assert_readme_shows(readme, summaries, EPOCH_LEVER_ROWS[lever],
                         f"cpu-evidence-webshop-fedit-rounds8-{lever} (fedit)", seeds=5)
    goals = _goals_solved(summaries, "8")
    for seed in (3, 4):
        found = _exploration_successes(
            _completed_rounds(folder / "more-seeds" / f"cpu-evidence-webshop-fedse-rounds8-{lever}-seed{seed}"))
        row = f"| {seed} | {goals[('fedit', seed)]} | {goals[('fedse', seed)]} | {', '.join(map(str, found))} |"
        assert row in readme, row
