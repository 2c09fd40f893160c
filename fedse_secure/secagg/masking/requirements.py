"""What an institution accepts from a coordinator's round setup, and the derivation of SecAgg+ graph parameters.

An institution never takes the protocol's strength from the coordinator: it states its own
:class:`MaskingRequirements` (minimum participants, the fraction of institutions it assumes may collude with
the coordinator, the fraction it expects to drop out, the failure probability it accepts, optionally explicit
floors for the degree and threshold), derives from them the weakest (degree k, threshold t) it will accept for
the number of participants the setup lists, and refuses a setup below that with one line naming the parameter.

The derivation follows Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead") the way Google's parameter finder for it does (``fcp/secagg/server/graph_parameter_finder.cc``,
semi-malicious server), adapted to this protocol, where a client holds a share of its own secrets (a
neighbourhood is the k neighbours plus the client: m = k + 1 holders):

* ``c = ceil(colluder_fraction * n)`` institutions collude with the coordinator, placed at random on the ring
  (the graph seed is fixed only after every key advertisement is in, see ``graph``), and
  ``d = floor(dropout_fraction * n)`` institutions drop out.
* t1: the number of colluders among a client's k neighbours exceeds t1 with probability <= 2^-(s+1)/n
  (hypergeometric tail; s = ``security_bits``).
* Split survivor lists (a coordinator showing "v alive" to some holders and "v dropped" to others, colluders
  signing both) recover v's update iff v's neighbourhood holds at least 2t - m colluders, since every honest
  holder reveals shares for one list only. So t >= ceil((t1 + m + 1) / 2): 2t - m > t1. The proven collusion
  tolerance against a lying coordinator is therefore ``2t - m - 1`` colluders per neighbourhood (t - 1 against
  a coordinator that follows the protocol).
* Cuts: the coordinator learns the partial sums of two arcs of the ring if it can sever them, i.e. make two
  windows of k/2 consecutive institutions "bad". It chooses who drops, but an honest client next to a window
  only proceeds while at least t of its neighbourhood are live, so each window must hold at least
  ``g = t - k/2 - 1`` colluders (t >= k/2 + 2 makes g >= 1: dropouts alone never cut the ring). The
  probability that two disjoint windows each hold g colluders is bounded (union over the n^2/2 window pairs)
  by 2^-(s+1).
* Correctness: with d dropouts a client keeps at least t live neighbours except with probability
  <= 2^-r/n (r = ``correctness_bits``), so t <= t2, the lower quantile of live neighbours.

The smallest even k < n - 1 with a t in that range wins (smallest t, most dropout tolerance); if none exists,
the complete graph (k = n - 1, every colluder a neighbour) with t = ceil((c + n + 1) / 2), provided
t <= n - d. ``python -m fedse_secure.secagg.masking.requirements`` prints the table for the defaults.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from pydantic import Field, PrivateAttr, model_validator

from fedse_secure.schema import StrictModel

#: Guards the rounding of fractions times n against floating-point error in the insecure direction.
_SMALL = 1e-9


@dataclass(frozen=True)
class GraphParameters:
    degree: int
    #: Shamir threshold: live holders needed per neighbourhood, and the fewest survivors a released sum has.
    threshold: int

    @property
    def neighbourhood(self) -> int:
        """m: the holders of a client's shares (its neighbours and itself)."""
        return self.degree + 1

    @property
    def tolerated_colluders(self) -> int:
        """Colluding institutions per neighbourhood a lying coordinator can be joined by without learning an
        individual update: 2t - m - 1 (split survivor lists need 2t - m)."""
        return max(0, 2 * self.threshold - self.neighbourhood - 1)

    @property
    def tolerated_colluders_honest_coordinator(self) -> int:
        """The same against a coordinator that follows the protocol: t - 1 (t shares rebuild a secret)."""
        return self.threshold - 1


@dataclass(frozen=True)
class SetupRefusal:
    """Why an institution refuses a setup: the parameter at fault, the problem, and, where the setup asks for
    less than a bound, the least this institution accepts (with the assumptions it was derived under)."""

    parameter: str  # "participants", "degree" or "threshold"
    problem: str
    least: str | None = None

    @classmethod
    def below(cls, parameter: str, given: int, least: str) -> SetupRefusal:
        return cls(parameter, f"{given} is below {least}", least)

    def __str__(self) -> str:
        return f"{self.parameter}: {self.problem}"


