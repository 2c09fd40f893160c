"""The executable threat checks, one module per area (secagg, privacy, learning, deployment). Each check
registers itself in :data:`fedse_threat_model.harness.CHECKS`; a new check is a function in one of these
modules (or a new module here) plus its entry in threats.yaml."""
