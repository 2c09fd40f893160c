"""ε from DP events, with Opacus's RDP and PRV accountants (composition across steps and rounds).

The accountants are pure reducers over events: nothing here trains or samples. ``epsilon`` composes a list of
events; ``cumulative_epsilon`` gives ε after each round, which is what a compliance reviewer reads; and
``noise_multiplier_for_target`` inverts the accountant for planning.

RDP uses Opacus's orders (``RDP_ORDERS``) and its RDP→(ε, δ) conversion (Balle et al. 2020, Thm 21), which is
the same formula as Google's dp-accounting ``compute_epsilon`` (Canonne-Kamath-Steinke Prop. 12); with the
same orders the two libraries agree to floating-point precision (see ``epsilon_dp_accounting``).
PRV (Gopi et al. 2021) is tighter; Opacus returns its upper bound, which is what we report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

from fedse_secure.privacy.events import DpEvent

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS = ("rdp", "prv")
# Opacus's RDPAccountant.DEFAULT_ALPHAS, spelled out so that the orders in use are visible and stable.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Absolute error of the PRV accountant's ε estimate (Opacus's default); the reported value is the upper bound.
PRV_EPS_ERROR = 0.01


class AccountingError(RuntimeError):
    """An accountant could not compute ε for these events; the message says which and what to try."""


def _history(events: Iterable[DpEvent]) -> list[tuple[float, float, int]]:
    """Opacus accountant history: (noise_multiplier, sample_rate, steps), merging runs of identical settings."""
    history: list[tuple[float, float, int]] = []
    for event in events:
        if not isinstance(event, DpEvent):
            raise TypeError(f"expected DpEvent, got {type(event).__name__}")
        if event.is_noop:
            continue
        if history and history[-1][0] == event.noise_multiplier and history[-1][1] == event.sample_rate:
            sigma, q, steps = history[-1]
            history[-1] = (sigma, q, steps + event.steps)
        else:
            history.append((float(event.noise_multiplier), float(event.sample_rate), int(event.steps)))
    return history


def _check(delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} is unknown; use 'rdp' or 'prv'")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1); a typical value is 1e-5 or below 1/records")


def epsilon(
    events: Iterable[DpEvent], delta: float, accountant: Accountant = "rdp", *, orders: Sequence[float] | None = None
) -> float:
    """ε of the composition of ``events`` at ``delta`` (0 for no events; ``inf`` if any step had no noise).

    ``orders`` overrides the RDP orders (default ``RDP_ORDERS``); it is ignored by the PRV accountant.
    """
    _check(delta, accountant)
    history = _history(events)
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the optimal RDP order is at the edge of the grid, and PRV's q=1 case divides by
        # zero inside a masked np.where; neither changes the (valid, upper-bound) result.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            from opacus.accountants import RDPAccountant

            acc = RDPAccountant()
            acc.history = history
            eps = acc.get_epsilon(delta=delta, alphas=list(orders if orders is not None else RDP_ORDERS))
        else:
            from opacus.accountants import PRVAccountant

            acc = PRVAccountant()
            acc.history = history
            try:
                eps = acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
            except Exception as err:  # Opacus raises bare ValueError/RuntimeError from its numerics
                raise AccountingError(
                    f"the PRV accountant could not compute epsilon for {history} at delta={delta} ({err}); "
                    "this happens for very large epsilon or extreme sample rates; use the RDP accountant "
                    "(privacy.accountant: rdp), which is always defined"
                ) from err
    eps = float(eps)
    if math.isnan(eps):
        return math.inf
    return max(0.0, eps)


def cumulative_epsilon(
    events_by_round: Sequence[Sequence[DpEvent]], delta: float, accountant: Accountant = "rdp"
) -> list[float]:
    """ε spent after each round: entry i composes the events of rounds 0..i (composition, not a sum of ε)."""
    out: list[float] = []
    so_far: list[DpEvent] = []
    for round_events in events_by_round:
        so_far.extend(round_events)
        out.append(epsilon(so_far, delta, accountant))
    return out


def rdp_curve(events: Iterable[DpEvent], orders: Sequence[float] = RDP_ORDERS) -> list[float]:
    """Composed RDP ε(α) of ``events`` at each order (Opacus's computation), for cross-checks and audits."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    total = [0.0] * len(orders)
    for sigma, q, steps in _history(events):
        if sigma == 0.0:
            return [math.inf] * len(orders)
        values = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
        total = [a + float(b) for a, b in zip(total, values)]
    return total


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
    accountant: Accountant = "rdp",
    *,
    spent_events: Sequence[DpEvent] = (),
    level: Literal["record", "client"] = "record",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within ``tolerance`` in ε) whose ``rounds`` planned rounds, composed after
    ``spent_events``, stay within ``target_epsilon``.

    Raises ``AccountingError`` when no noise level can reach the target (the already spent events alone exceed
    it) or when even a very large noise multiplier does not.
    """
    _check(delta, accountant)
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon {target_epsilon} must be positive")
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds={rounds} and steps_per_round={steps_per_round} must be at least 1")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} must lie in (0, 1]")
    spent = epsilon(spent_events, delta, accountant)
    if spent >= target_epsilon:
        raise AccountingError(
            f"epsilon already spent ({spent:.4g}) reaches the target {target_epsilon:g}; no noise level leaves "
            "room for more rounds"
        )
    mechanism = "gaussian" if sample_rate == 1.0 else "subsampled_gaussian"

    cache: dict[float, float] = {}

    def eps_at(sigma: float) -> float:
        if sigma not in cache:
            planned = [DpEvent(mechanism, level, sigma, sample_rate, steps_per_round, 1.0) for _ in range(rounds)]
            cache[sigma] = epsilon([*spent_events, *planned], delta, accountant)
        return cache[sigma]

    lo, hi = 0.0, 1.0
    if accountant == "prv":
        # PRV is never looser than RDP, so the (cheap) RDP answer is a valid upper end of the bracket.
        hi = noise_multiplier_for_target(
            target_epsilon, delta, sample_rate, steps_per_round, rounds, "rdp", spent_events=spent_events,
            level=level, tolerance=tolerance / 4,
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
