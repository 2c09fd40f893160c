"""Client-level DP with distributed Gaussian noise under secure aggregation.

Each institution clips its whole round update (the flattened LoRA delta) to L2 norm ``C = max_grad_norm`` and
adds its *share* of the Gaussian noise before masking. Secure aggregation reveals only the sum, so no party —
the coordinator included — ever sees an un-noised update or an un-noised sum. If ``h`` clients contribute
honestly, the noise in the sum has variance ``h * s^2``; with per-client std

    s = sigma * C / sqrt(num_clients * honest_fraction)

the sum carries noise of std ``sigma * C`` (the central Gaussian mechanism with sensitivity C) as long as at
least ``num_clients * honest_fraction`` clients add their share.

Trust assumption (stated in the report and the docs): at least a fraction ``honest_fraction`` of the
``num_clients`` clients whose shares reach the sum add their noise faithfully and keep it secret. Clients that
collude with the coordinator can subtract their own noise; if fewer than ``honest_fraction * num_clients``
honest shares reach the sum, its noise std is ``sigma * C * sqrt(h / (num_clients * honest_fraction))`` < sigma*C
and the stated ε no longer holds. With dropout-tolerant secure aggregation, pass as ``num_clients`` the number
of clients guaranteed to be in the sum (e.g. the reconstruction threshold), not the number invited, so that
dropouts cannot thin the noise below the claim. Lower ``honest_fraction`` buys robustness with more noise.

Secure aggregation clips each coordinate to ``[-clip_range, clip_range]`` before quantising. That clipping acts
on each noised share, not on the sum, so it should never trigger; ``ClientDPInfo.max_abs_value`` lets the
caller check that the noised update fits inside the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedse_secure.config import PrivacyConfig
from fedse_secure.privacy.events import DpEvent


@dataclass(frozen=True)
class ClientDPInfo:
    original_norm: float
    clipped: bool
    clip_factor: float  # the update was multiplied by this (1.0 when it was within the bound)
    noise_std: float  # per-coordinate std of this client's noise share
    sum_noise_std: float  # std the sum carries if the trust assumption holds: sigma * C
    num_clients: int
    honest_fraction: float
    max_abs_value: float  # largest |coordinate| of the privatised update (compare with the backend's clip range)
    event: DpEvent


def noise_share_std(privacy: PrivacyConfig, num_clients: int) -> float:
    """Per-client noise std so that ``num_clients * honest_fraction`` honest shares sum to std sigma*C."""
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be a positive whole number")
    honest = num_clients * privacy.honest_fraction
    if honest < 1.0:
        raise ValueError(
            f"num_clients={num_clients} x honest_fraction={privacy.honest_fraction} assumes fewer than one honest "
            "client, so no noise share is trusted; raise privacy.honest_fraction or add clients"
        )
    return privacy.noise_multiplier * privacy.max_grad_norm / math.sqrt(honest)


def client_event(privacy: PrivacyConfig, num_clients: int | None = None) -> DpEvent:
    """The DP event of one client-level release (one round; every institution takes part: sample rate 1)."""
    return DpEvent(
        mechanism="gaussian",
        level="client",
        noise_multiplier=float(privacy.noise_multiplier),
        sample_rate=1.0,
        steps=1,
        clipping_bound=float(privacy.max_grad_norm),
        population=num_clients,
        neighbouring=privacy.neighbouring,
    )


def privatize_update(
    update: np.ndarray, privacy: PrivacyConfig, num_clients: int, rng
) -> tuple[np.ndarray, ClientDPInfo]:
    """Clip ``update`` to L2 norm ``privacy.max_grad_norm`` and add this client's Gaussian noise share.

    ``rng`` must be unpredictable to every other party: a :class:`~fedse_secure.privacy.noise.SecureRandom`
    (what institutions use), or a seeded numpy Generator in tests: anyone who can regenerate a client's noise
    can remove it from the sum.
    Returns the privatised update (float64, same shape) and what was done, with the event for the ledger.
    """
    from fedse_secure.privacy.noise import SecureRandom

    if privacy.mode != "client-dp":
        raise ValueError(f"privatize_update is for privacy.mode client-dp, but the mode is {privacy.mode!r}")
    if not isinstance(rng, (SecureRandom, np.random.Generator)):
        raise TypeError("rng must be a SecureRandom (or, in tests, a seeded numpy Generator)")
    x = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("the update contains NaN or inf; fix training before privatising (clipping cannot bound it)")
    std = noise_share_std(privacy, num_clients)
    c = float(privacy.max_grad_norm)
    norm = float(np.linalg.norm(x.ravel()))
    factor = min(1.0, c / norm) if norm > 0 else 1.0
    noise = rng.normal(std, x.shape) if isinstance(rng, SecureRandom) else rng.normal(0.0, std, size=x.shape)
    noised = x * factor + noise
    info = ClientDPInfo(
        original_norm=norm,
        clipped=factor < 1.0,
        clip_factor=factor,
        noise_std=std,
        sum_noise_std=privacy.noise_multiplier * c,
        num_clients=num_clients,
        honest_fraction=privacy.honest_fraction,
        max_abs_value=float(np.max(np.abs(noised))) if noised.size else 0.0,
        event=client_event(privacy, num_clients),
    )
    return noised, info