class MaskingRequirements(StrictModel):
    """What an institution accepts from a coordinator's secure-aggregation setup (the masking backend).

    Defaults: at most 10% of the participants collude with the coordinator, at most 10% drop out, statistical
    security 2^-40 per round, and a round aborts from dropouts within that fraction with probability < 2^-20.
    """

    min_participants: int = Field(
        3, ge=3, description="Fewest institutions a round's setup may list (a sum of two reveals each to the other)."
    )
    colluder_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, allow_inf_nan=False,
        description="Fraction of the institutions (rounded up) assumed to collude with the coordinator: of the "
                    "approved experiment's, when an institution checks a round's setup. The degree and threshold "
                    "are derived so that such a coalition learns no individual update.",
    )
    dropout_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, allow_inf_nan=False,
        description="Fraction of the participants (rounded down) that may drop out of a round without making it "
                    "abort (except with probability 2^-correctness_bits).",
    )
    security_bits: int = Field(
        40, ge=10, le=128,
        description="A round exposes an individual update with probability at most 2^-security_bits (Bell et "
                    "al.'s statistical security parameter).",
    )
    correctness_bits: int = Field(
        20, ge=1, le=64,
        description="A round aborts because of dropouts within dropout_fraction with probability at most "
                    "2^-correctness_bits.",
    )
    min_degree: int | None = Field(
        None, ge=2, description="Explicit floor for the neighbour-graph degree k (None: derived only)."
    )
    min_threshold: int | None = Field(
        None, ge=2, description="Explicit floor for the Shamir threshold t (None: derived only)."
    )

    #: The institutions of the experiment this institution approved (None: the coordinator's own settings, or a
    #: simulated institution). Set, every setup must list only them, and the colluders are counted among all of them.
    _roster: frozenset[str] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _feasible(self) -> MaskingRequirements:
        if self.colluder_fraction + 2 * self.dropout_fraction > 0.9 + _SMALL:
            raise ValueError(
                f"colluder_fraction {self.colluder_fraction} + 2 x dropout_fraction {self.dropout_fraction} exceeds "
                "0.9: no graph can meet both (Bell et al.); lower one of them"
            )
        return self

    def for_roster(self, names) -> MaskingRequirements:
        """These requirements bound to the approved experiment's institutions ``names``.

        A coordinator picks who a round lists. Counted as a fraction of the listed ones only, the colluders could
        all be listed beside one victim (the sum minus their inputs is the victim's update). Counted among the
        approved experiment's institutions, all of them may sit in any round: a round of m listed institutions
        assumes min(m - 1, ceil(colluder_fraction x N)) colluders for N approved ones."""
        bound = self.model_copy()
        bound._roster = frozenset(names)
        return bound

    @property
    def roster(self) -> frozenset[str] | None:
        return self._roster

    # -- derivation ----------------------------------------------------------------------------------------
    def colluders(self, n: int) -> int:
        """Colluders assumed among ``n`` listed institutions (of the approved roster's, when bound to one)."""
        population = max(n, len(self._roster)) if self._roster is not None else n
        return min(n - 1, math.ceil(self.colluder_fraction * population - _SMALL))

    def honest_floor(self, n: int) -> int:
        """The least threshold of a complete graph over ``n`` listed institutions: its released sum needs only t
        survivors, so t must leave two honest inputs beside the colluders assumed, or they subtract theirs and read
        one institution's update exactly. (In a sparser graph every honest survivor needs t live holders in its own
        neighbourhood, which the colluder bound already keeps from being filled by colluders.)"""
        return self.colluders(n) + 2

    def dropouts(self, n: int) -> int:
        return math.floor(self.dropout_fraction * n + _SMALL)

    def parameters(self, n: int) -> GraphParameters:
        """The weakest (degree, threshold) these requirements accept for ``n`` participants, which is what a
        coordinator configured with them proposes. Raises ``ValueError`` when none exists."""
        if n < self.min_participants:
            raise ValueError(f"{n} participants is below min_participants={self.min_participants}")
        k, t = _derive(n, self.colluders(n), self.dropouts(n), self.security_bits, self.correctness_bits)
        if self.min_degree is not None and k < min(self.min_degree, n - 1):
            k = min(self.min_degree + self.min_degree % 2, n - 1)
            t = max(t, _least_threshold(n, n, self.colluders(n), k, self.security_bits))
        if self.min_threshold is not None:
            t = max(t, self.min_threshold)
        if k >= n - 1 and self.honest_floor(n) > k + 1:
            of = f" of the {len(self._roster)} approved institutions" if self._roster is not None else ""
            raise ValueError(f"a sum of {n} listed institutions cannot hold two honest inputs beside the "
                             f"{self.colluders(n)} colluders assumed (colluder_fraction {self.colluder_fraction}{of})")
        if k >= n - 1:
            t = max(t, self.honest_floor(n))
        if t > k + 1:
            raise ValueError(f"threshold {t} exceeds the neighbourhood size {k + 1} (degree {k} + 1)")
        return GraphParameters(k, t)

    def refusal(self, n_listed: int, n_present: int, degree: int, threshold: int) -> SetupRefusal | None:
        """Why a setup of ``degree`` and ``threshold`` is weaker than these requirements allow, or None.

        ``n_listed`` is how many participants the setup lists (the colluder count is a fraction of it, or of the
        approved roster when these requirements are bound to one: :meth:`for_roster`);
        ``n_present`` how many advertised keys (the graph is drawn over those, so a coordinator that drops
        honest institutions before the graph is fixed raises the colluders' share; checked again then).
        """
        if n_listed < self.min_participants:
            return SetupRefusal("participants", f"the setup lists {n_listed} institutions, fewer than this "
                                f"institution's min_participants={self.min_participants}")
        if n_present < 2:
            return SetupRefusal("participants", f"only {n_present} institution(s) advertised keys")
        if degree < 2 or (degree < n_listed - 1 and degree % 2):
            return SetupRefusal("degree", f"{degree} is not a neighbour-graph degree for {n_listed} institutions "
                                f"(an even number >= 2, or {n_listed - 1} for the complete graph)")
        complete = n_present - 1
        k = min(degree, complete)
        if not 2 <= threshold <= k + 1:
            return SetupRefusal("threshold", f"{threshold} is outside 2..{k + 1} (the neighbourhood size for degree {k})")
        context = (f"for {n_present} of {n_listed} participants (colluder_fraction {self.colluder_fraction}, "
                   f"dropout_fraction {self.dropout_fraction}, 2^-{self.security_bits})")
        try:
            need_k = min(self.parameters(n_listed).degree, complete)
        except ValueError as err:  # these requirements cannot be met for this many participants at all
            return SetupRefusal("participants", str(err))
        if self.min_degree is not None:
            need_k = max(need_k, min(self.min_degree, complete))
        if k < need_k:
            return SetupRefusal.below("degree", k, f"{need_k}, the least this institution accepts {context}")
        need_t = _least_threshold(n_listed, n_present, self.colluders(n_listed), k, self.security_bits)
        if need_t > k + 1:
            return SetupRefusal("degree", f"no threshold is safe with degree {k} {context}; a larger degree is needed")
        if self.min_threshold is not None:
            need_t = max(need_t, self.min_threshold)
        if k >= complete and self.honest_floor(n_listed) > need_t:
            need_t = self.honest_floor(n_listed)
            if need_t > k + 1:
                return SetupRefusal("participants", f"a sum of the {n_listed} listed institutions cannot hold two "
                                    f"honest inputs beside the {self.colluders(n_listed)} colluders assumed {context}")
            context = (f"for two honest inputs in every released sum beside the {self.colluders(n_listed)} colluders "
                       f"assumed {context}")
        if threshold < need_t:
            return SetupRefusal.below("threshold", threshold,
                                      f"{need_t}, the least this institution accepts with degree {k} {context}")
        return None

    def table(self, ns=(3, 5, 10, 20, 40, 100, 200, 500, 1000)) -> list[dict[str, int]]:
        """Rows of (n, k, t, colluders tolerated against a lying coordinator, dropouts planned for)."""
        rows = []
        for n in ns:
            p = self.parameters(n)
            rows.append({"n": n, "degree": p.degree, "threshold": p.threshold, "colluders_assumed": self.colluders(n),
                         "tolerated_colluders_per_neighbourhood": p.tolerated_colluders,
                         "dropouts_planned": self.dropouts(n)})
        return rows


