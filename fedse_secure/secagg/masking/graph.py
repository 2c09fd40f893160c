"""The SecAgg+ neighbour graph (Bell et al., CCS 2020) and the default threshold.

Participants are put in a pseudo-random cyclic order (sorted by SHA-256(graph_seed || name)) and each is
joined to the k/2 nearest on either side: a k-regular "random ring lattice", as in Flower's SecAgg+. With
k >= n - 1 this is the complete graph of the original SecAgg (Bonawitz et al., CCS 2017). Every party
computes the graph itself from the signed round setup, so the server cannot show parties different graphs
without their signatures disagreeing.

A party's shares are held by its *neighbourhood*: its neighbours plus itself (m = k + 1 holders).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

from fedse_secure.secagg.masking.errors import SecureAggregationError

FULL_GRAPH_MAX_N = 32


def resolve_degree(n: int, neighbours: int | None) -> int:
    """Graph degree k for n parties: the complete graph for small federations, else ~2*ceil(log2 n), even."""
    if n < 2:
        raise SecureAggregationError(f"secure aggregation needs at least 2 parties, got {n}")
    if neighbours is None:
        k = n - 1 if n <= FULL_GRAPH_MAX_N else 2 * math.ceil(math.log2(n))
    else:
        k = neighbours
    # The ring lattice joins k/2 parties on each side, so an odd k is rounded up.
    k += k % 2
    return min(k, n - 1)


def default_threshold(neighbourhood_size: int) -> int:
    """``max(2, floor(2m/3) + 1)``: tolerates a third of a neighbourhood dropping, and more than half of it
    must sign the same survivor list, so two conflicting lists can never both collect a threshold."""
    return max(2, (2 * neighbourhood_size) // 3 + 1)


def neighbour_sets(participants: Sequence[str], degree: int, graph_seed: bytes) -> dict[str, frozenset[str]]:
    """Each participant's neighbours. Pure function of its arguments; the result must not be mutated."""
    return _neighbour_sets(tuple(participants), degree, graph_seed)


# Every party of an in-process round derives the same graph; computing it once keeps a 1000-party
# simulation O(n log n) instead of O(n^2 log n).
@functools.lru_cache(maxsize=8)
def _neighbour_sets(participants: tuple[str, ...], degree: int, graph_seed: bytes) -> dict[str, frozenset[str]]:
    n = len(participants)
    if degree >= n - 1:
        everyone = frozenset(participants)
        return {p: everyone - {p} for p in participants}
    order = sorted(participants, key=lambda p: hashlib.sha256(graph_seed + p.encode()).digest())
    half = degree // 2
    out = {}
    for i, p in enumerate(order):
        out[p] = frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d != 0)
    return out
