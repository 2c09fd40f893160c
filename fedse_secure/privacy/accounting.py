"""ε from DP events under any registered accountant (``privacy.accountants``): composition across steps and
rounds, ε after each round (what a compliance reviewer reads), the inverse for planning, and an independent
cross-check with Google's dp-accounting.

Nothing here trains or samples: accountants are pure functions of the recorded events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

from fedse_secure.privacy.accountants import AccountingError, check_delta, get_accountant
from fedse_secure.privacy.accountants.rdp import RDP_ORDERS
from fedse_secure.privacy.events import DpEvent

__all__ = ["AccountingError", "RDP_ORDERS", "cumulative_epsilon", "epsilon", "epsilon_dp_accounting",
           "noise_multiplier_for_target"]


def epsilon(events: Iterable[DpEvent], delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of ``events`` at ``delta`` under the named accountant (0 for no events; ``inf``
    if any step had no noise)."""
    return get_accountant(accountant).epsilon(events, delta)


def cumulative_epsilon(
    events_by_round: Sequence[Sequence[DpEvent]], delta: float, accountant: str = "rdp"
) -> list[float]:
    """ε spent after each round: entry i composes the events of rounds 0..i (composition, not a sum of ε),
    computed in one pass (about the cost of one composition of the whole ledger)."""
    return get_accountant(accountant).curve(events_by_round, delta)


def epsilon_dp_accounting(
    events: Iterable[DpEvent], delta: float, orders: Sequence[float] | None = RDP_ORDERS
) -> float:
    """ε from Google's dp-accounting ``RdpAccountant`` (independent implementation; needs dp-accounting).

    With ``orders=RDP_ORDERS`` (the default) this uses the same orders as our RDP accountant, so any difference
    comes from the RDP computation itself; ``orders=None`` uses dp-accounting's own default orders.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1)")
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the cross-check needs Google's dp-accounting; install it with `pip install 'fedse-secure[audit]'`"
        ) from None
    real = [e for e in events if not e.is_noop]
    if not real:
        return 0.0
    if any(e.neighbouring != "add-remove" for e in real):
        raise ValueError("dp-accounting's RDP accountant accounts Poisson-subsampled Gaussians for add/remove-one "
                         "only; cross-check replace-one events with the pld accountant instead")
    if any(e.noise_multiplier == 0.0 for e in real):
        return math.inf
    import logging

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    # dp-accounting logs a warning for every fractional order whose series it gives up on (the order is then
    # excluded, which only loosens its bound); the comparison is ours to report, not a log flood.
    absl_logger.setLevel(logging.ERROR)
    try:
        acc = RdpAccountant(orders=list(orders) if orders is not None else None)
        acc.compose(dp_accounting.ComposedDpEvent([e.to_dp_accounting() for e in real]))
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def noise_multiplier_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    *,
    spent_events: Sequence[DpEvent] = (),
    level: Literal["record", "client"] = "record",
    neighbouring: Literal["add-remove", "replace-one"] = "add-remove",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within ``tolerance`` in ε) whose ``rounds`` planned rounds, composed after
    ``spent_events``, stay within ``target_epsilon``.

    Raises ``AccountingError`` when no noise level can reach the target (the already spent events alone exceed
    it) or when even a very large noise multiplier does not.
    """
    check_delta(delta)
    acc = get_accountant(accountant)
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be positive")
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds={rounds} and steps_per_round={steps_per_round} must be at least 1")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} must lie in (0, 1]")
    spent = acc.epsilon(spent_events, delta)
    if spent >= target_epsilon:
        raise AccountingError(
            f"epsilon already spent ({spent:.4g}) reaches the target {target_epsilon:g}; no noise level leaves "
            "room for more rounds"
        )
    mechanism = "gaussian" if sample_rate == 1.0 else "subsampled_gaussian"

    cache: dict[float, float] = {}

    def eps_at(sigma: float) -> float:
        if sigma not in cache:
            planned = [DpEvent(mechanism, level, sigma, sample_rate, steps_per_round, 1.0, neighbouring=neighbouring)
                       for _ in range(rounds)]
            cache[sigma] = acc.epsilon([*spent_events, *planned], delta)
        return cache[sigma]

    lo, hi = 0.0, 1.0
    if acc.bracket_with is not None:
        # A looser accountant's answer is enough noise for this one too: a valid upper end of the bracket.
        hi = noise_multiplier_for_target(
            target_epsilon, delta, sample_rate, steps_per_round, rounds, acc.bracket_with,
            spent_events=spent_events, level=level, neighbouring=neighbouring, tolerance=tolerance / 4,
        )
        lo = hi / 2
        while eps_at(lo) <= target_epsilon:
            lo, hi = lo / 2, lo
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise AccountingError(
                f"even noise_multiplier={hi:g} exceeds epsilon={target_epsilon:g}; plan fewer rounds or steps"
            )
    # Bisection (ε decreases as σ grows): keep eps(hi) <= target, stop once it is within tolerance of it.
    while target_epsilon - eps_at(hi) > tolerance * target_epsilon and hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
