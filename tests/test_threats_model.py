"""The threat model is complete: every threat has prose, a check that exists and tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fedse_threat_model.harness import CHECKS, PROTECTIONS
from fedse_threat_model.registry import load_threats, threats_markdown

REPO = Path(__file__).resolve().parents[1]
THREATS = load_threats()


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test")}


def test_ids_are_t1_to_tn_in_order():
    assert [t.id for t in THREATS] == [f"T{i}" for i in range(1, len(THREATS) + 1)]


@pytest.mark.parametrize("threat", THREATS, ids=[t.id for t in THREATS])
def test_every_threat_is_described_checked_and_tested(threat):
    md = threats_markdown()
    # A section of its own in THREATS.md, with the four parts every threat must state.
    m = re.search(rf"^### {threat.id}\b.*?(?=^### T\d+\b|^## |\Z)", md, flags=re.M | re.S)
    assert m, f"{threat.id} has no '### {threat.id} ...' section in threat_model/THREATS.md; add one"
    section = m.group(0)
    for part in ("Wants", "Stopped by", "Residual", "Check"):
        assert f"**{part}" in section, f"{threat.id}'s section in THREATS.md lacks **{part}**"
    assert threat.check in section, f"{threat.id}'s section must name its check {threat.check}"
    assert threat.check in CHECKS, f"{threat.id}: check {threat.check} is not defined in fedse_threat_model.checks (see harness.CHECKS)"
    assert threat.tests, f"{threat.id} lists no test; a threat without a test is not covered"
    for node in threat.tests:
        file, _, func = node.partition("::")
        path = REPO / file
        assert path.is_file(), f"{threat.id}: test file {file} does not exist"
        if func:
            assert func in _test_functions(path), f"{threat.id}: {node} does not exist"
    assert set(threat.fails_without) <= set(PROTECTIONS), f"{threat.id}: unknown protection in fails_without"
    assert threat.residual.strip(), f"{threat.id} states no residual risk"


def test_every_check_belongs_to_a_threat():
    orphans = sorted(set(CHECKS) - {t.check for t in THREATS})
    assert not orphans, f"checks without a threat in threats.yaml: {orphans}"


def test_every_protection_has_a_check_that_relies_on_it():
    used = {p for t in THREATS for p in t.fails_without}
    assert used == set(PROTECTIONS), f"protections no check demonstrates: {sorted(set(PROTECTIONS) - used)}"


def test_threats_md_lists_no_threat_that_yaml_lacks():
    in_md = set(re.findall(r"^### (T\d+)\b", threats_markdown(), flags=re.M))
    assert in_md == {t.id for t in THREATS}


def test_security_md_points_at_the_threat_model_and_the_verify_command():
    text = (REPO / "SECURITY.md").read_text()
    for needle in ("threat_model/THREATS.md", "fedse threats verify", "Reporting a vulnerability"):
        assert needle in text


def test_threats_md_names_every_check_module():
    modules = {p.name for p in (REPO / "threat_model" / "checks").glob("*.py") if p.name != "__init__.py"}
    intro = threats_markdown().split("### T1 ", 1)[0]
    named = set(re.findall(r"`(\w+\.py)`", intro))
    assert modules <= named, f"THREATS.md's list of check modules lacks {sorted(modules - named)}"


def test_verify_help_lists_every_protection_it_can_switch_off():
    from typer.testing import CliRunner

    from fedse_cli.main import app

    result = CliRunner().invoke(app, ["threats", "verify", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    missing = [name for name in PROTECTIONS if name not in help_text]
    assert not missing, f"`fedse threats verify --help` does not name {missing}"
