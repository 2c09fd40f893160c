"""``secure_aggregation: crypten``: the sum computed by CrypTen parties, one local process per party.

Round protocol (n institutions, world size n + 1):

1. Each institution's client machine (``secagg/backends/crypten.py``) checks its update (shape, NaN/Inf,
   clipping range) before handing it over, so a bad update never costs a rendezvous.
2. The launcher (this process, playing the coordinator's host) starts n institution parties (ranks 0..n-1) and one coordinator party (rank n, no input) as fresh
   Python processes (``subprocess``, i.e. fork+exec: safe from a process that holds a model and torch's
   thread pools, and no re-import of ``__main__`` as with multiprocessing's spawn). They meet through a
   ``file://`` rendezvous in a private temporary folder and talk over torch.distributed/gloo.
3. Each institution encodes its update as fixed-point integers (``fixed_point.encode``) and secret-shares
   it with ``crypten.cryptensor(x, src=rank, precision=0)``; every party adds its shares locally; the sum
   is revealed with a reduce to the coordinator's rank only, and decoded exactly by
   ``fixed_point.decode`` (never by CrypTen's decoder, which shifts some negatives by 1.0).
4. Every stage has ``federation.secure_aggregation.stage_timeout_s``. A party that crashes, never arrives or stalls
   aborts the round: all parties are killed, nothing is revealed, and :class:`RoundAbortedError` names the
   party. CrypTen's sharing is n-of-n, so there is no dropout recovery (the masking backend has it).

Trust model: semi-honest (honest-but-curious) parties, CrypTen's only model. A sum needs additions only,
which are local on additive shares: no Beaver triples, so neither CrypTen's trusted third party nor its
trusted first party provider is used or needed (CrypTen's default TFP provider is never invoked). There is
no authentication of parties beyond the private rendezvous folder, and no protection against a party that
deviates (it can shift the sum arbitrarily) -- the same as CrypTen itself.

CrypTen shares an input as ``x + PRZS`` where the pseudo-random zero sharing comes from seeds that each
party shares with its two ring neighbours (rank +- 1 mod n+1). Hence a coalition holding *both* ring
neighbours of an institution and seeing that institution's share of the sum learns its update; the
coordinator alone (or with any coalition that lacks two such neighbours) learns only the sum. The
coordinator sits between institutions n-1 and 0. The masking backend (pairwise masks with Shamir-shared
seeds) resists larger coalitions; choose it when that matters.

Two more limits of CrypTen 0.4.1 that this backend inherits, and why it is for local parties only:

* the zero sharings are drawn from ``torch.Generator`` (Mersenne Twister) with 64-bit seeds from
  ``os.urandom``: a statistical PRG, not a cryptographic one (the masking backend uses AEGIS-128X2
  keystreams under 128-bit keys derived by HKDF);
* gloo traffic, including CrypTen's seed exchange, is neither encrypted nor authenticated. On one host
  (loopback, a 0700 rendezvous folder) that is acceptable; across machines it would need a private network,
  which is why the backend declares itself single-site and a Flower deployment refuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fedse_secure
from fedse_secure.secagg.base import RoundAbortedError, SecureAggregationError
from fedse_secure.secagg.crypten_backend import fixed_point
from fedse_secure.secagg.crypten_backend.compat import (
    EXIT_UNAVAILABLE,
    CryptenUnavailableError,
    check_crypten_installed,
)

PARTY_MODULE = "fedse_secure.secagg.crypten_backend.party"


class CryptenParties:
    """Runs the CrypTen parties of a round (torch.distributed, gloo), one local process per party.

    ``settings.clip_range``, ``fractional_bits`` and ``stage_timeout_s`` apply; the sharing is n-of-n over all
    parties. ``python`` is the interpreter that runs the parties (default: this one); ``workdir_root`` the
    folder for each round's private temporary folder (default: the system's temporary folder).
    """

    def __init__(
        self,
        settings,
        *,
        python: str | None = None,
        workdir_root: str | os.PathLike | None = None,
        startup_allowance_s: float = 120.0,
    ) -> None:
        self.settings = settings
        # Fail at set-up, before any training, if CrypTen is missing; the import itself (with the torch
        # shim) happens only in the party processes.
        self.crypten_version = check_crypten_installed()
        self.python = python or sys.executable
        self.workdir_root = None if workdir_root is None else Path(workdir_root)
        # Time a fresh party process may take to import torch and CrypTen before the stage clock starts.
        self.startup_allowance_s = float(startup_allowance_s)

    def sum(self, round_id: int, names: list[str], vectors: list[np.ndarray],
            absent: frozenset[str] = frozenset()) -> tuple[np.ndarray, dict[str, float | int]]:
        """The sum of ``vectors`` (already checked, one per name) revealed to the coordinator's party only,
        decoded to float64, with the round's measurements. Institutions in ``absent`` are never started, which
        exercises the "party never arrives" path (tests)."""
        t_start = time.perf_counter()
        n, size = len(names), vectors[0].size
        fixed_point.check_headroom(n, self.settings.clip_range, self.settings.fractional_bits)
        root = self.workdir_root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        # mkdtemp makes the folder 0700: the inputs written there are as private as this process's memory.
        workdir = Path(tempfile.mkdtemp(prefix=f"fedse-crypten-r{round_id}-", dir=root))
        try:
            for rank, v in enumerate(vectors):
                np.save(workdir / f"input.{rank}.npy", v, allow_pickle=False)
            run = _Round(self, round_id, names, size, workdir, absent)
            ring_sum, stats, stage_s = run.execute()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

        bound = n * fixed_point.max_quantised(self.settings.clip_range, self.settings.fractional_bits)
        peak = int(np.max(np.abs(ring_sum))) if ring_sum.size else 0
        if peak > bound:
            # Cannot happen when every party followed the protocol; a deviating party (or a bug) can.
            raise SecureAggregationError(
                f"round {round_id}: the revealed CrypTen sum has magnitude {peak}, above the largest possible "
                f"{bound}; a party did not follow the protocol. The round's sum is discarded"
            )
        total = fixed_point.decode(ring_sum, self.settings.fractional_bits)

        inst = [stats[r] for r in range(n)]
        def worst(key: str) -> float:
            return float(max(s[key] for s in stats.values()))

        measurements: dict[str, float | int] = {
            # Same names as the masking backend where the figure means the same thing.
            "ring_bits": 64,
            "fractional_bits": self.settings.fractional_bits,
            "crypten_parties": n + 1,
            # As CrypTen's communicator counts it: an institution sends its d int64 shares once (the reduce).
            "bytes_sent_per_client": int(max(s["bytes"] for s in inst)),
            "bytes_received_coordinator": int(stats[n]["bytes"]),
            "crypten_startup_s": worst("startup_s"),
            "crypten_rendezvous_s": stage_s["rendezvous"],
            "crypten_share_s": worst("share_s"),
            "crypten_add_s": worst("add_s"),
            "crypten_reveal_s": worst("reveal_s"),
            "crypten_sum_s": stage_s["sum"],
            # CPU seconds of the share/add/reveal work, summed over all parties (gloo's threads included).
            "crypten_protocol_cpu_s": float(sum(s["protocol_cpu_s"] for s in stats.values())),
            # CPU seconds of the party processes from start to exit (interpreter and torch import included).
            "crypten_parties_cpu_s": stage_s["parties_cpu"],
            "crypten_wall_s": time.perf_counter() - t_start,
        }
        return total, measurements


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _Round:
    """Launches and watches the n+1 party processes of one round."""

    POLL_S = 0.02

    def __init__(self, agg: CryptenParties, round_id: int, names: list[str], size: int, workdir: Path,
                 absent: frozenset[str]) -> None:
        self.agg, self.round_id, self.names, self.size, self.workdir = agg, round_id, names, size, workdir
        self.n = len(names)
        self.world = self.n + 1
        self.timeout = float(agg.settings.stage_timeout_s)
        self.procs: dict[int, subprocess.Popen] = {}
        self.not_started = {r for r, name in enumerate(names) if name in absent}

    def who(self, rank: int) -> str:
        return f"party {rank} (institution {self.names[rank]!r})" if rank < self.n else f"party {rank} (the coordinator)"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The parties must import this very package, installed or not.
        pkg_root = str(Path(fedse_secure.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
        # n+1 processes on a shared machine: one thread each (see party.py).
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        # All parties are local: gloo must bind to loopback, not to whatever the hostname resolves to.
        if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        return env

    def _launch(self) -> None:
        cfg = self.agg.settings
        env = self._env()
        # The parties' own torch.distributed timeout is a backstop for when this process dies; it is longer
        # than ours so that, normally, we are the ones who notice and can say which party is missing.
        party_timeout = 2 * self.timeout + 5
        for rank in range(self.world):
            if rank in self.not_started:
                continue
            cmd = [
                self.agg.python, "-m", PARTY_MODULE,
                "--workdir", str(self.workdir), "--rank", str(rank), "--institutions", str(self.n),
                "--size", str(self.size), "--clip-range", repr(cfg.clip_range),
                "--fractional-bits", str(cfg.fractional_bits), "--timeout-s", repr(party_timeout),
                "--launcher-pid", str(os.getpid()),
            ]
            with open(self.workdir / f"party.{rank}.log", "wb") as log:
                self.procs[rank] = subprocess.Popen(
                    cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
                )

    def _kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for the process
                pass

    def _marked(self, what: str) -> set[int]:
        return {r for r in range(self.world) if (self.workdir / f"{what}.{r}").exists()}

    def _last_line(self, rank: int) -> str:
        try:
            lines = (self.workdir / f"party.{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        return lines[-1].strip() if lines else "(no output)"

    def _abort(self, msg: str, cls: type[SecureAggregationError] = RoundAbortedError) -> None:
        self._kill_all()
        raise cls(f"round {self.round_id}: {msg}. Nothing was revealed; the round has no sum")

    def _check_exits(self, stage: str) -> None:
        failed = {r: p.returncode for r, p in self.procs.items() if p.poll() is not None and p.returncode != 0}
        if not failed:
            return
        # A party's death makes its peers fail too; give them a moment so the report lists the whole picture.
        time.sleep(0.3)
        failed = {r: p.returncode for r, p in self.procs.items() if p.poll() is not None and p.returncode != 0}
        parts = []
        for r, rc in sorted(failed.items()):
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            parts.append(f"{self.who(r)} {how}: {self._last_line(r)}")
        if any(rc == EXIT_UNAVAILABLE for rc in failed.values()):
            self._abort(f"CrypTen could not be imported in a party process ({'; '.join(parts)})", CryptenUnavailableError)
        self._abort(f"CrypTen party failure during the {stage} stage: " + "; ".join(parts))

    def execute(self) -> tuple[np.ndarray, dict[int, dict], dict[str, float]]:
        stage_s: dict[str, float] = {}
        # Our children only: each party is waited for exactly once, by us.
        cpu_before = _children_cpu()
        try:
            t0 = time.perf_counter()
            self._launch()
            # Stage 1, arrival: rendezvous and CrypTen's seed exchange. The stage clock starts when the first
            # party reaches the rendezvous: the parties there wait stage_timeout_s for the others. Before
            # that, fresh processes are importing torch, which on a busy machine can take a while.
            deadline = t0 + self.agg.startup_allowance_s + self.timeout
            first_ready = None
            while True:
                self._check_exits("rendezvous")
                joined = self._marked("joined")
                if len(joined) == self.world:
                    break
                now = time.perf_counter()
                if first_ready is None and self._marked("ready"):
                    first_ready = now
                    deadline = min(deadline, now + self.timeout)
                if now > deadline:
                    self._arrival_timeout(joined, first_ready is not None)
                time.sleep(self.POLL_S)
            t1 = time.perf_counter()
            stage_s["rendezvous"] = t1 - t0
            # Stage 2, the sum: share, add, reveal to the coordinator, leave.
            deadline = t1 + self.timeout
            while True:
                self._check_exits("sum")
                if all(p.poll() == 0 for p in self.procs.values()):
                    break
                if time.perf_counter() > deadline:
                    slow = sorted(r for r, p in self.procs.items() if p.poll() is None)
                    self._abort(
                        f"CrypTen parties did not finish the sum within federation.secure_aggregation.stage_timeout_s="
                        f"{self.timeout:g} s: {', '.join(self.who(r) for r in slow)} still running; raise the "
                        "timeout for large updates on a slow machine"
                    )
                time.sleep(self.POLL_S)
            stage_s["sum"] = time.perf_counter() - t1
            stage_s["parties_cpu"] = _children_cpu() - cpu_before
            result = self.workdir / "revealed.npy"
            if not result.exists():
                self._abort("every CrypTen party exited cleanly but the coordinator wrote no sum (a bug)", SecureAggregationError)
            ring_sum = np.load(result, allow_pickle=False)
            stats = {r: json.loads((self.workdir / f"stats.{r}.json").read_text()) for r in range(self.world)}
            return ring_sum, stats, stage_s
        finally:
            self._kill_all()

    def _arrival_timeout(self, joined: set[int], anyone_ready: bool) -> None:
        ready = self._marked("ready")
        missing = [r for r in range(self.world) if r not in ready]
        if not anyone_ready:
            self._abort(
                f"no CrypTen party reached the rendezvous within {self.agg.startup_allowance_s:g} s of start-up "
                f"plus federation.secure_aggregation.stage_timeout_s={self.timeout:g} s; the party processes are stuck "
                f"importing torch/CrypTen (last output of party 0: {self._last_line(0)}); check the machine's load"
            )
        if missing:
            waiting = sorted(ready)
            details = []
            for r in missing:
                if r in self.not_started:
                    why = "its process was never started (absent)"
                elif self.procs[r].poll() is None:
                    why = "its process is running but never reached the rendezvous (stuck starting up)"
                else:
                    why = f"its process ended: {self._last_line(r)}"
                details.append(f"{self.who(r)} never arrived: {why}")
            self._abort(
                f"{'; '.join(details)}. Waited federation.secure_aggregation.stage_timeout_s={self.timeout:g} s; "
                f"{len(waiting)} other part{'y was' if len(waiting) == 1 else 'ies were'} waiting at the rendezvous. "
                "CrypTen's n-of-n sharing cannot leave a party out: bring that institution back, raise the "
                "timeout on a slow machine, or use secure_aggregation: masking, which tolerates dropouts"
            )
        stuck = [r for r in range(self.world) if r not in joined]
        self._abort(
            f"all {self.world} CrypTen parties reached the rendezvous but "
            f"{', '.join(self.who(r) for r in stuck)} did not finish joining within "
            f"federation.secure_aggregation.stage_timeout_s={self.timeout:g} s; check that gloo can use the loopback "
            "interface (GLOO_SOCKET_IFNAME) and that the temporary folder is writable"
        )
