"""``secure_aggregation: crypten``: secure sum by CrypTen 0.4.1 parties (see ``aggregator`` for the protocol,
the trust model and the timeouts; ``fixed_point`` for the precision). CrypTen itself is imported only in the
party processes, never when this package is imported."""

from fedse_secure.secagg.crypten_backend.aggregator import CryptenAggregator, InvalidUpdateError
from fedse_secure.secagg.crypten_backend.compat import CryptenUnavailableError, check_crypten_installed

__all__ = ["CryptenAggregator", "CryptenUnavailableError", "InvalidUpdateError", "check_crypten_installed"]
