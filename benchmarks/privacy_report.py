"""`fedse privacy report` and the budget check on a 40-round ledger: one pass per accountant (ours) against
recomposing every round prefix (what the report did before), measured side by side in one process; and the
cost of cryptographically secure DP noise against torch's Mersenne-Twister noise.

The ledger is what DP-SGD records as an institution's buffer grows: round r trains on n = 20 + 4r trajectories
at q = 4/n for 2n/4 steps (every round has its own sample rate, so nothing merges). The per-step RDP vectors
are cached for the life of a process; "cold" timings clear the caches first (a fresh `fedse privacy report`),
"warm" ones are what a long-running institution pays for its next budget check.

Usage: ``python benchmarks/privacy_report.py [--rounds 40] [--naive-prv-rounds 10] [--json]``; with ``--json``
the last line printed is one JSON object. Recomposing all 40 PRV prefixes takes minutes; ``--naive-prv-rounds``
bounds that part (its figure then covers that many prefixes and is marked so).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path


def _ledger(path: Path, rounds: int):
    from fedse_secure.privacy import DpEvent, PrivacyLedger

    ledger = PrivacyLedger(path)
    for r in range(1, rounds + 1):
        n = 20 + 4 * r
        ledger.append(DpEvent("subsampled_gaussian", "record", 1.0, 4 / n, 2 * math.ceil(n / 4), 1.0, n), r,
                      "clinic", 1e-5)
    return ledger


def _clear_caches() -> None:
    from fedse_secure.privacy.accountants import pld, rdp

    rdp.rdp_per_step.cache_clear()
    pld._event_pld.cache_clear()


def _naive(events_by_round, accountant: str, prefixes: int) -> tuple[float, list[float]]:
    """The old report: every prefix recomposed from scratch with Opacus's own accountant objects."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    from fedse_secure.privacy.accountants import opacus_history

    cls = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]
    t0, values, so_far = time.perf_counter(), [], []
    for events in events_by_round[:prefixes]:
        so_far.extend(events)
        acc = cls()
        acc.history = opacus_history(so_far)
        values.append(acc.get_epsilon(delta=1e-5))
    return time.perf_counter() - t0, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--naive-prv-rounds", type=int, default=10)
    parser.add_argument("--noise-values", type=int, default=2_442_240,
                        help="values per noisy step (default: SmolLM2-135M's LoRA, all-linear, r=8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import numpy as np
    import torch

    from fedse_secure.config import PrivacyConfig
    from fedse_secure.privacy import BudgetGuard, DpEvent
    from fedse_secure.privacy.noise import SecureRandom
    from fedse_secure.privacy.report import build_report

    out: dict = {"rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="fedse-bench-ledger-") as tmp:
        ledger = _ledger(Path(tmp) / "privacy_ledger.jsonl", args.rounds)
        grouped = ledger.events_by_round()
        events_by_round = [evs for _, evs in grouped]

        _clear_caches()
        t0 = time.perf_counter()
        report = build_report(ledger)
        out["report_all_accountants_cold_s"] = time.perf_counter() - t0
        out["accountants"] = report.accountants
        out["total_epsilon"] = report.total
        for name in ("rdp", "prv", "pld"):
            _clear_caches()
            t0 = time.perf_counter()
            build_report(ledger, accountants=[name])
            out[f"report_{name}_cold_s"] = time.perf_counter() - t0

        n = 20 + 4 * (args.rounds + 1)
        nxt = DpEvent("subsampled_gaussian", "record", 1.0, 4 / n, 2 * math.ceil(n / 4), 1.0, n)
        for name in ("rdp", "prv"):
            guard = BudgetGuard(ledger, PrivacyConfig(mode="dp-sgd", accountant=name, epsilon_budget=100.0))
            _clear_caches()
            t0 = time.perf_counter()
            guard.check(nxt)
            out[f"budget_check_{name}_cold_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            guard.check(nxt)
            out[f"budget_check_{name}_warm_s"] = time.perf_counter() - t0

        naive_rdp_s, naive_rdp = _naive(events_by_round, "rdp", args.rounds)
        out["naive_rdp_all_prefixes_s"] = naive_rdp_s
        ours_rdp = [r.cumulative["rdp"] for r in report.rows]
        out["rdp_max_abs_diff_vs_naive"] = max(abs(a - b) for a, b in zip(ours_rdp, naive_rdp))
        k = min(args.naive_prv_rounds, args.rounds)
        naive_prv_s, naive_prv = _naive(events_by_round, "prv", k)
        out["naive_prv_prefixes"] = k
        out["naive_prv_s"] = naive_prv_s
        ours_prv = [r.cumulative["prv"] for r in report.rows[:k]]
        out["prv_max_abs_diff_vs_naive"] = max(abs(a - b) for a, b in zip(ours_prv, naive_prv))
        out["ratio_rdp_naive_over_ours"] = naive_rdp_s / out["report_rdp_cold_s"]

    noise = SecureRandom()
    x = torch.zeros(args.noise_values)
    gen = torch.Generator().manual_seed(0)
    secure, plain = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        torch.from_numpy(noise.normal(1.0, (args.noise_values,))).to(x.dtype)
        secure.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.normal(0.0, 1.0, size=x.shape, generator=gen)
        plain.append(time.perf_counter() - t0)
    out["noise_values"] = args.noise_values
    out["secure_noise_s"] = min(secure)
    out["torch_noise_s"] = min(plain)
    out["secure_noise_ratio"] = min(secure) / min(plain)
    out["numpy_version"] = np.__version__

    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
