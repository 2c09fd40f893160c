"""Environments: the five of the paper (offline) and an AgentGym HTTP adapter.

Contract used by the rest of the package:
- ``ENV_NAMES``: names accepted in configs.
- ``make_env(name, **options) -> TextEnv``
- ``make_oracle(name) -> Oracle``
"""
