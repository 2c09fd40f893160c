"""``none``: no differential privacy; the update leaves as trained (secure aggregation still hides it)."""

from __future__ import annotations

from fedse_secure.privacy.mechanisms import MECHANISMS, PrivacyMechanism


@MECHANISMS.register("none")
class NoPrivacy(PrivacyMechanism):
    name = "none"
