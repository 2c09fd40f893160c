"""The CrypTen 0.4.1 party engine behind ``secure_aggregation: crypten`` (see ``aggregator`` for the protocol,
the trust model and the timeouts; ``fixed_point`` for the precision). CrypTen itself is imported only in the
party processes, never when this package is imported."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedse_secure.secagg.crypten_backend.aggregator import CryptenParties
    from fedse_secure.secagg.crypten_backend.compat import CryptenUnavailableError, check_crypten_installed

__all__ = ["CryptenParties", "CryptenUnavailableError", "check_crypten_installed"]

# Resolved lazily so that a party process (`python -m ...crypten_backend.party`) does not import the
# launcher and the config models: each of the n+1 parties of every round pays its own start-up.
_WHERE = {
    "CryptenParties": "aggregator",
    "CryptenUnavailableError": "compat",
    "check_crypten_installed": "compat",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
