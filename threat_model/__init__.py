"""fedse-secure threat model: THREATS.md (prose), threats.yaml (machine-readable list) and the executable
checks behind `fedse threats verify` (harness.py, checks/ one module per area, attacks.py)."""

from fedse_threat_model.harness import CHECKS, PROTECTIONS, CheckResult, ProtectionSettings, run_check
from fedse_threat_model.registry import Threat, load_threats, verify

__all__ = ["CHECKS", "PROTECTIONS", "CheckResult", "ProtectionSettings", "Threat", "load_threats", "run_check",
           "verify"]
