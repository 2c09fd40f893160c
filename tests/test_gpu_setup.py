"""The torch build follows the machine: selection logic, install commands, the install check, the Makefile wiring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedse_secure import torch_build as tb

REPO = Path(__file__).resolve().parents[1]
GPU = ["GPU 0: NVIDIA RTX A6000 (UUID: GPU-1234)"]


@pytest.mark.parametrize(
    "override, gpus, system, variant",
    [
        (None, GPU, "Linux", "cuda"),
        (None, [], "Linux", "cpu"),
        (None, GPU, "Windows", "cuda"),
        (None, GPU, "Darwin", "cpu"),  # no CUDA builds for macOS, whatever is plugged in
        ("cpu", GPU, "Linux", "cpu"),  # the user may keep a GPU machine on the CPU build
        ("cuda", [], "Linux", "cuda"),  # or build a CUDA environment on a machine without a GPU (an image)
        ("", [], "Linux", "cpu"),  # an empty TORCH_VARIANT means "follow the machine"
    ],
)
def test_variant_follows_the_machine_unless_overridden(override, gpus, system, variant):
    choice = tb.choose_variant(override, gpus, system)
    assert choice.variant == variant
    assert choice.reason


def test_an_override_names_what_the_machine_would_have_taken():
    assert "overrides the machine's cuda" in tb.choose_variant("cpu", GPU, "Linux").reason


@pytest.mark.parametrize("override, system, message", [
    ("gpu", "Linux", "TORCH_VARIANT=gpu: use one of cpu, cuda"),
    ("cuda", "Darwin", "no CUDA build for Darwin"),
])
def test_bad_overrides_are_one_line_errors(override, system, message):
    with pytest.raises(tb.BuildError, match=message):
        tb.choose_variant(override, [], system)


def test_requirements_name_the_build_so_no_index_can_swap_it():
    assert tb.requirement("cpu", system="Linux") == "torch==2.13.0+cpu"
    assert tb.requirement("cuda", "cu130", system="Linux") == "torch==2.13.0+cu130"
    assert tb.requirement("cuda", "cu126", system="Linux") == "torch==2.13.0+cu126"
    assert tb.requirement("cpu", system="Darwin") == "torch==2.13.0"  # macOS wheels carry no local version


def test_install_tries_the_configured_sources_before_the_pytorch_index():
    first, fallback = tb.install_commands("py", "cuda", "cu128", system="Linux")
    assert first == ["py", "-m", "pip", "--disable-pip-version-check", "install", "-q", "torch==2.13.0+cu128"]
    assert fallback[-3:] == ["torch==2.13.0+cu128", "--extra-index-url", "https://download.pytorch.org/whl/cu128"]
    assert tb.install_commands("py", "cpu", system="Linux")[1][-1] == "https://download.pytorch.org/whl/cpu"


def _fake_smi(tmp_path: Path, output: str, rc: int = 0) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {rc}\n")
    smi.chmod(0o755)
    return str(smi)


def test_gpus_are_read_from_nvidia_smi_then_from_the_driver(tmp_path):
    empty = tmp_path / "no-proc"
    smi = _fake_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-a)\\nGPU 1: NVIDIA H200 (UUID: GPU-b)\\n")
    assert tb.nvidia_gpus(smi, empty) == ["GPU 0: NVIDIA H200 (UUID: GPU-a)", "GPU 1: NVIDIA H200 (UUID: GPU-b)"]
    # nvidia-smi failing (driver/library mismatch) falls back to the driver's /proc entries.
    broken = _fake_smi(tmp_path, "NVIDIA-SMI has failed", rc=9)
    proc = tmp_path / "gpus"
    (proc / "0000:3b:00.0").mkdir(parents=True)
    assert tb.nvidia_gpus(broken, proc) == ["GPU 0000:3b:00.0"]
    assert tb.nvidia_gpus(broken, empty) == []
    assert tb.nvidia_gpus("", empty) == []  # no nvidia-smi on the PATH


def test_the_install_check_compares_the_build_with_the_machine():
    cpu = tb.Installed("2.13.0+cpu", None, False)
    cuda = tb.Installed("2.13.0+cu130", "13.0", True)
    old_driver = tb.Installed("2.13.0+cu130", "13.0", False)
    assert tb.mismatch(cpu, "cpu", []) is None
    assert tb.mismatch(cuda, "cuda", GPU) is None
    assert "is not the cuda build" in tb.mismatch(cpu, "cuda", GPU)
    assert "is not the cpu build" in tb.mismatch(cuda, "cpu", [])
    assert "driver is older" in tb.mismatch(old_driver, "cuda", GPU)
    assert tb.mismatch(old_driver, "cuda", []) is None  # a CUDA build made on a machine without a GPU
    assert "is not torch 2.13.0" in tb.mismatch(tb.Installed("2.14.1+cpu", None, False), "cpu", [])
    assert "not installed" in tb.mismatch(None, "cpu", [])


def test_the_installed_torch_matches_this_machine():
    """What `make test` checks after installing: here (no GPU in CI) that is the CPU build."""
    gpus = tb.nvidia_gpus()
    assert tb.mismatch(tb.installed_torch(), tb.choose_variant(None, gpus).variant, gpus) is None


def _make_dry_run(**env) -> str:
    proc = subprocess.run(["make", "-n", "-B", "venv"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_makefile_installs_and_checks_the_selected_build():
    machine = tb.choose_variant(None, tb.nvidia_gpus()).variant
    plan = _make_dry_run()
    assert f'torch_build.py install --variant "{machine}" --cuda cu130' in plan
    assert f'torch_build.py check --variant "{machine}"' in plan
    assert f".fedse-installed-{machine}" in plan
    # torch comes first: nothing installed later can pick another build.
    assert plan.index("torch_build.py install") < plan.index("pip --disable-pip-version-check install -q -e")
    forced = _make_dry_run(TORCH_VARIANT="cuda", TORCH_CUDA="cu126", EXTRAS="quant")
    assert 'install --variant "cuda" --cuda cu126' in forced and ".fedse-installed-cuda" in forced
    assert '-e ".[dev,mpc,quant]"' in forced


def test_the_script_refuses_a_bad_variant_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "fedse_secure" / "torch_build.py"), "detect"],
                          capture_output=True, text=True, env={**os.environ, "TORCH_VARIANT": "rocm"}, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: TORCH_VARIANT=rocm: use one of cpu, cuda (or leave it unset to follow the "
                                   "machine)")