# -- the finder ----------------------------------------------------------------------------------------------
def _lcomb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(values) -> float:
    vals = [v for v in values if v > -math.inf]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


@functools.lru_cache(maxsize=4096)
def _log_pmf(population: int, marked: int, draws: int) -> tuple[float, ...]:
    """log P(X = x) for x = 0..draws, X ~ Hypergeometric(population, marked, draws)."""
    base = _lcomb(population, draws)
    return tuple(_lcomb(marked, x) + _lcomb(population - marked, draws - x) - base for x in range(draws + 1))


def _log_tail_at_least(population: int, marked: int, draws: int, g: int) -> float:
    return _logsumexp(_log_pmf(population, marked, draws)[max(g, 0):])


def _upper_quantile(population: int, marked: int, draws: int, log_eps: float) -> int:
    """Smallest a with P(X > a) <= eps."""
    for a in range(draws + 1):
        if _log_tail_at_least(population, marked, draws, a + 1) <= log_eps:
            return a
    return draws


def _lower_quantile(population: int, marked: int, draws: int, log_eps: float) -> int:
    """Largest b with P(X < b) <= eps."""
    pmf = _log_pmf(population, marked, draws)
    best = 0
    for b in range(draws + 1):
        if _logsumexp(pmf[:b]) <= log_eps:
            best = b
        else:
            break
    return best


