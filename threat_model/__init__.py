"""fedse-secure threat model: THREATS.md (prose), threats.yaml (machine-readable list) and the executable
checks behind `fedse threats verify` (harness.py, checks/ one module per area, attacks.py).

The names below load on first use, so that importing ``fedse_threat_model.protections`` (the CLI's help does)
stays light."""

from importlib import import_module

_EXPORTS = {
    "CHECKS": "harness", "CheckResult": "harness", "ProtectionSettings": "harness", "run_check": "harness",
    "PROTECTIONS": "protections", "Threat": "registry", "load_threats": "registry", "verify": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"fedse_threat_model.{_EXPORTS[name]}"), name)
