"""An institution sends its input for a round of a run at most once, and nothing at all for a mode that never
aggregates. A coordinator that re-runs round r with other participants would otherwise subtract the sums and
read each update (the local round is deterministic in the round id), with no colluder; a resumed coordinator
still re-runs a round whose attempt died before the inputs were sent. Real endpoints, tiny model, real masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedse_secure.config import apply_overrides, parse_config
from fedse_secure.federation.wire import REFUSED, StageRequest, run_key

pytestmark = pytest.mark.slow

NAMES = ["craft-works", "lab-four", "maze-clinic", "wordle-lab"]
ALREADY_SENT = "it already sent its input for round 1 of this run"


class Federation:
    """Four institutions' endpoints and a coordinator that may lie about which round it runs."""

    def __init__(self, repo_root: Path, root: Path, *overrides: str) -> None:
        from fedse_secure.agent.policy import AgentModel
        from fedse_secure.aggregation.rules import get_rule
        from fedse_secure.audit.attest import AdapterSigner
        from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry

        config = yaml.safe_load((repo_root / "configs" / "smoke.yaml").read_text())
        config["clients"].append({"name": "lab-four", "env": "maze", "seed_demos": 4})
        config = apply_overrides(config, ["privacy.mode=none", "model.num_threads=1", *overrides,
                                          "federation.secure_aggregation={backend: masking, colluder_fraction: 0.0}"])
        self.exp = parse_config(config)
        self.text = self.exp.model_dump_json()
        self.key = run_key(self.text)
        self.root = root
        self.identities = {n: IdentityKey.generate() for n in NAMES}
        self.registry = PublicKeyRegistry.from_identities(self.identities)
        coordinator = IdentityKey.generate()
        self.coordinator_key = coordinator.public_bytes()
        self.signer = AdapterSigner(coordinator, self.text)
        self.agent = AgentModel.load(self.exp.model, self.exp.lora, self.exp.seed)
        self.state = self.agent.adapter_state()
        self.size = get_rule("fedavg").payload_size(self.state)
        self.trained = {n: 0 for n in NAMES}
        self.institutions = {n: self._institution(n) for n in NAMES}
        self.endpoints = {n: self.endpoint(n) for n in NAMES}

    def _institution(self, name: str):
        from fedse_secure.federation.institution import Institution, release_terms

        client = next(c for c in self.exp.clients if c.name == name)
        inst = Institution(self.exp, client, self.root / name, self.agent, release_terms(self.exp),
                           ledger_path=self.root / name / "privacy_ledger.jsonl")
        inst.seed_buffer()
        local_round = inst.local_round

        def counted(*args, **kw):
            self.trained[name] += 1
            return local_round(*args, **kw)

        inst.local_round = counted
        return inst

    def endpoint(self, name: str, audit: bool = True):
        """``name``'s endpoint as a (re)started worker builds it: its audit log is the one on disk."""
        from fedse_secure.audit import AuditLog
        from fedse_secure.federation.endpoint import InstitutionEndpoint
        from fedse_secure.policy import NodePolicy, decide

        # The open policy (no colluders assumed, every mechanism) with the default of a policy file: one input a
        # round. The open policy itself lets a simulation re-run a round it lost before recording it.
        policy = NodePolicy.open()
        policy.secure_aggregation.one_input_per_round = True
        return InstitutionEndpoint(
            self.institutions[name], self.exp.federation.backend(), self.identities[name], self.registry,
            key=self.key, decision=decide(policy, self.exp, name, experiment_json=self.text),
            audit=AuditLog(self.root / name / "audit.jsonl") if audit else None, coordinator_key=self.coordinator_key)

    def request(self, stage: str, round_id: int, data: bytes, train: bool) -> StageRequest:
        from fedse_secure.models.adapters import state_to_bytes

        blobs = {"request": data}
        if train:
            adapter, order = state_to_bytes(self.state)
            blobs.update(global_state=adapter, global_state_keys=order,
                         global_state_signature=json.dumps(self.signer.sign(round_id - 1, self.state)).encode())
        return StageRequest(stage, round_id, self.key, self.text if train else "", train=train, blobs=blobs)

    def server(self, round_id: int, roster: list[str]):
        from fedse_secure.secagg.backends.masking import MaskingBackend
        from fedse_secure.secagg.masking.settings import MaskingSettings

        settings = MaskingSettings(colluder_fraction=0.0, dropout_fraction=0.0)
        return MaskingBackend(settings).server(round_id, roster, self.size, self.registry)

    def exchange(self, round_id: int, server, requests: dict[str, bytes], refusals: dict[str, str]) -> None:
        """One stage: every addressee's endpoint answers; each reply goes to the coordinator's machine."""
        train = server.stage == "advertise_keys"
        for name, data in sorted(requests.items()):
            reply = self.endpoints[name].handle(self.request(server.stage, round_id, data, train))
            if reply.error:
                assert reply.refusal == REFUSED and not reply.blobs and not reply.report
                refusals[name] = reply.error
            else:
                server.receive(name, reply.blobs["reply"])

    def round(self, round_id: int, roster: list[str]) -> tuple[np.ndarray | None, dict[str, str]]:
        """A whole round: the released sum (None if it aborted) and who refused, with the reason."""
        from fedse_secure.secagg.base import RoundAbortedError

        server, refusals = self.server(round_id, roster), {}
        requests = server.start()
        try:
            while requests:
                self.exchange(round_id, server, requests, refusals)
                requests = server.advance()
        except RoundAbortedError:
            return None, refusals
        return server.result.total, refusals

    def exports(self, name: str, round_id: int) -> list[str]:
        from fedse_secure.audit import AuditLog

        return [e["data"]["stage"] for e in AuditLog(self.root / name / "audit.jsonl").events()
                if e["kind"] == "export" and e["data"]["round"] == round_id]


