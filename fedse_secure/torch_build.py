"""Which build of torch this machine should have, how to install it, and whether the installed one is it.

``make`` runs this file as a script before the package (or anything but the standard library) is installed, so
it imports nothing else; ``fedse doctor`` imports it to say the same. The build follows the machine: the CUDA
build where an NVIDIA GPU is present, the CPU build otherwise, and ``TORCH_VARIANT=cpu|cuda`` overrides that.

The requirement names the build's local version (``torch==2.13.0+cpu``, ``+cu130``): a bare ``torch==2.13.0``
is the CPU wheel on one index and the CUDA wheel on another (PyPI's Linux wheels are CUDA builds), so only the
local version says which one pip will take. The configured package sources (a local wheel folder, a mirror)
are tried first, so an offline machine that holds the wheel never reaches for the network; PyTorch's own index
for that build is the fallback.

Usage: ``python fedse_secure/torch_build.py detect|install|check [--variant cpu|cuda] [--cuda cu130]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TORCH_VERSION = "2.13.0"
VARIANTS = ("cpu", "cuda")
#: The CUDA build installed by default (``TORCH_CUDA`` in the Makefile overrides it, e.g. cu126 for an older driver).
DEFAULT_CUDA_TAG = "cu130"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
#: Operating systems PyTorch publishes CUDA builds for.
CUDA_SYSTEMS = ("Linux", "Windows")
_NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


class BuildError(Exception):
    """A wrong variant name, a failed install or a build that does not match the machine (one line)."""


@dataclass(frozen=True)
class Choice:
    variant: str
    reason: str


def nvidia_gpus(nvidia_smi: str | None = None, proc_dir: Path = _NVIDIA_PROC) -> list[str]:
    """The NVIDIA GPUs this machine shows: ``nvidia-smi -L`` lines, or the driver's /proc entries without it."""
    smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]
            if gpus:
                return gpus
    try:
        return sorted(f"GPU {p.name}" for p in proc_dir.iterdir())
    except OSError:
        return []


def choose_variant(override: str | None, gpus: list[str], system: str | None = None) -> Choice:
    """The torch build for a machine with ``gpus`` on ``system``; ``override`` (TORCH_VARIANT) wins if set."""
    system = system or platform.system()
    if system not in CUDA_SYSTEMS:
        machine = Choice("cpu", f"PyTorch publishes CUDA builds for {' and '.join(CUDA_SYSTEMS)} only, not {system}")
    elif gpus:
        machine = Choice("cuda", f"{len(gpus)} NVIDIA GPU(s): {gpus[0]}")
    else:
        machine = Choice("cpu", "no NVIDIA GPU found (nvidia-smi, /proc/driver/nvidia)")
    if not override or override == machine.variant:
        return machine
    if override not in VARIANTS:
        raise BuildError(f"TORCH_VARIANT={override}: use one of {', '.join(VARIANTS)} (or leave it unset to "
                         "follow the machine)")
    if override == "cuda" and system not in CUDA_SYSTEMS:
        raise BuildError(f"TORCH_VARIANT=cuda: PyTorch has no CUDA build for {system}; use TORCH_VARIANT=cpu")
    return Choice(override, f"TORCH_VARIANT={override} overrides the machine's {machine.variant} ({machine.reason})")


def requirement(variant: str, cuda_tag: str = DEFAULT_CUDA_TAG, system: str | None = None) -> str:
    system = system or platform.system()
    if variant == "cpu":
        # macOS wheels are CPU (and MPS) builds without a local version; there is no +cpu wheel to ask for.
        return f"torch=={TORCH_VERSION}" if system == "Darwin" else f"torch=={TORCH_VERSION}+cpu"
    return f"torch=={TORCH_VERSION}+{cuda_tag}"


def index_url(variant: str, cuda_tag: str = DEFAULT_CUDA_TAG) -> str:
    return PYTORCH_INDEX.format(tag="cpu" if variant == "cpu" else cuda_tag)


def install_commands(python: str, variant: str, cuda_tag: str = DEFAULT_CUDA_TAG,
                     system: str | None = None) -> list[list[str]]:
    """The pip commands to try in order: the configured sources first, then PyTorch's index for the build."""
    req = requirement(variant, cuda_tag, system)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    return [pip + [req], pip + [req, "--extra-index-url", index_url(variant, cuda_tag)]]


@dataclass(frozen=True)
class Installed:
    version: str
    cuda: str | None
    cuda_available: bool

    @property
    def variant(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def describe(self) -> str:
        return f"torch {self.version} ({'CUDA ' + self.cuda if self.cuda else 'CPU'} build)"


def installed_torch() -> Installed | None:
    try:
        import torch
    except ImportError:
        return None
    cuda = torch.version.cuda
    return Installed(torch.__version__, cuda, bool(cuda) and torch.cuda.is_available())


def mismatch(installed: Installed | None, variant: str, gpus: list[str]) -> str | None:
    """Why the installed torch is not the build this machine should have (None when it is)."""
    fix = "run `make clean-venv` and retry"
    if installed is None:
        return f"torch is not installed; {fix}"
    if installed.version.split("+")[0] != TORCH_VERSION:
        return f"{installed.describe()} is not torch {TORCH_VERSION}; {fix}"
    if installed.variant != variant:
        return (f"{installed.describe()} is not the {variant} build this machine should have; {fix} "
                f"(or set TORCH_VARIANT={installed.variant} to keep it)")
    if variant == "cuda" and gpus and not installed.cuda_available:
        return (f"{installed.describe()} cannot use this machine's GPU ({gpus[0]}): the NVIDIA driver is older than "
                f"CUDA {installed.cuda} needs; update the driver, or rebuild for an older CUDA with "
                "`make clean-venv venv TORCH_CUDA=cu126`")
    return None


def install(python: str, variant: str, cuda_tag: str) -> None:
    attempts = install_commands(python, variant, cuda_tag)
    for i, cmd in enumerate(attempts):
        if subprocess.run(cmd).returncode == 0:
            return
        if i + 1 < len(attempts):
            print(f"{requirement(variant, cuda_tag)} is not in the configured package sources; trying "
                  f"{index_url(variant, cuda_tag)}", file=sys.stderr)
    raise BuildError(f"could not install {requirement(variant, cuda_tag)} (from the configured sources or "
                     f"{index_url(variant, cuda_tag)}); check the network or put the wheel in a pip find-links folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("detect", "install", "check"))
    parser.add_argument("--variant", default=None, help="cpu or cuda (default: TORCH_VARIANT, else the machine's)")
    parser.add_argument("--cuda", default=DEFAULT_CUDA_TAG, help="CUDA build tag (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        gpus = nvidia_gpus()
        choice = choose_variant(args.variant or os.environ.get("TORCH_VARIANT") or None, gpus)
        if args.action == "detect":
            print(choice.variant)
        elif args.action == "install":
            print(f"torch build: {choice.variant} ({choice.reason})", file=sys.stderr)
            install(sys.executable, choice.variant, args.cuda)
        else:
            problem = mismatch(installed_torch(), choice.variant, gpus)
            if problem:
                raise BuildError(problem)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
