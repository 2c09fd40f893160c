"""``pld``: privacy loss distributions (Google's dp-accounting), the one accountant here that also accounts
for the ``replace-one`` neighbouring relation of Poisson-subsampled Gaussian steps.

The reported value is the pessimistic PLD estimate (an upper bound) at a value discretisation of 1e-2: coarser
than dp-accounting's default 1e-4, which only makes the bound more conservative (on the 40-round benchmark
ledger 14.98 instead of 14.94 for add-remove, 26.15 instead of 26.12 for replace-one) and makes a composition
about thirty times faster. Each event's PLD is kept for the life of the process, so a budget check in a
running institution composes only what is new to it."""

from __future__ import annotations

import functools

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant, AccountingError

PLD_DISCRETIZATION = 1e-2


@functools.lru_cache(maxsize=4096)
def _event_pld(noise_multiplier: float, sample_rate: float, steps: int, relation: str):
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    rel = (dp_accounting.NeighboringRelation.REPLACE_ONE if relation == "replace-one"
           else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=sample_rate, neighboring_relation=rel,
    ).self_compose(steps)


@ACCOUNTANTS.register("pld")
class PldAccountant(Accountant):
    name = "pld"
    title = "PLD (dp-accounting)"
    relations = ("add-remove", "replace-one")

    def _curve(self, histories, delta, relation):
        try:
            return self._compose(histories, delta, relation)
        except (MemoryError, OverflowError, ValueError) as err:  # a near-zero noise makes the PLD's support huge
            raise AccountingError(
                f"the PLD accountant could not compute epsilon at delta={delta} ({type(err).__name__}: {err}); "
                "this happens for a near-zero noise multiplier; use the RDP accountant (privacy.accountant: rdp), "
                "which is always defined"
            ) from err

    @staticmethod
    def _compose(histories, delta, relation):
        from dp_accounting.pld import privacy_loss_distribution as pld

        composed, seen, out = pld.identity(value_discretization_interval=PLD_DISCRETIZATION), False, []
        for history in histories:
            for sigma, q, steps in history:
                composed = composed.compose(_event_pld(sigma, q, steps, relation))
                seen = True
            out.append(float(composed.get_epsilon_for_delta(delta)) if seen else 0.0)
        return out
