"""``prv``: privacy random variables (Gopi et al. 2021), tighter than RDP; Opacus returns its upper bound,
which is what is reported."""

from __future__ import annotations

from fedse_secure.privacy.accountants import ACCOUNTANTS, Accountant, AccountingError

# Absolute error of the PRV accountant's ε estimate (Opacus's default); the reported value is the upper bound.
PRV_EPS_ERROR = 0.01


@ACCOUNTANTS.register("prv")
class PrvAccountant(Accountant):
    name = "prv"
    title = "PRV (Opacus)"
    # PRV is never looser than RDP, so the (cheap) RDP noise multiplier is a valid upper end of a bracket.
    bracket_with = "rdp"

    def _epsilon(self, history, delta):
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = list(history)
        try:
            return acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
        except Exception as err:  # Opacus raises bare ValueError/RuntimeError from its numerics
            raise AccountingError(
                f"the PRV accountant could not compute epsilon for {list(history)} at delta={delta} ({err}); "
                "this happens for very large epsilon or extreme sample rates; use the RDP accountant "
                "(privacy.accountant: rdp), which is always defined"
            ) from err
