"""The wording of the CLI's one-line errors: each names the problem in the user's terms (never a Python type or
an internal class) and the fix, and blames the input that caused it (the file, or the --set override).

Through the real command tree in this process (click's runner), as tests/test_bad_inputs.py does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
#: Python's and pydantic's words, which a user never wrote.
INTERNAL = ("NoneType", "instance of", "Config", "Settings", "<class", "dictionary", "Input should be a valid list")


def fedse(*args: str, cwd: Path | None = None) -> tuple[int, list[str]]:
    """Exit code and the non-empty lines printed (stdout and stderr)."""
    from typer.testing import CliRunner

    from fedse_cli.main import app

    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(here)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]


def one_error(*args: str, code: int = 2, cwd: Path | None = None) -> str:
    got, lines = fedse(*args, cwd=cwd)
    assert got == code, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- #18: a config file that is not a mapping of settings --------------------------------------------------------

@pytest.mark.parametrize("text, says", [("", "is empty"), ("# only a comment\n", "is empty"),
                                        ("- a\n- b\n", "holds a list, not a mapping of settings"),
                                        ("hello\n", "holds the single text 'hello', not a mapping"),
                                        ("3\n", "holds the single value 3, not a mapping")])
def test_a_config_that_is_not_a_mapping_says_what_it_holds_and_where_to_start(tmp_path, text, says):
    (tmp_path / "cfg.yaml").write_text(text)
    line = one_error("config", "validate", str(tmp_path / "cfg.yaml"))
    assert says in line and "start from configs/smoke.yaml" in line and "fedse config explain" in line, line
    assert not any(word in line for word in ("NoneType", "got list", "got str", "got int")), line


def test_a_list_config_with_overrides_says_the_same(tmp_path):
    (tmp_path / "cfg.yaml").write_text("- a\n")
    line = one_error("config", "validate", str(tmp_path / "cfg.yaml"), "--set", "seed=1")
    assert "holds a list, not a mapping of settings" in line, line


# -- #19: every kind of value error has a fix, in the user's words ------------------------------------------------

@pytest.mark.parametrize("override, says, fix", [
    ("seed=1.5", "fractional part (got 1.5)", "use a whole number"),
    ("federation.rounds=.nan", "finite number (got nan)", ".nan and .inf are not allowed"),
    ("federation=3", "expected a section of settings",
     "--set federation.FIELD=VALUE (`fedse config explain federation`"),
    ("clients=5", "expected a list (got 5)", "write a list: [a, b]"),  # brackets printed, not read as a style
    ("name=", "expected text (got no value)", "write text"),
    ("federation.rounds={a: 1}", "expected a whole number (got a mapping)", "use a whole number"),
    ("clients.0.env_options=3", "expected key: value pairs (got 3)", "{} for none"),
    ("clients.0.policy=3", "expected a file path (got 3)", "write the path as text"),
    ("exploration.temperature=[1]", "expected a number (got a list)", "use a number"),
])
def test_every_value_error_names_a_fix_and_no_internal_class(override, says, fix):
    line = one_error("config", "validate", SMOKE, "--set", override)
    problem, _, hint = line.partition("; ")
    assert says in problem and fix in hint, line
    assert not any(word in line for word in INTERNAL), line


def test_a_section_given_a_value_in_the_file_names_the_fields_to_give(tmp_path):
    text = Path(SMOKE).read_text().replace("federation:\n", "federation: 3\nold_federation:\n", 1)
    (tmp_path / "cfg.yaml").write_text(text)
    got, lines = fedse("config", "validate", str(tmp_path / "cfg.yaml"))
    line = next(ln for ln in lines if ": federation:" in ln)
    assert got == 2 and "give its fields as key: value pairs (`fedse config explain federation`" in line, line
    assert not any(word in line for word in INTERNAL), line


# -- #20: a problem with an override names the override, not the file ---------------------------------------------

def test_an_unknown_field_given_by_set_names_the_override():
    line = one_error("config", "validate", SMOKE, "--set", "bogus=1")
    assert line.startswith("error: --set bogus=1: bogus: unknown field"), line
    assert "drop that --set" in line and "smoke.yaml" not in line, line


def test_a_value_under_an_overridden_section_names_that_override():
    line = one_error("config", "validate", SMOKE, "--set", "federation={rounds: 0}")
    assert line.startswith("error: --set federation={rounds: 0}: federation.rounds:"), line


def test_a_problem_in_the_file_still_names_the_file(tmp_path):
    text = Path(SMOKE).read_text().replace("federation:\n", "federation:\n  roundz: 1\n", 1)
    (tmp_path / "cfg.yaml").write_text(text)
    line = one_error("config", "validate", str(tmp_path / "cfg.yaml"), "--set", "seed=3")
    assert line.startswith(f"error: {tmp_path / 'cfg.yaml'}: federation.roundz: unknown field"), line
    assert "remove it" in line and "--set" not in line, line


def test_a_check_across_fields_names_the_file_and_the_overrides():
    line = one_error("config", "validate", SMOKE, "--set", "federation.mode=centralized", "--set",
                     "privacy.mode=dp-sgd")
    assert f"{SMOKE} with --set federation.mode=centralized, --set privacy.mode=dp-sgd: " in line, line


# -- #22: storage errors say what is in the way and the fix ----------------------------------------------------

def test_a_file_in_the_way_of_an_output_folder_says_so(tmp_path):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "ledger.jsonl").write_text("")
    line = one_error("privacy", "report", "ledger.jsonl", "--png", "afile/x.png", code=1, cwd=tmp_path)
    assert "cannot create the folder afile: a file is in the way where a folder is needed" in line, line
    assert "File exists" not in line and (tmp_path / "afile").read_text() == "mine"


def test_a_folder_that_takes_no_new_files_says_so(tmp_path):
    (tmp_path / "ledger.jsonl").write_text("")
    line = one_error("privacy", "report", "ledger.jsonl", "--png", "/proc/fedse-no-such/x.png", code=1, cwd=tmp_path)
    assert "/proc does not take new files or folders; choose a folder you can write to" in line, line


@pytest.mark.parametrize("action, make_parent, says", [
    ("write", False, "does not exist; create it first or choose another path"),
    ("read", True, "it does not exist; check the path"),
    ("create the folder", True, "does not take new files or folders"),
])
def test_storage_error_explains_a_missing_path(tmp_path, action, make_parent, says):
    from fedse_secure.io_utils import storage_error

    parent = tmp_path / "parent"
    if make_parent:
        parent.mkdir()
    msg = str(storage_error(parent / "x", OSError(errno.ENOENT, "No such file or directory"), action))
    assert says in msg and "No such file or directory" not in msg, msg


def test_storage_error_explains_a_file_in_the_way(tmp_path):
    from fedse_secure.io_utils import StorageError, ensure_dir

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(StorageError, match="a file is in the way where a folder is needed"):
        ensure_dir(tmp_path / "afile")


def test_simulate_storage_errors_have_no_class_name_prefix(tmp_path, monkeypatch):
    import fedse_secure.federation.simulation as simulation
    from fedse_secure.io_utils import storage_error

    def refuse(cfg, out_dir, **_):
        raise storage_error(out_dir, OSError(errno.ENOENT, "No such file or directory"), "create the folder")

    monkeypatch.setattr(simulation, "simulate", refuse)
    line = one_error("simulate", SMOKE, "-q", "--out", str(tmp_path / "a" / "b"), code=1)
    assert line.startswith(f"error: cannot create the folder {tmp_path / 'a' / 'b'}: the folder"), line
    assert "StorageError" not in line


# -- #25: a ledger line that is not an object; a field below a plain value -----------------------------------------

@pytest.mark.parametrize("content, says", [(b"[]\n", "is a JSON array (empty)"), (b"[1, 2]\n", "is a JSON array"),
                                           (b'"x"\n', "is a JSON string"), (b"7\n", "is a JSON number"),
                                           (b"null\n", "is the JSON value null")])
def test_a_ledger_line_that_is_not_an_object_says_what_it_is(tmp_path, content, says):
    (tmp_path / "ledger.jsonl").write_bytes(content)
    got, lines = fedse("privacy", "verify", str(tmp_path / "ledger.jsonl"), "--no-cross-check")
    assert got == 1 and len(lines) == 1, lines
    assert f"line 1: {says}, not a record of the privacy ledger" in lines[0], lines
    assert "has fields" not in lines[0] and "list" not in lines[0], lines


def test_explaining_a_field_below_a_plain_value_says_it_has_none():
    line = one_error("config", "explain", "federation.rounds.x")
    assert "federation.rounds is a value with no fields below it" in line, line
    assert "`fedse config explain federation.rounds`" in line and not line.rstrip().endswith("fields here:"), line


# -- #26: click's usage errors are one line too ----------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["report"], "error: missing argument 'RUN_DIRS...'; see `fedse report --help`"),
    (["privacy", "plan"], "error: missing option '--target-epsilon' / '-e'; see `fedse privacy plan --help`"),
    (["envs", "check", "--limit", "0"], "error: invalid value for '--limit': 0 is not in the range x>=1; see "
                                        "`fedse envs check --help`"),
    (["privacy", "report", "L", "--delta", "abc"], "error: invalid value for '--delta': 'abc' is not a valid float; "
                                                   "see `fedse privacy report --help`"),
    (["bogus"], "error: no such command 'bogus'; see `fedse --help`"),
    (["--bogus"], "error: no such option '--bogus'; see `fedse --help`"),
    (["privacy", "nope"], "error: no such command 'nope'; see `fedse privacy --help`"),
])
def test_usage_errors_are_one_line_naming_the_help(args, says):
    assert one_error(*args) == says


@pytest.mark.parametrize("args", [["--help"], ["privacy", "--help"], ["privacy", "plan", "--help"]])
def test_help_is_still_help(args):
    got, lines = fedse(*args)
    assert got == 0 and any("Usage" in ln for ln in lines) and not any(ln.startswith("error") for ln in lines)


def test_a_group_without_a_command_still_shows_its_help():
    got, lines = fedse("privacy")
    assert got == 2 and any("Usage" in ln for ln in lines) and not any(ln.startswith("error") for ln in lines)
