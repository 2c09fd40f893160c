"""One CrypTen party of a secure-aggregation round, run as its own process.

    python -m fedse_secure.secagg.crypten_backend.party --workdir DIR --rank R --institutions N ...

Ranks 0..N-1 are the institutions; rank N is the coordinator, which has no input and is the only party the
sum is revealed to. Every party must run the same sequence of CrypTen calls (the pseudo-random zero
sharings are drawn from generators shared with the neighbouring ranks, so the order of draws must match).

The work directory is the only channel to the process that launched the parties (the simulation's
coordinator): institution R reads ``input.R.npy``; each party writes the markers ``ready.R`` (imported,
about to rendezvous), ``joined.R`` (rendezvous and CrypTen's seed exchange done) and ``stats.R.json``; the
coordinator party writes the revealed int64 ring sum to ``revealed.npy``. Markers let the launcher say
*which* party never arrived when a stage times out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

from fedse_secure.secagg.crypten_backend.compat import EXIT_UNAVAILABLE, CryptenUnavailableError

EXIT_ERROR = 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _bound_timeouts(dist, timeout: timedelta) -> None:
    """Give every process group CrypTen creates our timeout.

    CrypTen calls ``init_process_group`` and ``new_group`` without one, so torch's 30-minute default would
    apply to the rendezvous and to every collective: a party whose peer vanished would hang that long.
    """
    for name in ("init_process_group", "new_group"):
        original = getattr(dist, name)
        if getattr(original, "_fedse_bounded", False):
            continue

        @functools.wraps(original)
        def bounded(*args, _original=original, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            return _original(*args, **kwargs)

        bounded._fedse_bounded = True
        setattr(dist, name, bounded)


def _die_with_launcher(launcher_pid: int) -> None:
    """Linux: get SIGKILL when the launcher dies, so a killed simulation leaves no party behind waiting
    for a rendezvous (the torch.distributed timeout would end it too, but only much later)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The launcher may already have died between our fork and the prctl call.
    if os.getppid() != launcher_pid:
        os._exit(EXIT_ERROR)


def run_party(workdir: Path, rank: int, institutions: int, size: int, clip_range: float,
              fractional_bits: int, timeout_s: float) -> None:
    t_start = time.perf_counter()
    world_size = institutions + 1
    coordinator = institutions
    # The launcher's environment may come from torchrun or another job; these four are ours.
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["RENDEZVOUS"] = (workdir / "rendezvous").resolve().as_uri()
    os.environ["DISTRIBUTED_BACKEND"] = "gloo"

    import numpy as np
    import torch

    # n+1 parties share the machine; more intra-op threads only oversubscribe it (and CrypTen has hung
    # with many threads: facebookresearch/CrypTen#378).
    torch.set_num_threads(1)

    from fedse_secure.secagg.crypten_backend.compat import import_crypten
    from fedse_secure.secagg.crypten_backend.fixed_point import encode

    crypten = import_crypten()
    import torch.distributed as dist

    _bound_timeouts(dist, timedelta(seconds=timeout_s))
    # Byte and round counts are only kept when verbose is on (facebookresearch/CrypTen#343).
    crypten.cfg.communicator.verbose = True

    if rank < institutions:
        x = np.load(workdir / f"input.{rank}.npy", allow_pickle=False)
        if x.shape != (size,):
            raise ValueError(f"input.{rank}.npy has shape {x.shape}, expected ({size},)")
        mine = torch.from_numpy(encode(x, clip_range, fractional_bits))
        del x
    else:
        mine = None
    t_imported = time.perf_counter()

    (workdir / f"ready.{rank}").touch()
    crypten.init()
    (workdir / f"joined.{rank}").touch()
    t_joined = time.perf_counter()
    crypten.reset_communication_stats()

    # Non-source parties only need the shape; CrypTen insists on a tensor, so they pass zeros.
    placeholder = torch.zeros(size, dtype=torch.int64)
    share_s = add_s = 0.0
    cpu0 = time.process_time()
    total = None
    for src in range(institutions):
        t0 = time.perf_counter()
        # precision=0: the values are already our fixed-point integers, so CrypTen's encoder multiplies
        # by 1 (no truncation) and we never use its decoder.
        shared = crypten.cryptensor(mine if src == rank else placeholder, src=src, precision=0)
        t1 = time.perf_counter()
        total = shared if total is None else total.add(shared)
        add_s += time.perf_counter() - t1
        share_s += t1 - t0
    del placeholder, mine

    t0 = time.perf_counter()
    # reveal(), not get_plain_text(): the raw ring sum, and only to the coordinator (a reduce, not an
    # all-reduce), so no institution ever holds the plaintext sum.
    revealed = total.reveal(dst=coordinator)
    reveal_s = time.perf_counter() - t0
    protocol_cpu_s = time.process_time() - cpu0
    if rank == coordinator:
        if revealed is None or revealed.dtype != torch.int64 or tuple(revealed.shape) != (size,):
            raise RuntimeError(f"CrypTen revealed {None if revealed is None else (revealed.dtype, revealed.shape)}")
        tmp = workdir / "revealed.tmp.npy"
        np.save(tmp, revealed.numpy(), allow_pickle=False)
        os.replace(tmp, workdir / "revealed.npy")
    elif revealed is not None:
        raise RuntimeError(f"party {rank} received the revealed sum; only the coordinator (rank {coordinator}) may")

    stats = crypten.comm.get().get_communication_stats()
    _write_atomic(
        workdir / f"stats.{rank}.json",
        json.dumps(
            {
                "rank": rank,
                "startup_s": t_imported - t_start,
                "rendezvous_s": t_joined - t_imported,
                "share_s": share_s,
                "add_s": add_s,
                "reveal_s": reveal_s,
                "protocol_cpu_s": protocol_cpu_s,
                "bytes": int(stats["bytes"]),
                "rounds": int(stats["rounds"]),
            }
        ).encode(),
    )
    # Leave together, so that no party tears its connections down while a peer still reads from them.
    crypten.comm.get().barrier()
    crypten.uninit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--institutions", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--clip-range", type=float, required=True)
    p.add_argument("--fractional-bits", type=int, required=True)
    p.add_argument("--timeout-s", type=float, required=True)
    p.add_argument("--launcher-pid", type=int, default=None)
    a = p.parse_args(argv)
    if a.launcher_pid is not None:
        _die_with_launcher(a.launcher_pid)
    try:
        run_party(a.workdir, a.rank, a.institutions, a.size, a.clip_range, a.fractional_bits, a.timeout_s)
    except Exception as err:  # noqa: BLE001 - every failure must reach the launcher as text
        traceback.print_exc()
        # The last stderr line is what the launcher quotes in its error.
        print(f"party {a.rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE if isinstance(err, CryptenUnavailableError) else EXIT_ERROR
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: finalising torch and CrypTen's modules takes over a second per party and
    # there is nothing left to clean up (the process group is already destroyed, the outputs are on disk).
    os._exit(code)
