"""Out-of-range and ill-typed option values, and output paths: one clear line before any work, never a "this is a
bug" line, a hang, a late failure, a stray warning or an output written anywhere but where it says.

Cases go through the real command tree in this process (test_bad_inputs' runner: exactly one ``error:`` line,
the expected exit, the file system untouched); the rest check what a table case cannot.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_bad_inputs import Case, _config, _run_case, _run_folder
from typer.testing import CliRunner

from fedse_cli.main import app
from fedse_secure.privacy import DpEvent, PrivacyLedger

POLICY = str(Path(__file__).resolve().parents[1] / "configs" / "deploy" / "policy.yaml")


def _ledger(root: Path) -> None:
    ledger = PrivacyLedger(root / "privacy_ledger.jsonl")
    ledger.append(DpEvent("subsampled_gaussian", "record", 1.0, 0.04, 50, 1.0, 100), round=1, institution="clinic",
                  delta=1e-5)


def _both(*setups):
    def setup(root: Path) -> None:
        for s in setups:
            s(root)

    return setup


def _afile(root: Path) -> None:
    (root / "afile").write_text("not a folder\n")


PLAN = ["privacy", "plan", "-e", "1", "-r", "3", "-n", "100"]
BAD_ROUND_KEY = {"name": "x", "mode": "fedse", "status": "completed", "success_by_env": {"maze": {"abc": 0.5}}}

CASES = [
    Case("envs-serve-negative-port", ["envs", "serve", "--port", "-1"], says="--port"),
    Case("envs-serve-port-too-large", ["envs", "serve", "--port", "70000"], says="--port"),
    Case("threats-negative-seed", ["threats", "verify", "--seed", "-1", "--only", "T1"], says="--seed"),
    Case("certs-days-past-x509", ["certs", "init", "--out", "pki", "-i", "a", "--days", "99999999"], says="--days"),
    Case("envs-serve-unresolvable-host", ["envs", "serve", "--host", "nonexistent.invalid", "--port", "0"],
         says="--host nonexistent.invalid"),
    Case("report-non-integer-round", ["report", "run"], _run_folder(BAD_ROUND_KEY), says="success_by_env.maze.abc"),
    Case("report-plots-under-a-file", ["report", "run", "--plots", "afile/sub"], _both(_run_folder(), _afile),
         code=1, says="afile"),
    Case("sweep-plots-under-a-file",
         ["sweep", "cfg.yaml", "--seeds", "0", "-q", "--out", "out", "--plots", "afile/sub"], _both(_config(), _afile),
         code=1, says="afile"),
    Case("sweep-too-many-seeds", ["sweep", "cfg.yaml", "--seeds", "1-1000000000", "-q"], _config(), says="1000"),
    Case("sweep-huge-seed-range", ["sweep", "cfg.yaml", "--seeds", "0-" + "9" * 40, "-q"], _config(), says="1000"),
    Case("privacy-report-png-not-png", ["privacy", "report", "privacy_ledger.jsonl", "--png", "x.jsonl"], _ledger,
         says="--png x.jsonl"),
    Case("privacy-report-png-is-the-ledger", ["privacy", "report", "privacy_ledger.jsonl", "--png",
                                              "privacy_ledger.jsonl"], _ledger, says="--png"),
    Case("privacy-report-png-folder", ["privacy", "report", "privacy_ledger.jsonl", "--png", "d"],
         _both(_ledger, lambda root: (root / "d").mkdir()), says="is a folder"),
    Case("privacy-report-damaged-ledger", ["privacy", "report", "privacy_ledger.jsonl"],
         _both(_ledger, lambda root: (root / "privacy_ledger.jsonl.head").unlink()), code=1, says="verif"),
    Case("privacy-plan-huge-rounds", [*PLAN[:4], "-r", "1000000000", "-n", "100"], says="--rounds"),
    Case("privacy-plan-huge-epsilon", ["privacy", "plan", "-e", "1e9", "-r", "3", "-n", "100"],
         says="--target-epsilon"),
    Case("privacy-plan-huge-records", [*PLAN[:6], "-n", "1000000000"], says="steps"),
    Case("privacy-plan-set-without-config", [*PLAN, "--set", "bogus=1"], says="--set"),
    Case("privacy-plan-set-bad-value-without-config", [*PLAN, "--set", "privacy.delta=abc"], says="--set"),
    Case("privacy-plan-unknown-mode", [*PLAN, "--mode", "bogus"], says="--mode bogus"),
    Case("privacy-plan-mode-none", [*PLAN, "--mode", "none"], says="--mode none"),
    Case("privacy-plan-no-plan", ["privacy", "plan", "-e", "1e-9", "-r", "3", "-n", "100"], code=1,
         says="no accountant"),
    Case("privacy-plan-ledger-overspent", [*PLAN, "--ledger", "privacy_ledger.jsonl"], _ledger, code=1,
         says="no accountant"),
    Case("privacy-plan-ledger-larger-delta", [*PLAN, "--ledger", "privacy_ledger.jsonl", "--delta", "1e-3"], _ledger,
         says="larger"),
    *(Case(f"policy-epsilon-cap-{cap}", ["policy", "check", "-p", POLICY, "-e", "cfg.yaml", "--epsilon-cap", cap],
           _config(), says="--epsilon-cap") for cap in ("-1", "0", "nan")),
    Case("policy-check-folder", ["policy", "check", "-p", "d", "-e", "cfg.yaml"],
         _both(_config(), lambda root: (root / "d").mkdir()), says="is a folder"),
]


def test_bad_values_give_one_line_before_any_work(tmp_path):
    started = time.perf_counter()
    failures = [f for f in (_run_case(c, tmp_path, as_process=False) for c in CASES) if f]
    assert not failures, "\n".join(failures)
    assert time.perf_counter() - started < 60, "a bounded input still searched or trained"


def _report(args: list[str], tmp_path: Path):
    _ledger(tmp_path)
    return CliRunner().invoke(app, ["privacy", "report", str(tmp_path / "privacy_ledger.jsonl"), *args],
                              env={"COLUMNS": "200"})


def test_privacy_report_prints_the_plot_it_wrote(tmp_path):
    result = _report(["--png", str(tmp_path / "sub" / "eps.png")], tmp_path)
    assert result.exit_code == 0, result.output
    assert f"plot: {tmp_path / 'sub' / 'eps.png'}" in result.stdout
    assert (tmp_path / "sub" / "eps.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "eps.png"], "a temporary file was left"


def test_plots_are_replaced_atomically(tmp_path, monkeypatch):
    """A plot that fails while being written leaves the old plot whole (written to a sibling, then renamed)."""
    import matplotlib.figure

    png = tmp_path / "eps.png"
    png.write_bytes(b"old plot")

    def half_written(self, target, *args, **kwargs):
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"\x89PNG half")
        else:
            target.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    result = _report(["--png", str(png)], tmp_path)
    assert result.exit_code != 0
    assert png.read_bytes() == b"old plot"
    assert not list(tmp_path.glob(".eps.png*")), "a temporary file was left"


@pytest.mark.parametrize("what", ["empty-ledger", "summary-without-rounds"])
def test_nothing_to_plot_warns_nothing(tmp_path, what):
    import warnings

    if what == "empty-ledger":
        (tmp_path / "privacy_ledger.jsonl").write_text("")
        args = ["privacy", "report", str(tmp_path / "privacy_ledger.jsonl")]
    else:
        _run_folder({"name": "x", "mode": "fedse", "status": "completed"})(tmp_path)
        args = ["report", str(tmp_path / "run")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning prints a source path on the user's terminal
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output} {result.exception!r}"


def test_plan_json_still_prints_when_no_accountant_plans(tmp_path):
    result = CliRunner().invoke(app, ["privacy", "plan", "-e", "1e-9", "-r", "3", "-n", "100", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert all("error" in r for r in data["accountants"].values())


def test_report_refuses_an_unwritable_plots_folder_before_the_table(tmp_path):
    _run_folder()(tmp_path)
    _afile(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--plots", str(tmp_path / "afile" / "sub")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "success rate" not in result.output, "the table printed before the plots folder was checked"


def test_simulate_refuses_an_output_under_a_file_before_it_loads_the_model(tmp_path, monkeypatch):
    _config()(tmp_path)
    _afile(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["simulate", "cfg.yaml", "--out", "afile/sub"])
    assert result.exit_code == 2, result.output
    assert "a part of that path is a file" in result.output
    assert "loading model" not in result.output, "the output folder is checked before the model is loaded"
    assert not (tmp_path / "afile").is_dir()
