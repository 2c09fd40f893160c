"""``prv``: privacy random variables (Gopi et al. 2021), tighter than RDP; Opacus returns its upper bound,
which is what is reported.

The curve is one numerical composition: the discretisation domain is chosen for the whole history (Opacus's
rule: its size from RDP tail bounds, its mesh from the total number of steps; both only grow with more steps,
so the domain is valid for every prefix), each round's PRV is discretised and self-composed once, and the
rounds are convolved in order, reading ε off after each. The RDP bounds reuse the ``rdp`` accountant's cached
per-step vectors instead of recomputing them, which is most of what a PRV composition costs in Opacus."""

from __future__ import annotations

import numpy as np

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant, AccountingError
from fedse_secure.privacy.accountants.rdp import rdp_of, rdp_to_epsilon

# Absolute error of the PRV accountant's ε estimate (Opacus's default); the reported value is the upper bound.
PRV_EPS_ERROR = 0.01


def _safe_domain_size(entries, eps_error: float, delta_error: float) -> float:
    """Opacus's ``compute_safe_domain_size`` (Gopi et al., remark 5.6), on cached RDP vectors."""
    total = sum(steps for _, _, steps in entries)
    bound = rdp_to_epsilon(rdp_of(entries), delta_error / 4)
    for sigma, q, _ in entries:
        bound = max(bound, rdp_to_epsilon(rdp_of([(sigma, q, 1)]), delta_error / (8 * total)))
    return max(bound, eps_error) + 3


@ACCOUNTANTS.register("prv")
class PrvAccountant(Accountant):
    name = "prv"
    title = "PRV (Opacus)"
    # PRV is never looser than RDP, so the (cheap) RDP noise multiplier is a valid upper end of a bracket.
    bracket_with = "rdp"

    def _curve(self, histories, delta, relation):
        try:
            return self._compose(histories, delta)
        except AccountingError:
            raise
        except Exception as err:  # Opacus raises bare ValueError/RuntimeError/MemoryError from its numerics
            raise AccountingError(
                f"the PRV accountant could not compute epsilon at delta={delta} ({type(err).__name__}: {err}); "
                "this happens for very large epsilon or extreme sample rates; use the RDP accountant "
                "(privacy.accountant: rdp), which is always defined"
            ) from err

    @staticmethod
    def _compose(histories, delta):
        from opacus.accountants.analysis.prv import (
            Domain,
            PoissonSubsampledGaussianPRV,
            TruncatedPrivacyRandomVariable,
            discretize,
        )
        # Opacus 1.6's own composition steps (pinned version): self-composition by FFT, pairwise convolution.
        from opacus.accountants.analysis.prv.compose import _compose_fourier, _compose_two

        entries = [e for h in histories for e in h]
        eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
        total = sum(steps for _, _, steps in entries)
        size = _safe_domain_size(entries, eps_error, delta_error)
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        domain = Domain.create_aligned(-size, size, mesh)
        composed, out = None, []
        for history in histories:
            for sigma, q, steps in history:
                prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min,
                                                     domain.t_max)
                step = _compose_fourier(discretize(prv, domain), steps)
                composed = step if composed is None else _compose_two(composed, step)
            if composed is None:
                out.append(0.0)
            else:
                _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
                out.append(float(upper))
        return out
