"""Settings of the masking backend, and the one place its graph parameters (degree, threshold) are derived."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from fedse_secure.secagg.base import FixedPointSettings
from fedse_secure.secagg.masking.graph import default_threshold, resolve_degree


@dataclass(frozen=True)
class GraphParameters:
    degree: int
    #: Shamir threshold: live holders needed per neighbourhood, and the fewest survivors a released sum has.
    threshold: int

    @property
    def neighbourhood(self) -> int:
        return self.degree + 1


class MaskingSettings(FixedPointSettings):
    """``federation.secure_aggregation`` for pairwise masking (SecAgg / SecAgg+)."""

    backend: Literal["masking"] = "masking"
    threshold: int | None = Field(
        None, ge=2,
        description="Shamir threshold t (live share holders needed per neighbourhood); None = max(2, floor(2m/3)+1) "
                    "for neighbourhoods of m = degree + 1.",
    )
    neighbours: int | None = Field(
        None, ge=2,
        description="SecAgg+ neighbour-graph degree k; None = the complete graph for n <= 32, else about "
                    "2*ceil(log2 n) (k-regular).",
    )

    def parameters(self, n_participants: int) -> GraphParameters:
        """Degree and threshold for a round of ``n_participants`` (the server proposes exactly these)."""
        degree = resolve_degree(n_participants, self.neighbours)
        t = self.threshold if self.threshold is not None else default_threshold(degree + 1)
        return GraphParameters(degree, t)
