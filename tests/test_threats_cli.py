"""`fedse threats verify` exits 0 and prints every threat with its check; `--disable` makes it fail."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedse_cli.main import app
from fedse_threat_model.registry import load_threats

runner = CliRunner()


def test_verify_passes_and_prints_every_threat_with_its_check():
    result = runner.invoke(app, ["threats", "verify"])
    assert result.exit_code == 0, result.output
    for t in load_threats():
        assert t.id in result.output and t.check in result.output
    assert f"{len(load_threats())}/{len(load_threats())} checks passed" in result.output


def test_verify_fails_when_a_protection_is_switched_off():
    result = runner.invoke(app, ["threats", "verify", "--only", "T3", "--only", "T4", "--disable", "signatures",
                                 "--disable", "consistency"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "switched OFF" in result.output


def test_verify_json_carries_evidence():
    result = runner.invoke(app, ["threats", "verify", "--only", "T9", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows[0]["id"] == "T9" and rows[0]["passed"] and rows[0]["evidence"]["attacks"]


def test_list_and_bad_arguments():
    result = runner.invoke(app, ["threats", "list", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)) == len(load_threats())
    bad = runner.invoke(app, ["threats", "verify", "--disable", "firewall"])
    assert bad.exit_code == 2 and "choose from" in bad.output
    bad = runner.invoke(app, ["threats", "verify", "--only", "T99"])
    assert bad.exit_code == 2 and "unknown threat id" in bad.output
