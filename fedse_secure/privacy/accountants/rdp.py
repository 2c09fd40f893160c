"""``rdp``: Rényi DP (Mironov 2017) composed over Opacus's orders, converted to (ε, δ) with Balle et al. 2020,
Thm 21: the same formula as Google's dp-accounting ``compute_epsilon`` (Canonne-Kamath-Steinke Prop. 12);
with the same orders the two libraries agree to floating-point precision.

RDP composes by addition, so the curve over rounds is a running sum of per-step RDP vectors, each computed by
Opacus once per (noise multiplier, sample rate) and kept for the life of the process: a budget check in a
long-running institution costs one new vector per round."""

from __future__ import annotations

import functools

import numpy as np

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant

# Opacus's RDPAccountant.DEFAULT_ALPHAS, spelled out so that the orders in use are visible and stable.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@functools.lru_cache(maxsize=65536)
def rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each order (Opacus's computation; cached, read-only)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    vec = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
                     dtype=np.float64)
    vec.setflags(write=False)
    return vec


def rdp_of(history, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total = total + steps * rdp_per_step(sigma, q, orders)
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


@ACCOUNTANTS.register("rdp")
class RdpAccountant(Accountant):
    name = "rdp"
    title = "RDP (Opacus)"

    def __init__(self, orders=RDP_ORDERS) -> None:
        self.orders = tuple(orders)

    def _curve(self, histories, delta, relation):
        running, seen, out = np.zeros(len(self.orders)), False, []
        for history in histories:
            running = running + rdp_of(history, self.orders)
            seen = seen or bool(history)
            out.append(rdp_to_epsilon(running, delta, self.orders) if seen else 0.0)
        return out
