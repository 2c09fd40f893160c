"""``rdp``: Rényi DP (Mironov 2017) composed over Opacus's orders, converted to (ε, δ) with Balle et al. 2020,
Thm 21: the same formula as Google's dp-accounting ``compute_epsilon`` (Canonne-Kamath-Steinke Prop. 12);
with the same orders the two libraries agree to floating-point precision."""

from __future__ import annotations

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant

# Opacus's RDPAccountant.DEFAULT_ALPHAS, spelled out so that the orders in use are visible and stable.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@ACCOUNTANTS.register("rdp")
class RdpAccountant(Accountant):
    name = "rdp"
    title = "RDP (Opacus)"

    def __init__(self, orders=RDP_ORDERS) -> None:
        self.orders = list(orders)

    def _epsilon(self, history, delta):
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = list(history)
        return acc.get_epsilon(delta=delta, alphas=self.orders)
