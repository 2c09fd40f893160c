"""What every secure-aggregation backend is: a pair of per-party state machines plus declared capabilities.

A backend sums one flat float vector per institution so that the coordinator learns only the sum over the
survivors. It is split the way a protocol is split across machines (Flower's server workflow / client mod,
h11's bytes-in, events-out):

* :class:`ServerMachine` - the coordinator's side of one round. ``start()`` gives the first stage's requests
  (bytes per institution); the transport delivers them and feeds each reply to ``receive(sender, data)``;
  ``advance()`` closes the stage (whoever did not reply has dropped out) and gives the next stage's requests,
  or ``{}`` once :attr:`ServerMachine.result` holds the sum. A rejected reply raises :class:`MessageRejected`
  and leaves the machine unchanged; a round that cannot finish raises :class:`RoundAbortedError` and
  releases nothing.
* :class:`ClientMachine` - one institution's side of one round: ``set_input(vector)``, then ``handle(request)``
  returns the reply bytes for each stage. Any :class:`SecureAggregationError` means the institution refuses
  to go on; it answers nothing more, which the server sees as a dropout. ``screen(first request)`` lets an
  institution refuse a round (e.g. a setup weaker than it accepts) before it trains for it.
* :class:`Backend` - settings, :class:`Capabilities`, the stage names, the contributor arithmetic
  (:meth:`Backend.min_contributors`) and the two factories.

No machine does network I/O; :mod:`fedse_secure.secagg.driver` runs them in one process and
:mod:`fedse_secure.federation.driver` runs them over any transport (in-process or Flower). Backends register
themselves in :mod:`fedse_secure.secagg.backends`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from fedse_secure.errors import FedseError
from fedse_secure.schema import StrictModel

if TYPE_CHECKING:
    from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry


class SecureAggregationError(FedseError, RuntimeError):
    """The round cannot produce a sum (too few survivors, failed authentication, ...). Nothing is released."""


class RoundAbortedError(SecureAggregationError):
    """Too few institutions survived to reconstruct the sum; the round is abandoned without a partial sum."""


class MessageRejected(SecureAggregationError):
    """A message that does not fit the protocol (wrong round or stage, unknown or duplicate sender, bad
    signature). The machine that raises it has not changed state; the transport drops the message and, on
    the server, treats its sender as silent."""


class InvalidUpdateError(SecureAggregationError):
    """An institution's own update cannot be aggregated: not one flat vector, the wrong length, NaN/Inf, or a
    value outside the clipping range while ``on_out_of_range: refuse``."""


@dataclass
class AggregateResult:
    #: Sum of the survivors' input vectors, as float64.
    total: np.ndarray
    #: Institutions whose vectors are in ``total``, and those that dropped out.
    survivors: list[str]
    dropped: list[str] = field(default_factory=list)
    #: Named figures for the round record (values clipped, ring size, stage wall times, bytes, ...).
    measurements: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    #: Its messages may cross a network between organisations (it can be deployed over Flower).
    cross_machine: bool
    #: A round can still release a sum when some participants stop answering.
    tolerates_dropouts: bool
    #: The coordinator learns only the sum, never an individual input.
    hides_inputs: bool


class BackendSettings(StrictModel):
    """Settings every backend has; a backend's own settings subclass this with ``backend: Literal[name]``."""

    backend: str = Field(description="The backend (a registered name); its own settings follow.")
    stage_timeout_s: float = Field(
        600.0, gt=0.0, allow_inf_nan=False,
        description="Seconds the coordinator waits for each stage before treating silent institutions as dropped.",
    )


class FixedPointSettings(BackendSettings):
    """Settings of backends that sum fixed-point integers (clip, scale by 2^f, round; see ``encoding``)."""

    clip_range: float = Field(
        8.0, gt=0.0, allow_inf_nan=False,
        description="Every update value is clipped to [-clip_range, clip_range] before fixed-point encoding.",
    )
    fractional_bits: int = Field(
        24, ge=8, le=40, description="Fixed-point precision: values are rounded to multiples of 2^-fractional_bits."
    )
    on_out_of_range: Literal["clip", "refuse"] = Field(
        "clip",
        description="A value outside the clipping range is clipped and counted (clip), or the update is refused.",
    )


