"""``prv``: privacy random variables (Gopi et al. 2021), tighter than RDP; Opacus returns its upper bound,
which is what is reported.

The curve is one numerical composition: the discretisation domain is chosen for the whole history (Opacus's
rule: its size from RDP tail bounds, its mesh from the total number of steps; both only grow with more steps,
so the domain is valid for every prefix), each round's PRV is discretised once, and the composition is a
running product of spectra with one inverse FFT per round to read ε off (equal to Opacus's own composition of
every prefix to 1e-6, tests/test_privacy_integrity.py). The RDP bounds reuse the ``rdp`` accountant's cached
per-step vectors instead of recomputing them."""

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
        )
        from opacus.accountants.analysis.prv.prvs import DiscretePRV
        from scipy.fft import irfft, next_fast_len, rfft

        entries = [e for h in histories for e in h]
        eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
        total = sum(steps for _, _, steps in entries)
        size = _safe_domain_size(entries, eps_error, delta_error)
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        aligned = Domain.create_aligned(-size, size, mesh)
        # Widen the (symmetric) domain to a length the FFT is fast at: a larger domain is as safe as the one
        # Opacus's rule asks for, and an arbitrary length can cost ten times more per transform.
        n = next_fast_len(aligned.size, real=True)
        while n % 2:
            n = next_fast_len(n + 1, real=True)
        half = n // 2 - 1
        domain = Domain(t_min=-half * aligned.dt, t_max=(half + 1) * aligned.dt, size=n)
        # Opacus composes each PRV with itself by FFT and the results by linear convolution. Composition is a
        # product in the Fourier domain, so the running product of every step's spectrum gives each round's
        # composed distribution with one inverse transform: the same circular convolution Opacus's
        # self-composition uses (the domain is sized for the whole history, so no mass wraps around), re-centred
        # the same way (Opacus's `_compose_fourier` roll, for the total number of steps so far).
        spectrum, steps_so_far, shift, out = None, 0, 0.0, []
        for history in histories:
            for sigma, q, steps in history:
                prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min,
                                                     domain.t_max)
                pmf, mean_shift = _discretize(prv, domain)
                part = rfft(pmf) ** steps
                spectrum = part if spectrum is None else spectrum * part
                steps_so_far += steps
                shift += steps * mean_shift
            if spectrum is None:
                out.append(0.0)
                continue
            roll = steps_so_far - 1 + (n // 2 if steps_so_far % 2 == 0 else 0)
            pmf = np.roll(irfft(spectrum, n), roll)
            composed = DiscretePRV(pmf=pmf, domain=domain.shift_right(shift))
            _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
            out.append(float(upper))
        return out


def _discretize(prv, domain) -> tuple[np.ndarray, float]:
    """Opacus's ``discretize`` (probability mass per cell, mean-corrected shift), with the CDF evaluated once per
    cell edge instead of twice."""
    edges = domain.t_min - domain.dt / 2 + domain.dt * np.arange(domain.size + 1)
    pmf = np.diff(prv.cdf(edges))
    mean_shift = prv.mean() - float(np.dot(domain.ts, pmf))
    if np.abs(mean_shift) >= domain.dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return pmf, mean_shift
