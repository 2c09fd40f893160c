"""Where a masking round spends user and system CPU time, stage by stage (issue 14's stalls).

On the benchmark's VM some rounds take 0.1-0.2 s longer than others, all of it system time: the kernel faulting
in pages the host had reclaimed. ``benchmarks/secagg.py`` shows each round's system time; this script says
which part of the round pays it. It alternates plaintext and masking rounds as ``secagg.py`` does (10 clients x
8M parameters, one core) and times, per masking round, the clients' masking pass, the server's tag-and-sum of
the masked inputs and the server's unmask stage (user ms, system ms, minor page faults of each), by wrapping
those three methods. One line per round, then one JSON object:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg_stalls.py --rounds 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from secagg import make_inputs, run_masking, run_plaintext  # noqa: E402

from fedse_secure.secagg.masking import IdentityKey  # noqa: E402
from fedse_secure.secagg.masking.client import SecAggClient  # noqa: E402
from fedse_secure.secagg.masking.server import SecAggServer  # noqa: E402

PARTS = {"client_masking": (SecAggClient, "_on_masked_input"),
         "server_tag_and_sum": (SecAggServer, "_check_masked_input"),
         "server_unmask": (SecAggServer, "_unmask")}


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def time_parts(totals: dict[str, list[float]]) -> None:
    """Wrap each part's method so that every call adds its user s, system s and minor faults to ``totals``."""
    for part, (cls, name) in PARTS.items():
        method = getattr(cls, name)

        def timed(*args, _method=method, _part=part, **kwargs):
            before = _usage()
            try:
                return _method(*args, **kwargs)
            finally:
                after = _usage()
                t = totals.setdefault(_part, [0.0, 0.0, 0])
                for i in range(3):
                    t[i] += after[i] - before[i]

        setattr(cls, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=8_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    inputs = make_inputs(args.clients, args.params)
    identities = {p: IdentityKey.generate() for p in inputs}
    for _ in range(2):  # the first rounds of a process fault in everything; secagg.py warms up the same way
        run_plaintext(inputs, identities)
    totals: dict[str, list[float]] = {}
    time_parts(totals)
    rounds = []
    for r in range(args.rounds):
        run_plaintext(inputs, identities)
        totals.clear()
        t, _ = run_masking(inputs, identities, r + 1)
        row = {"cpu_s": round(t.cpu, 4), "system_s": round(t.system, 4)}
        for part, (user, system, faults) in totals.items():
            row[part] = {"user_s": round(user, 4), "system_s": round(system, 4), "minor_faults": faults}
        rounds.append(row)
        print(f"round {r + 1:2d}: {1e3 * t.cpu:6.1f} ms CPU, {1e3 * t.system:5.1f} ms system | " + " | ".join(
            f"{p} {1e3 * v['user_s']:.0f} user {1e3 * v['system_s']:.0f} system ms, {v['minor_faults']} faults"
            for p, v in row.items() if isinstance(v, dict)), flush=True)
    if args.json:
        print(json.dumps({"clients": args.clients, "params": args.params, "rounds": rounds}))


if __name__ == "__main__":
    main()
