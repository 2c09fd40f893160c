"""The SecAgg+ neighbour graph (Bell et al., CCS 2020), drawn from every key advertisement of the round.

Who is next to whom decides which coalitions can expose an institution, so nobody may choose the graph:

* the **roster** is every signed key advertisement that reached the coordinator (each carries fresh X25519
  keys its institution generated after the setup was fixed). Every institution receives all of them, verifies
  every signature, and computes :func:`roster_digest` over them; that digest is also the round's **session**,
  bound into every later key derivation, AES-GCM associated data and signature, so institutions that were
  shown different rosters cannot complete a round together;
* the **graph seed** is a memory-hard function (scrypt, 4 MiB) of the session: the coordinator learns it only
  after every advertisement is in, and each seed it might get by leaving different institutions out of the
  roster costs it a scrypt evaluation; Bell et al.'s parameters (``requirements``) put the chance that a seed
  exposes anyone at 2^-40, so grinding for one is out of reach;
* members are put in a pseudo-random cyclic order (sorted by SHA-256(seed || name)) and each is joined to the
  k/2 nearest on either side: a k-regular "random ring lattice" (Harary graph), as in Bell et al. and
  Flower's SecAgg+. With k >= n - 1 it is the complete graph of the original SecAgg (Bonawitz et al.).

A member's shares are held by its *neighbourhood*: its neighbours plus itself (m = k + 1 holders).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from fedse_secure.secagg.masking.messages import KeyAdvertisement, advert_record, frame

#: scrypt cost of the graph seed: N = 2^12, r = 8 (4 MiB, ~30 ms once per round and process).
SEED_SCRYPT_N = 1 << 12
SEED_SCRYPT_R = 8


def roster_digest(setup_digest: bytes, adverts: Sequence[KeyAdvertisement]) -> bytes:
    """The session: SHA-256 over the setup digest and every advertisement of the roster (sorted by sender)."""
    h = hashlib.sha256(frame("roster", setup_digest, len(adverts)))
    for a in sorted(adverts, key=lambda a: a.sender):
        h.update(advert_record(a))  # self-delimiting: name length, name, fixed-size fields
    return h.digest()


@functools.lru_cache(maxsize=16)
def graph_seed(session: bytes) -> bytes:
    """The graph seed of a session (cached: every party of an in-process round derives the same one)."""
    return hashlib.scrypt(session, salt=b"fedse-secagg/graph-seed", n=SEED_SCRYPT_N, r=SEED_SCRYPT_R, p=1,
                          maxmem=64 << 20, dklen=32)


def ring_order(members: Sequence[str], seed: bytes) -> list[str]:
    """The members in their pseudo-random cyclic order under ``seed``."""
    return sorted(members, key=lambda p: hashlib.sha256(seed + p.encode()).digest())


def neighbour_sets(members: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each member's neighbours. Pure function of its arguments; the result must not be mutated."""
    return _neighbour_sets(tuple(sorted(members)), degree, seed)


# Every party of an in-process round derives the same graph; computing it once keeps a 1000-party
# simulation O(n log n) instead of O(n^2 log n).
@functools.lru_cache(maxsize=8)
def _neighbour_sets(members: tuple[str, ...], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    n = len(members)
    if degree >= n - 1:
        everyone = frozenset(members)
        return {p: everyone - {p} for p in members}
    order = ring_order(members, seed)
    half = degree // 2
    out = {}
    for i, p in enumerate(order):
        out[p] = frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d != 0)
    return out
