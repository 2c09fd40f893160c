"""An institution's side of the federation as a pure request handler: :class:`StageRequest` in,
:class:`StageReply` out, no network I/O. The in-process simulation calls it directly; a deployed institution's
worker calls it for each message its SuperNode relays. Either way the same code decides, trains, takes part in
secure aggregation (through the backend's client machine), evaluates, and records what leaves.

The institution decides (``fedse_secure.policy``): the endpoint holds the :class:`~fedse_secure.policy.Decision`
its node policy made about the coordinator's experiment, refuses every request of a refused experiment with
one line per violated field, loads a global adapter only if the coordinator's signature over it verifies,
and lets a report leave only through the policy's export filter. Every message that leaves and every refusal
is recorded in the institution's audit log first; if the log cannot be written, nothing leaves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedse_secure.config import FEDERATED_MODES
from fedse_secure.errors import FedseError
from fedse_secure.federation.institution import Institution
from fedse_secure.federation.progress import NULL_PROGRESS, Progress
from fedse_secure.federation.wire import BUDGET_EXHAUSTED, EVALUATE, REFUSED, StageReply, StageRequest, pack, run_key
from fedse_secure.secagg.base import Backend


def institution_backend(experiment, policy=None) -> Backend:
    """The experiment's secure-aggregation backend as one institution runs it. A masking client holds every
    round's setup to the institution's own requirements (its node policy's ``secure_aggregation``), never to
    the coordinator's settings; ``policy=None`` (a simulated institution without a policy file) accepts what
    the experiment itself derives.

    The requirements are bound to the approved experiment's institutions: a setup may list only them, and the
    colluders are counted among all of them, so a coordinator cannot gather them into a small round. Under
    client-dp the noise shares are sized for the contributors the experiment guarantees a sum
    (:func:`~fedse_secure.federation.institution.release_terms`), so a setup with a lower threshold is refused."""
    from fedse_secure.federation.institution import release_terms
    from fedse_secure.secagg.masking.settings import MaskingSettings

    settings = experiment.federation.secure_aggregation
    if policy is None or not isinstance(settings, MaskingSettings):
        return experiment.federation.backend()
    requirements = policy.secure_aggregation.masking_requirements()
    if experiment.privacy.mode == "client-dp":
        sized_for = release_terms(experiment).min_contributors
        floor = max(requirements.min_threshold or 0, sized_for)
        requirements = requirements.model_copy(update={"min_threshold": floor})
    return experiment.federation.backend(requirements=requirements.for_roster(c.name for c in experiment.clients))


class Refused(FedseError, RuntimeError):
    """The institution will not act on this request (wrong experiment, no round state, ...); it drops out."""


class InstitutionEndpoint:
    """One institution, answering the coordinator one stage at a time.

    A request it will not act on (another experiment, a refused experiment, an unsigned adapter, no state for
    the round, a budget it cannot afford, a protocol violation) is answered with a refusal naming the reason;
    the institution then sits the round out and its secure-aggregation state is dropped. Errors that are not
    :class:`FedseError` are bugs and propagate.
    """

    def __init__(self, institution: Institution | None, backend: Backend, identity=None, registry=None, *,
                 key: str, decision, audit=None, coordinator_key: bytes | None = None,
                 progress: Progress = NULL_PROGRESS) -> None:
        self.institution = institution
        self.backend = backend
        self.identity, self.registry = identity, registry
        self.key = key
        self.decision = decision
        self.policy = decision.policy
        self.audit = audit
        self.coordinator_key = coordinator_key
        self.progress = progress
        self._client = None
        self._round: int | None = None
        self._first_stage: dict[str, Any] | None = None
        # Rounds of this run whose input stage this endpoint answered (the audit log keeps them across restarts).
        self._inputs_sent: set[int] = set()

    @property
    def name(self) -> str:
        return self.decision.institution

    def forget_round(self) -> None:
        """Drop this round's secure-aggregation state: the institution sits the rest of the round out."""
        self._client = None

    # -- the audit trail ----------------------------------------------------------------------------------------
    def record_session(self, experiment, ledger_path=None) -> None:
        """The policy in force and what it decided about this experiment (first sight of a run)."""
        if self.audit is None:
            return
        d = self.decision
        effective = d.effective.privacy.model_dump(mode="json") if d.effective is not None else None
        if ledger_path is not None:
            from pathlib import Path

            # Beside the log, the ledger is named relative to it, so a copied folder is reviewed as a whole.
            ledger_path = Path(ledger_path)
            if ledger_path.parent.resolve() == self.audit.path.parent.resolve():
                ledger_path = Path(ledger_path.name)
        self.audit.record(
            "session", self.name, run_key=self.key, experiment_hash=d.experiment_hash,
            accepted=d.accepted, violations=d.lines, adjustments=list(d.adjustments), privacy=effective,
            requested_privacy=experiment.privacy.model_dump(mode="json"),
            peers=sorted(c.name for c in experiment.clients if c.name != self.name),
            policy_source=self.policy.source, policy_sha256=self.policy.sha256(),
            policy=self.policy.model_dump(mode="json"), ledger=str(ledger_path) if ledger_path else None,
        )

    def _record_reply(self, req: StageRequest, reply: StageReply) -> None:
        if self.audit is None:
            return
        frames = pack(reply.header(), reply.blobs)
        digest = hashlib.sha256(b"".join(frames)).hexdigest()
        common = {"round": req.round_id, "stage": req.stage, "run_key": self.key,
                  "experiment_hash": self.decision.experiment_hash}
        if reply.error:
            self.audit.record("refusal", self.name, **common, refusal=reply.refusal, reason=reply.error)
            return
        extra = self._first_stage if (req.train and self._first_stage) else {}
        self.audit.record("export", self.name, **common, recipient=f"coordinator (run {self.key})",
                          bytes=sum(len(f) for f in frames), sha256=digest, report=reply.report, **extra)

    # -- requests -----------------------------------------------------------------------------------------------
    def handle(self, req: StageRequest) -> StageReply:
        self._first_stage = None
        try:
            reply = self._handle(req)
        except FedseError as err:
            reply = self._refusal(req, err)
        try:
            self._record_reply(req, reply)
        except FedseError as err:
            # Nothing leaves that the audit log did not record.
            reply = self._refusal(req, Refused(f"{self.name}: the audit log cannot be written ({err}); nothing "
                                               "leaves this institution until it is repaired"))
        if not reply.error and req.stage == self.backend.input_stage:
            self._inputs_sent.add(req.round_id)
        return reply

    def _input_sent(self, round_id: int) -> bool:
        """Whether this institution already answered the input stage of ``round_id`` in this run: in this process,
        or before a restart (its audit log records every reply before it leaves)."""
        if round_id in self._inputs_sent:
            return True
        if self.audit is None:
            return False
        stage = self.backend.input_stage
        return any(e["kind"] == "export" and e["data"].get("run_key") == self.key and e["data"].get("stage") == stage
                   and e["data"].get("round") == round_id for e in self.audit.events())

    def _refusal(self, req: StageRequest, err: FedseError) -> StageReply:
        from fedse_secure.privacy.budget import BudgetExceededError

        self.forget_round()
        kind = BUDGET_EXHAUSTED if isinstance(err, BudgetExceededError) else REFUSED
        return StageReply(req.stage, req.round_id, self.name, self.key, error=f"{type(err).__name__}: {err}",
                          refusal=kind)

    def _check_key(self, req: StageRequest) -> None:
        if req.run_key != self.key or (req.experiment_json and run_key(req.experiment_json) != self.key):
            raise Refused(f"{self.name}: the request is for run {req.run_key!r}, not this institution's experiment "
                          f"({self.key}); it is ignored")

    def _global_state(self, req: StageRequest, adapter_round: int):
        from fedse_secure.audit.attest import SignatureError, verify_adapter
        from fedse_secure.models.adapters import state_from_bytes

        try:
            state = state_from_bytes(req.blobs["global_state"], req.blobs["global_state_keys"])
        except (KeyError, ValueError) as err:
            raise Refused(f"{self.name}: round {req.round_id} came without a readable global adapter ({err})") from None
        if self.coordinator_key is None:
            if self.policy.adapters.require_signature:
                raise Refused(f"{self.name}: the node policy requires signed global adapters (adapters."
                              "require_signature), but no coordinator public key is configured to verify them; set "
                              "coordinator_public_key in the institution's config")
            return state
        try:
            signed = json.loads(req.blobs["global_state_signature"].decode())
            verify_adapter(signed, state, public_key=self.coordinator_key, round_id=adapter_round, run_key=self.key,
                           experiment_hash=self.decision.experiment_hash)
        except KeyError:
            raise Refused(f"{self.name}: round {req.round_id}: the global adapter is not signed; it is not loaded") \
                from None
        except (ValueError, UnicodeDecodeError) as err:
            raise Refused(f"{self.name}: round {req.round_id}: unreadable adapter signature ({err})") from None
        except SignatureError as err:
            raise Refused(f"{self.name}: round {req.round_id}: {err}; the adapter is not loaded") from None
        return state

    def _handle(self, req: StageRequest) -> StageReply:
        from fedse_secure.policy.exports import evaluation_allowed, filter_evaluation, filter_round_report

        self._check_key(req)
        if not self.decision.accepted:
            raise self.decision.refusal()
        allow = self.policy.exports.allow
        if req.stage == EVALUATE:
            if not evaluation_allowed(allow):
                raise Refused(f"{self.name}: the node policy keeps evaluation results inside the institution "
                              "(exports.allow lacks evaluation.success_rate); not evaluated")
            state = self._global_state(req, adapter_round=req.round_id)
            report = self.institution.evaluate(state, self.progress, label=f"evaluate r{req.round_id}")
            return StageReply(req.stage, req.round_id, self.name, self.key, report=filter_evaluation(report, allow))
        mode = self.decision.effective.federation.mode
        if mode not in FEDERATED_MODES:
            # The policy skips the aggregation checks for a mode that never aggregates, so nothing may leave for it.
            raise Refused(f"{self.name}: the experiment's federation.mode is {mode!r}, which never aggregates; "
                          "nothing leaves this institution for it")
        if req.stage not in self.backend.stages:
            raise Refused(f"{self.name}: {req.stage!r} is not a stage of {self.backend.name}")
        if req.train:
            # Before anything else: the re-run's payload would equal the one sent (its seeds follow the round id).
            if self.policy.secure_aggregation.one_input_per_round and self._input_sent(req.round_id):
                raise Refused(f"{self.name}: it already sent its input for round {req.round_id} of this run; a "
                              "coordinator that re-runs a round with other participants could subtract the sums")
            self._client = None
            client = self.backend.client(self.name, self.identity, self.registry)
            # A setup this institution refuses (weaker than its requirements, replayed) costs it no training.
            client.screen(req.blobs.get("request", b""))
            state = self._global_state(req, adapter_round=req.round_id - 1)
            local = self.institution.local_round(req.round_id, state, self.progress)
            client.set_input(local.payload)
            self._client, self._round = client, req.round_id
            reply = client.handle(req.blobs.get("request", b""))
            report = filter_round_report(local.report, allow)
            self._first_stage = self._first_stage_record(req, local)
            if self.identity is not None:
                report["attestation"] = self._attest(req, self._first_stage)
            return StageReply(req.stage, req.round_id, self.name, self.key, report=report, blobs={"reply": reply})
        if self._client is None or self._round != req.round_id:
            raise Refused(
                f"{self.name}: no secure-aggregation state for round {req.round_id} (this institution restarted or "
                "refused an earlier stage); it sits this round out and rejoins at the next one"
            )
        reply = self._client.handle(req.blobs.get("request", b""))
        if self._client.done:
            self._client = None
        return StageReply(req.stage, req.round_id, self.name, self.key, blobs={"reply": reply})

    def _first_stage_record(self, req: StageRequest, local) -> dict[str, Any]:
        """What the audit log keeps about a round's contribution (inside the institution, unfiltered)."""
        import numpy as np

        exp = self.institution.experiment
        privacy = local.report.get("privacy", {})
        n = len(exp.clients)
        settings = exp.federation.secure_aggregation
        protocol: dict[str, Any] = {"backend": self.backend.name, "participants": n,
                                    "min_contributors": self.backend.min_contributors(n),
                                    "settings": settings.model_dump(mode="json")}
        if hasattr(settings, "parameters"):
            graph = settings.parameters(n)
            protocol.update(degree=graph.degree, threshold=graph.threshold)
        payload = np.ascontiguousarray(local.payload, dtype="<f8")
        return {
            "payload_sha256": hashlib.sha256(payload.tobytes()).hexdigest(), "payload_values": int(payload.size),
            "privacy": {k: privacy.get(k) for k in ("mechanism", "private", "epsilon_spent", "delta", "accountant",
                                                    "neighbouring", "ledger_head", "noise_multiplier")
                        if k in privacy},
            "peers": sorted(c.name for c in exp.clients if c.name != self.name), "protocol": protocol,
        }

    def _attest(self, req: StageRequest, first: dict[str, Any]) -> dict[str, Any]:
        """The round attestation: the institution's signature over its ledger head after the round, the payload
        it contributed and the experiment, which the coordinator stores with the round record."""
        from fedse_secure.audit.attest import ROUND_ATTESTATION, sign

        return sign(self.identity, ROUND_ATTESTATION, {
            "kind": "round", "institution": self.name, "round": req.round_id, "run_key": self.key,
            "experiment_hash": self.decision.experiment_hash,
            "ledger_head": first["privacy"].get("ledger_head"),
            "payload_sha256": first["payload_sha256"], "payload_values": first["payload_values"],
        })
