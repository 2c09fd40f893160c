"""The CLI's help and version, and the library/CLI boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedse_secure import __version__


def run(*args):
    return subprocess.run([sys.executable, "-m", "fedse_cli.main", *args], capture_output=True, text=True)


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("args", [[], ["simulate"], ["report"], ["config", "validate"], ["model", "prepare"]])
def test_help_is_available_everywhere(args):
    proc = run(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_help_does_not_import_torch():
    code = "import sys; import fedse_cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", "importing the CLI must stay light; move heavy imports into commands"
