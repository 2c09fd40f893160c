"""CrypTen row of the secure-aggregation benchmark.

``benchmarks/secagg.py`` calls :func:`time_crypten_sum` with the same vectors it gives the other backends,
in the same run. Standalone: ``python benchmarks/secagg_crypten.py --clients 3 --size 1000000``.

Two times are reported because they answer different questions:

* ``wall_s``: what one ``aggregate()`` call costs in ``fedse simulate``: starting n+1 fresh Python
  processes (importing torch and CrypTen), rendezvous, the sum, and shutting down;
* ``protocol_s``: the secure sum itself (secret-share + add + reveal, slowest party), comparable with the
  masking backend's protocol time and with a deployment where the parties stay up between rounds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedse_secure.secagg.backends.crypten import CryptenBackend, CryptenSettings
from fedse_secure.secagg.crypten_backend import fixed_point
from fedse_secure.secagg.driver import aggregate


def time_crypten_sum(vectors: list[np.ndarray], config: CryptenSettings | None = None, round_id: int = 0) -> dict:
    """Sum ``vectors`` (one per institution) with the CrypTen backend once; return timings and the error.

    ``max_abs_error`` is measured against the float64 sum of the *clipped* inputs (clipping is part of the
    protocol, and ``values_clipped`` says how much of it happened); ``error_bound`` is n * 2^-(f+1).
    """
    if len(vectors) < 3:
        raise ValueError(f"time_crypten_sum needs at least 3 vectors (one per institution), got {len(vectors)}")
    cfg = config if config is not None else CryptenSettings()
    contributions = {f"inst-{i:03d}": np.asarray(v).reshape(-1) for i, v in enumerate(vectors)}
    t0 = time.perf_counter()
    result = aggregate(CryptenBackend(cfg), round_id, contributions)
    wall = time.perf_counter() - t0

    plain = np.zeros(result.total.size, dtype=np.float64)
    for v in contributions.values():
        plain += np.clip(v.astype(np.float64), -cfg.clip_range, cfg.clip_range)
    err = np.abs(result.total - plain)
    m = result.measurements
    return {
        "backend": "crypten",
        "n_clients": len(vectors),
        "size": int(result.total.size),
        "wall_s": wall,
        "protocol_s": m["crypten_share_s"] + m["crypten_add_s"] + m["crypten_reveal_s"],
        # CPU, robust to other jobs on a shared machine: the protocol's (all parties), and everything the
        # party processes burnt from start to exit.
        "protocol_cpu_s": m["crypten_protocol_cpu_s"],
        "cpu_s": m["crypten_parties_cpu_s"],
        "share_s": m["crypten_share_s"],
        "add_s": m["crypten_add_s"],
        "reveal_s": m["crypten_reveal_s"],
        "startup_s": m["crypten_startup_s"],
        "rendezvous_s": m["crypten_rendezvous_s"],
        "bytes_sent_per_client": m["bytes_sent_per_client"],
        "values_clipped": m["values_clipped"],
        "fractional_bits": cfg.fractional_bits,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "error_bound": fixed_point.error_bound(len(vectors), cfg.fractional_bits),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    vectors = [rng.normal(0.0, 1e-2, a.size).astype(np.float32) for _ in range(a.clients)]
    for r in range(a.repeats):
        print(json.dumps(time_crypten_sum(vectors, round_id=r)))


if __name__ == "__main__":
    main()
