"""Shared fixtures. Tests use real components at small sizes (the tiny random Llama, real envs, real crypto)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Before any test module imports torch: see fedse_secure/__init__.py (spin-waiting OpenMP threads on shared cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def threads():
    """One torch thread for the tests of a module: oversubscribed OpenMP threads spin, and on a busy 2-core box two
    threads ran ~30x slower than one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `fedse simulate configs/smoke.yaml` through the real CLI, shared by the tests that inspect it."""
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("smoke") / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedse_cli.main", "simulate", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), "-q"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    return {"out": out, "proc": proc, "seconds": time.perf_counter() - start}