@functools.lru_cache(maxsize=1024)
def _least_threshold(n_listed: int, n_present: int, colluders: int, k: int, security_bits: int) -> int:
    """The least t that keeps split survivor lists and cuts below 2^-security_bits for degree k over
    ``n_present`` institutions of which ``colluders`` (a count out of the ``n_listed``) collude."""
    n, c = n_present, min(colluders, n_present - 1)
    m = k + 1
    if k >= n - 1:  # complete graph: every colluder is a neighbour, and no cut exists
        return max(2, math.ceil((c + m + 1) / 2))
    log_eps = -(security_bits + 1) * math.log(2)
    t1 = _upper_quantile(n, c, k, log_eps - math.log(n))
    t = max(2, math.ceil((t1 + m + 1) / 2), k // 2 + 2)
    while t <= m:
        if _log_cut(n, c, k, t) < log_eps:
            return t
        t += 1
    return m + 1  # no threshold is safe for this degree


def _log_cut(n: int, c: int, k: int, t: int) -> float:
    """log of a bound on the probability that two disjoint windows of k/2 institutions each hold the
    ``g = t - k/2 - 1`` colluders a cut needs: each window (squared, negatively associated) or their union."""
    g = t - k // 2 - 1
    if g <= 0:
        return 0.0
    one = _log_tail_at_least(n, c, k // 2, g)
    both = _log_tail_at_least(n, c, 2 * (k // 2), 2 * g)
    return math.log(n * n / 2) + min(2 * one, both)


@functools.lru_cache(maxsize=1024)
def _derive(n: int, c: int, d: int, security_bits: int, correctness_bits: int) -> tuple[int, int]:
    log_fail = -correctness_bits * math.log(2) - math.log(n)
    for k in range(2, n - 1, 2):
        t = _least_threshold(n, n, c, k, security_bits)
        # Live neighbours of a client (the owner may be the one that dropped): at least t2 except w.p. 2^-r/n.
        t2 = _lower_quantile(n, n - d, k, log_fail)
        if t <= min(t2, k + 1):
            return k, t
    t = _least_threshold(n, n, c, n - 1, security_bits)
    if t > n - d:
        raise ValueError(
            f"no degree and threshold keep {c} colluders out and survive {d} dropouts among {n} institutions; "
            "lower colluder_fraction or dropout_fraction, or add institutions"
        )
    return n - 1, t


def main() -> None:
    req = MaskingRequirements()
    print(f"defaults: colluder_fraction {req.colluder_fraction}, dropout_fraction {req.dropout_fraction}, "
          f"2^-{req.security_bits} security, 2^-{req.correctness_bits} abort probability")
    print(f"{'n':>6} {'k':>5} {'t':>5} {'c':>5} {'2t-m-1':>7} {'d':>5}")
    for r in req.table((3, 4, 5, 6, 8, 10, 16, 20, 32, 40, 64, 100, 200, 500, 1000)):
        print(f"{r['n']:>6} {r['degree']:>5} {r['threshold']:>5} {r['colluders_assumed']:>5} "
              f"{r['tolerated_colluders_per_neighbourhood']:>7} {r['dropouts_planned']:>5}")


if __name__ == "__main__":
    main()
