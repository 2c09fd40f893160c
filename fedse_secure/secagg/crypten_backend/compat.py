"""Finding and importing CrypTen 0.4.1 on this stack (torch 2.13, CPU).

CrypTen is an optional dependency: its metadata asks for the dead ``sklearn`` stub and an unpinned torch
(which would replace the CPU torch with a CUDA build), so it is installed with ``--no-deps`` next to the
only modules it really imports (``omegaconf`` and ``onnx``, the ``mpc`` extra). This module

* checks, *without importing anything*, that those packages are present (the coordinator process calls
  this when the backend is built, so a missing install fails before any training, with the fix), and
* imports CrypTen with the torch 2.13 shim. Only the party processes call :func:`import_crypten`; the
  coordinator never imports CrypTen, so the shim never touches the process that holds the model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from types import ModuleType

from fedse_secure.secagg.base import SecureAggregationError

CRYPTEN_VERSION = "0.4.1"

#: A party's exit status when CrypTen cannot be imported in it (the launcher then says how to install it).
EXIT_UNAVAILABLE = 3

INSTALL_HINT = (
    "install it with `make` (the set-up installs the mpc extra and CrypTen), or by hand in this venv: "
    "`pip install -e \".[mpc]\"` then `pip install --no-deps crypten==0.4.1` "
    "(never without --no-deps: CrypTen's own requirements pull a CUDA torch and the broken `sklearn` stub)"
)

# `import crypten` imports these third-party modules; everything else it declares (pandas, sklearn,
# tensorboard, torchvision, future) is only used by its examples and by modules we never import.
_REQUIRED_MODULES = {"crypten": "crypten", "omegaconf": "omegaconf", "onnx": "onnx"}

# torch 2.13 moved the TorchScript ONNX exporter's registry; crypten/nn/onnx_converter.py still imports it
# from the old place at `import crypten` time.
_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


class CryptenUnavailableError(SecureAggregationError):
    """CrypTen (or a module it imports) is not installed, or is a version this backend was not built for."""


def _find_spec(name: str):
    return importlib.util.find_spec(name)


def check_crypten_installed() -> str:
    """Return CrypTen's version, or raise :class:`CryptenUnavailableError` saying how to install it.

    Uses ``find_spec`` and package metadata only, so it is cheap and has no import side effects.
    """
    missing = [pkg for mod, pkg in _REQUIRED_MODULES.items() if _find_spec(mod) is None]
    if missing:
        raise CryptenUnavailableError(
            f"federation.secure_aggregation: crypten needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; {INSTALL_HINT}"
        )
    try:
        version = importlib.metadata.version("crypten")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != CRYPTEN_VERSION:
        raise CryptenUnavailableError(
            f"crypten {version} is installed but this backend is written and tested against crypten "
            f"{CRYPTEN_VERSION} (its fixed-point decoding and start-up were checked line by line); "
            f"{INSTALL_HINT}"
        )
    return version


def apply_torch_shim() -> None:
    """Alias the exporter registry at its pre-2.13 path, if torch moved it. Idempotent."""
    if _OLD_REGISTRATION in sys.modules or _find_spec_safe(_OLD_REGISTRATION):
        return
    try:
        registration = importlib.import_module(_NEW_REGISTRATION)
    except ModuleNotFoundError:
        # Neither path exists: a torch this shim does not know. Let `import crypten` report it.
        return
    sys.modules.setdefault(_OLD_REGISTRATION, registration)


def _find_spec_safe(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def import_crypten() -> ModuleType:
    """``import crypten`` with the torch 2.13 shim, turning a failed import into an actionable error."""
    apply_torch_shim()
    try:
        import crypten
    except ImportError as err:
        raise CryptenUnavailableError(f"`import crypten` failed ({err}); {INSTALL_HINT}") from err
    return crypten
