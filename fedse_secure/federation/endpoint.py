"""An institution's side of the federation as a pure request handler: :class:`StageRequest` in,
:class:`StageReply` out, no I/O. The in-process simulation calls it directly; a deployed institution's worker
calls it for each message its SuperNode relays. Either way the same code trains, takes part in secure
aggregation (through the backend's client machine) and evaluates.
"""

from __future__ import annotations

from fedse_secure.errors import FedseError
from fedse_secure.federation.institution import Institution
from fedse_secure.federation.progress import NULL_PROGRESS, Progress
from fedse_secure.federation.wire import BUDGET_EXHAUSTED, EVALUATE, REFUSED, StageReply, StageRequest, run_key
from fedse_secure.secagg.base import Backend


class Refused(FedseError, RuntimeError):
    """The institution will not act on this request (wrong experiment, no round state, ...); it drops out."""


class InstitutionEndpoint:
    """One institution, answering the coordinator one stage at a time.

    A request it will not act on (another experiment, no state for the round, a budget it cannot afford, a
    protocol violation) is answered with a refusal naming the reason; the institution then sits the round out
    and its secure-aggregation state is dropped. Errors that are not :class:`FedseError` are bugs and propagate.
    """

    def __init__(self, institution: Institution, backend: Backend, identity=None, registry=None, *,
                 key: str, progress: Progress = NULL_PROGRESS) -> None:
        self.institution = institution
        self.backend = backend
        self.identity, self.registry = identity, registry
        self.key = key
        self.progress = progress
        self._client = None
        self._round: int | None = None

    @property
    def name(self) -> str:
        return self.institution.name

    def forget_round(self) -> None:
        """Drop this round's secure-aggregation state: the institution sits the rest of the round out."""
        self._client = None

    def handle(self, req: StageRequest) -> StageReply:
        try:
            return self._handle(req)
        except FedseError as err:
            from fedse_secure.privacy.budget import BudgetExceededError

            self.forget_round()
            kind = BUDGET_EXHAUSTED if isinstance(err, BudgetExceededError) else REFUSED
            return StageReply(req.stage, req.round_id, self.name, self.key, error=f"{type(err).__name__}: {err}",
                              refusal=kind)

    def _check_key(self, req: StageRequest) -> None:
        if req.run_key != self.key or (req.experiment_json and run_key(req.experiment_json) != self.key):
            raise Refused(f"{self.name}: the request is for run {req.run_key!r}, not this institution's experiment "
                          f"({self.key}); it is ignored")

    def _global_state(self, req: StageRequest):
        from fedse_secure.models.adapters import state_from_bytes

        try:
            return state_from_bytes(req.blobs["global_state"], req.blobs["global_state_keys"])
        except (KeyError, ValueError) as err:
            raise Refused(f"{self.name}: round {req.round_id} came without a readable global adapter ({err})") from None

    def _handle(self, req: StageRequest) -> StageReply:
        self._check_key(req)
        if req.stage == EVALUATE:
            report = self.institution.evaluate(self._global_state(req), self.progress,
                                               label=f"evaluate r{req.round_id}")
            return StageReply(req.stage, req.round_id, self.name, self.key, report=report)
        if req.stage not in self.backend.stages:
            raise Refused(f"{self.name}: {req.stage!r} is not a stage of {self.backend.name}")
        if req.train:
            self._client = None
            client = self.backend.client(self.name, self.identity, self.registry)
            # A setup this institution refuses (weaker than its requirements, replayed) costs it no training.
            client.screen(req.blobs.get("request", b""))
            local = self.institution.local_round(req.round_id, self._global_state(req), self.progress)
            client.set_input(local.payload)
            self._client, self._round = client, req.round_id
            reply = client.handle(req.blobs.get("request", b""))
            return StageReply(req.stage, req.round_id, self.name, self.key, report=local.report,
                              blobs={"reply": reply})
        if self._client is None or self._round != req.round_id:
            raise Refused(
                f"{self.name}: no secure-aggregation state for round {req.round_id} (this institution restarted or "
                "refused an earlier stage); it sits this round out and rejoins at the next one"
            )
        reply = self._client.handle(req.blobs.get("request", b""))
        if self._client.done:
            self._client = None
        return StageReply(req.stage, req.round_id, self.name, self.key, blobs={"reply": reply})
