"""Pick the secure-aggregation backend named in the config."""

from __future__ import annotations

from fedse_secure.config import ExperimentConfig
from fedse_secure.secagg.base import PlaintextAggregator, SecureAggregator


def build_aggregator(config: ExperimentConfig) -> SecureAggregator:
    backend = config.federation.secure_aggregation
    if backend == "none":
        return PlaintextAggregator()
    if backend == "masking":
        from fedse_secure.secagg.masking import MaskingAggregator

        return MaskingAggregator(config.federation.secagg, rng_seed=None)
    if backend == "crypten":
        from fedse_secure.secagg.crypten_backend import CryptenAggregator

        return CryptenAggregator(config.federation.secagg)
    raise ValueError(f"unknown secure aggregation backend {backend!r}; use none, masking or crypten")
