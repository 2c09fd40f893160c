"""The secure-aggregation backends, by name (``federation.secure_aggregation.backend`` in a config).

Each module here registers one :class:`~fedse_secure.secagg.base.Backend` subclass with ``@BACKENDS.register``;
a new backend is one new module (its settings model, capabilities and two machines) and nothing else.
"""

from __future__ import annotations

from fedse_secure.registry import Registry
from fedse_secure.secagg.base import Backend, BackendSettings

BACKENDS: Registry[type[Backend]] = Registry("secure-aggregation backend", __name__)


def build_backend(settings: BackendSettings, **seams) -> Backend:
    """The backend its settings name, configured with them (``seams``: test-only injections, e.g. ``aead``)."""
    return BACKENDS.get(settings.backend)(settings, **seams)


__all__ = ["BACKENDS", "build_backend"]
