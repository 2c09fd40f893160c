"""The secure-aggregation interface shared by every backend.

A backend receives one flat float vector per institution (already weighted by the aggregation rule, with the
weight itself appended where the rule needs the sum of weights) and returns only the *sum over the survivors*.
Nothing else about an individual vector may leave the backend: that is the property the threat checks test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


class SecureAggregationError(RuntimeError):
    """The round cannot produce a sum (too few survivors, failed authentication, ...). Nothing is released."""


class RoundAbortedError(SecureAggregationError):
    """Too few institutions survived to reconstruct the sum; the round is abandoned without a partial sum."""


@dataclass
class AggregateResult:
    #: Sum of the survivors' input vectors, dequantised to float64.
    total: np.ndarray
    #: Institutions whose vectors are in ``total``, and those that dropped out.
    survivors: list[str]
    dropped: list[str] = field(default_factory=list)
    #: Named figures for metrics.jsonl (bytes sent, values clipped, stage wall times, ...).
    measurements: dict[str, float | int] = field(default_factory=dict)


class SecureAggregator(ABC):
    """Sums per-institution vectors so that the coordinator learns only the sum."""

    name: str = "abstract"

    @abstractmethod
    def aggregate(self, round_id: int, contributions: Mapping[str, np.ndarray]) -> AggregateResult:
        """Return the sum of ``contributions`` over the institutions that survive the protocol."""


class PlaintextAggregator(SecureAggregator):
    """``secure_aggregation: none``: the coordinator sees every vector. For baselines and benchmarks only."""

    name = "none"

    def aggregate(self, round_id: int, contributions: Mapping[str, np.ndarray]) -> AggregateResult:
        if not contributions:
            raise RoundAbortedError(f"round {round_id}: no contributions to aggregate")
        vectors = list(contributions.values())
        size = vectors[0].size
        for name, v in contributions.items():
            if v.ndim != 1 or v.size != size:
                raise SecureAggregationError(f"round {round_id}: {name} sent shape {v.shape}, expected ({size},)")
            if not np.all(np.isfinite(v)):
                raise SecureAggregationError(f"round {round_id}: {name}'s update contains NaN or Inf")
        total = np.zeros(size, dtype=np.float64)
        for v in vectors:
            total += v
        return AggregateResult(
            total=total,
            survivors=sorted(contributions),
            measurements={"bytes_sent_per_client": int(vectors[0].astype(np.float32).nbytes)},
        )