@pytest.fixture(scope="module")
def after_round_one(repo_root, tmp_path_factory, threads):
    """Round 1 of the run, completed by all four institutions."""
    fed = Federation(repo_root, tmp_path_factory.mktemp("replay"))
    total, refusals = fed.round(1, NAMES)
    assert total is not None and not refusals
    assert all(fed.exports(n, 1)[2] == "masked_input" for n in NAMES)
    return fed, total


def test_a_round_rerun_with_another_roster_is_refused_by_whoever_sent_its_input(after_round_one):
    """The lying coordinator re-runs round 1 without lab-four: S(all) - S(all but lab-four) would be lab-four's
    update. The three it asks already sent their input for round 1, so each refuses before training, the
    re-run aborts and releases nothing, and lab-four's update stays hidden."""
    fed, total = after_round_one
    before = dict(fed.trained)
    rerun, refusals = fed.round(1, [n for n in NAMES if n != "lab-four"])
    assert rerun is None, "a second sum of round 1 was released: leave-one-out recovers lab-four's update"
    assert sorted(refusals) == ["craft-works", "maze-clinic", "wordle-lab"]
    for name, reason in refusals.items():
        assert reason.startswith(f"Refused: {name}: {ALREADY_SENT}") and len(reason.splitlines()) == 1
    assert fed.trained == before, "a refused re-run trains nothing (no data touched, no budget spent)"


def test_a_restarted_institution_still_refuses_from_its_audit_log(after_round_one):
    """A new endpoint object (the worker restarted: nothing in memory) reads what it sent from its audit log."""
    fed, _ = after_round_one
    before = dict(fed.trained)
    server = fed.server(1, ["craft-works", "maze-clinic", "wordle-lab"])
    setup = server.start()["maze-clinic"]
    restarted = fed.endpoint("maze-clinic")
    reply = restarted.handle(fed.request("advertise_keys", 1, setup, train=True))
    assert reply.refusal == REFUSED and not reply.blobs and not reply.report
    assert reply.error.startswith(f"Refused: maze-clinic: {ALREADY_SENT}"), reply.error
    assert fed.trained == before
    from fedse_secure.audit import AuditLog

    last = AuditLog(fed.root / "maze-clinic" / "audit.jsonl").events()[-1]
    assert last["kind"] == "refusal" and last["data"]["round"] == 1 and ALREADY_SENT in last["data"]["reason"]


def test_a_round_retried_before_anyone_sent_its_input_goes_ahead(after_round_one):
    """Round 2's first attempt dies after share_keys (no input sent yet): the retry of round 2, here with one
    institution fewer, is answered by all it asks and releases the sum; a third attempt is then refused."""
    fed, _ = after_round_one
    first, refusals = fed.server(2, NAMES), {}
    requests = first.start()
    for _stage in ("advertise_keys", "share_keys"):
        fed.exchange(2, first, requests, refusals)
        requests = first.advance()
    assert not refusals and first.stage == "masked_input"  # the coordinator dies here
    roster = ["craft-works", "maze-clinic", "wordle-lab"]
    total, refusals = fed.round(2, roster)
    assert total is not None and not refusals
    assert all(fed.exports(n, 2).count("masked_input") == 1 for n in roster)
    third, refusals = fed.round(2, roster)
    assert third is None and sorted(refusals) == roster


def test_a_local_mode_experiment_gets_no_training_and_no_upload(repo_root, tmp_path, threads):
    """federation.mode local never aggregates, so the policy does not check aggregation or secure aggregation for
    it; a coordinator that still asks for a round (here with a weighted payload that carries the record count)
    is refused before training, and nothing leaves."""
    fed = Federation(repo_root, tmp_path, "federation.mode=local", "federation.aggregation=weighted")
    assert all(e.decision.accepted for e in fed.endpoints.values())
    server = fed.server(1, ["craft-works", "maze-clinic", "wordle-lab"])
    setup = server.start()["maze-clinic"]
    reply = fed.endpoints["maze-clinic"].handle(fed.request("advertise_keys", 1, setup, train=True))
    assert reply.refusal == REFUSED and not reply.blobs and not reply.report
    assert reply.error == ("Refused: maze-clinic: the experiment's federation.mode is 'local', which never "
                           "aggregates; nothing leaves this institution for it")
    assert fed.trained["maze-clinic"] == 0
    assert fed.exports("maze-clinic", 1) == []