class ServerMachine(ABC):
    """The coordinator's side of one round (see the module docstring for how a transport drives it)."""

    #: The open stage (one of the backend's ``stages``), or None before ``start()`` and after the last stage.
    stage: str | None = None
    #: The released sum, once the last stage closed.
    result: AggregateResult | None = None

    @abstractmethod
    def start(self) -> dict[str, bytes]:
        """Open the first stage: its request for each participant."""

    @abstractmethod
    def receive(self, sender: str, data: bytes) -> None:
        """One reply of the open stage, from the authenticated ``sender``; raises :class:`MessageRejected`."""

    @abstractmethod
    def advance(self) -> dict[str, bytes]:
        """Close the open stage; the next stage's requests, or ``{}`` when :attr:`result` is set."""

    @property
    def seconds(self) -> dict[str, float]:
        """Server CPU-side seconds spent per stage (receive + advance), for the round record."""
        return {}


class ClientMachine(ABC):
    """One institution's side of one round."""

    @abstractmethod
    def set_input(self, vector: np.ndarray) -> None:
        """The flat float vector this institution contributes (call before the stage that consumes it)."""

    @abstractmethod
    def handle(self, data: bytes) -> bytes:
        """The reply to one request of the server; raises :class:`SecureAggregationError` to refuse."""

    def screen(self, data: bytes) -> None:
        """Check the round's first request before any local work (training) is spent on it: raise
        :class:`SecureAggregationError` (one line naming the problem) if this party would refuse it. Changes
        nothing; the default accepts everything."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """The round is over for this party (nothing more will be answered)."""


class Backend(ABC):
    """A secure-aggregation method: its settings, capabilities, stages and per-party machines."""

    name: ClassVar[str]
    #: The pydantic model of this backend's settings (``federation.secure_aggregation`` in a config).
    Settings: ClassVar[type[BackendSettings]]
    capabilities: ClassVar[Capabilities]
    #: Stage names in protocol order (what ``federation.simulate_dropouts`` may name).
    stages: ClassVar[tuple[str, ...]]
    #: The stage whose reply carries the institution's input (masked or not). An institution answers it at most
    #: once per round of a run: re-runs of one round with other rosters would let the coordinator subtract sums.
    input_stage: ClassVar[str]
    #: Fewest institutions a round may have (a sum of two reveals each one's input to the other).
    min_participants: ClassVar[int] = 3

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings(backend=self.name)

    def check(self, n_participants: int) -> None:
        """Raise ``ValueError`` (one line naming the field and the fix) if the settings cannot serve a round of
        ``n_participants``. Called when a config is validated, before any work starts."""
        if n_participants < self.min_participants:
            raise ValueError(
                f"federation.secure_aggregation {self.name} needs at least {self.min_participants} institutions, got "
                f"{n_participants}; add clients or choose another backend"
            )

    def min_contributors(self, n_participants: int) -> int:
        """Fewest institutions whose inputs a released sum contains: with fewer survivors the round aborts.
        Client-level DP sizes its noise shares for this many; the coordinator needs this many to start."""
        return n_participants

    @property
    def value_bound(self) -> float | None:
        """Largest magnitude an input value may have without being clipped (None: no bound)."""
        return None

    @abstractmethod
    def server(self, round_id: int, participants: Sequence[str], vector_len: int,
               registry: PublicKeyRegistry | None = None, *, seed: int | None = None) -> ServerMachine:
        """The coordinator's machine for one round. ``seed`` makes its randomness reproducible (tests only)."""

    @abstractmethod
    def client(self, name: str, identity: IdentityKey | None = None, registry: PublicKeyRegistry | None = None,
               *, seed: int | None = None) -> ClientMachine:
        """One institution's machine for one round. ``seed`` makes its randomness reproducible (tests only)."""
