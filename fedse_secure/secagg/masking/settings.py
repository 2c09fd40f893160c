"""Settings of the masking backend: what a coordinator proposes, and what the institutions of a simulation accept.

The graph parameters are never a free choice: :meth:`MaskingSettings.parameters` derives them from the declared
colluder and dropout fractions (``requirements``), and explicit ``neighbours``/``threshold`` may only raise them.
In ``fedse simulate`` every institution accepts exactly :meth:`MaskingSettings.requirements`; a deployed
institution states its own (``secure_aggregation`` in its deployment file) and refuses a weaker setup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedse_secure.secagg.base import FixedPointSettings
from fedse_secure.secagg.masking.requirements import GraphParameters, MaskingRequirements

__all__ = ["GraphParameters", "MaskingSettings"]

_DEFAULTS = MaskingRequirements()
DEFAULT_FRACTIONAL_BITS = 24


class MaskingSettings(FixedPointSettings):
    """``federation.secure_aggregation`` for pairwise masking (SecAgg / SecAgg+)."""

    backend: Literal["masking"] = "masking"
    fractional_bits: int | None = Field(
        None, ge=8, le=40,
        description="Fixed-point precision (values rounded to multiples of 2^-fractional_bits); None = 24 (the "
                    "fixed-point default CrypTen shares), lowered as far as needed to keep the masked ring at 32 bits "
                    "(23 at 16 institutions with clip_range 8, 21 at 100, 18 at 1000), so the upload is the size of "
                    "the fp32 adapter.",
    )
    colluder_fraction: float = Field(
        _DEFAULTS.colluder_fraction, ge=0.0, lt=0.5, allow_inf_nan=False,
        description="Fraction of institutions (rounded up) assumed to collude with the coordinator; degree and "
                    "threshold are derived (Bell et al.) so that they learn no individual update.",
    )
    dropout_fraction: float = Field(
        _DEFAULTS.dropout_fraction, ge=0.0, lt=0.5, allow_inf_nan=False,
        description="Fraction of institutions (rounded down) that may drop out without the round aborting.",
    )
    threshold: int | None = Field(
        None, ge=2,
        description="Shamir threshold t (live share holders needed per neighbourhood); None = derived from "
                    "colluder_fraction and dropout_fraction; a value may only raise it.",
    )
    neighbours: int | None = Field(
        None, ge=2,
        description="SecAgg+ neighbour-graph degree k; None = derived from colluder_fraction and dropout_fraction "
                    "(the complete graph for small federations); a value may only raise it.",
    )

    def requirements(self) -> MaskingRequirements:
        """What institutions configured with these settings accept (every institution of a simulation)."""
        return MaskingRequirements(colluder_fraction=self.colluder_fraction, dropout_fraction=self.dropout_fraction,
                                   min_degree=self.neighbours, min_threshold=self.threshold)

    def parameters(self, n_participants: int) -> GraphParameters:
        """Degree and threshold for a round of ``n_participants`` (the coordinator proposes exactly these)."""
        return self.requirements().parameters(n_participants)

    def precision(self, n_participants: int) -> int:
        """The fractional bits of a round of ``n_participants``."""
        from fedse_secure.secagg.masking.quantize import fractional_bits_for

        if self.fractional_bits is not None:
            return self.fractional_bits
        # Never finer than the shared default: small federations then encode exactly as CrypTen does.
        return min(DEFAULT_FRACTIONAL_BITS, fractional_bits_for(n_participants, self.clip_range))
