"""Fast checks of the deployment pieces that need no running processes: PKI, configs, wire format, checkpoint."""

from __future__ import annotations

import json
import os
import stat
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedse_secure.config import ConfigError
from fedse_secure.federation.flower import pki

REPO = Path(__file__).resolve().parents[1]
NAMES = ["maze-clinic", "wordle-lab", "craft-works"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    return out, pki.init_certs(out, NAMES), pki.init_keys(out, NAMES)


def test_certs_verify_for_loopback_and_private_keys_are_private(material):
    out, certs, keys = material
    pki.check_server_cert(certs.ca_cert, certs.superlink_cert, certs.superlink_key, "127.0.0.1")
    pki.check_server_cert(certs.ca_cert, certs.superlink_cert, certs.superlink_key, "localhost")
    for name in NAMES:
        cert, key = certs.supernode_certs[name]
        pki.check_server_cert(certs.ca_cert, cert, key, "127.0.0.1")
        pki.check_node_auth_private(keys.node_auth[name][0])
        pki.check_node_auth_public(keys.node_auth[name][1])
        pki.load_identity_private(keys.identity[name][0])
    for path in [certs.ca_key, certs.superlink_key, *(k for _c, k in certs.supernode_certs.values()),
                 *(p for p, _ in keys.node_auth.values()), *(p for p, _ in keys.identity.values())]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_cert_problems_are_named_with_a_fix(material, tmp_path):
    out, certs, _keys = material
    with pytest.raises(pki.PkiError, match="not valid for 10.9.9.9.*--host 10.9.9.9"):
        pki.check_server_cert(certs.ca_cert, certs.superlink_cert, certs.superlink_key, "10.9.9.9")
    other = pki.init_certs(tmp_path / "other", ["x"])
    with pytest.raises(pki.PkiError, match="not signed by"):
        pki.check_server_cert(certs.ca_cert, other.superlink_cert, other.superlink_key, "127.0.0.1")
    with pytest.raises(pki.PkiError, match="does not belong to"):
        pki.check_server_cert(certs.ca_cert, certs.superlink_cert, certs.supernode_certs["wordle-lab"][1], "127.0.0.1")
    with pytest.raises(pki.PkiError, match="already exists; pass --force"):
        pki.init_keys(out, ["maze-clinic"])


def test_ca_is_reused_when_adding_an_institution(material):
    out, certs, _keys = material
    before = certs.ca_cert.read_bytes()
    again = pki.init_certs(out, ["newcomer"])
    assert again.ca_cert.read_bytes() == before
    pki.check_server_cert(certs.ca_cert, *again.supernode_certs["newcomer"], "127.0.0.1")


def test_example_configs_load_and_agree():
    from fedse_secure.federation.deploy_config import load_coordinator_config, load_institution_config

    coord = load_coordinator_config(REPO / "configs/deploy/coordinator.yaml")
    assert [i.name for i in coord.institutions] == NAMES
    assert coord.experiment.federation.secure_aggregation.backend == "masking"
    assert coord.tls.ca_cert.is_absolute()
    ports = set()
    for name in NAMES:
        inst = load_institution_config(REPO / f"configs/deploy/institution-{name}.yaml")
        client = next(c for c in coord.experiment.clients if c.name == name)
        assert inst.client_config() == client
        assert inst.superlink.address == coord.address
        assert inst.superlink.ca_cert == coord.tls.ca_cert
        ports.add(inst.runtime_api.port)
    assert len(ports) == 3 and coord.superlink.port not in ports


def test_coordinator_config_rejects_what_cannot_work_across_machines(tmp_path):
    import yaml

    from fedse_secure.federation.deploy_config import load_coordinator_config

    data = yaml.safe_load((REPO / "configs/deploy/coordinator.yaml").read_text())
    for patch, message in [
        ({"secure_aggregation": "crypten"}, "'crypten' is not available across machines"),
        ({"mode": "local"}, "never aggregates"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(data))
        bad["experiment"]["federation"].update(patch)
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message):
            load_coordinator_config(p)
    bad = yaml.safe_load(yaml.safe_dump(data))
    bad["institutions"] = bad["institutions"][:2]
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="differ from experiment.clients"):
        load_coordinator_config(p)
    bad = yaml.safe_load(yaml.safe_dump(data))
    bad["superlinq"] = {}
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="superlinq: unknown field"):
        load_coordinator_config(p)


def test_stage_messages_round_trip_through_flower_records():
    from fedse_secure.federation.flower.codec import (
        reply_from_record,
        reply_to_record,
        request_from_record,
        request_to_record,
    )
    from fedse_secure.federation.wire import StageReply, StageRequest, WireError

    req = StageRequest("advertise_keys", 3, "abc", '{"x": 1}', True, {"request": b"\x00\x01FSA1", "global_state": b""})
    back = request_from_record(request_to_record(req))
    assert back == req
    rep = StageReply("share_keys", 3, "wordle-lab", "abc", {"loss": 0.5}, {"reply": bytes(range(256)) * 100},
                     error="", refusal="")
    assert reply_from_record(reply_to_record(rep)) == rep
    from flwr.app import ConfigRecord, RecordDict

    with pytest.raises(WireError, match="not a fedse message"):
        request_from_record(RecordDict({"other": ConfigRecord({"a": 1})}))


def test_checkpoint_survives_and_latest_moves_only_after_a_complete_write(tmp_path):
    import torch

    from fedse_secure.federation.flower.checkpoint import Checkpoint, CheckpointError, CheckpointStore

    store = CheckpointStore(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.load()
    # Order deliberately not sorted: the flat payload layout depends on it.
    state = OrderedDict([("z.lora_A", torch.randn(2, 3)), ("a.lora_B", torch.randn(3, 2))])
    store.save(Checkpoint(1, state, "h1", [{"round": 1}]))
    state2 = OrderedDict((k, v + 1) for k, v in state.items())
    store.save(Checkpoint(2, state2, "h1", [{"round": 1}, {"round": 2}]))
    got = store.load()
    assert got.completed_rounds == 2 and list(got.global_state) == ["z.lora_A", "a.lora_B"]
    assert all(torch.equal(got.global_state[k], state2[k]) for k in state2)
    assert (tmp_path / "ckpt" / "round-001" / "adapter.safetensors").is_file()  # earlier rounds are kept


def test_cli_registers_deploy_commands():
    from typer.testing import CliRunner

    from fedse_cli.main import app

    res = CliRunner().invoke(app, ["--help"])
    for cmd in ("server", "node", "federation", "certs", "keys"):
        assert cmd in res.output
    res = CliRunner().invoke(app, ["federation", "run", "--config", "/nonexistent.yaml"])
    assert res.exit_code == 2 and "no such config file" in res.output


def test_superlink_guard_keeps_control_and_runtime_apis_local():
    from fedse_secure.federation.flower.superlink_guard import LOOPBACK, install, is_allowed

    assert is_allowed("/v1/fleet/pull-messages", "203.0.113.7", LOOPBACK)
    assert not is_allowed("/v1/control/register-node", "203.0.113.7", LOOPBACK)
    assert not is_allowed("/v1/runtime/push-messages", "203.0.113.7", LOOPBACK)
    assert not is_allowed("/v1/control/start-run", None, LOOPBACK)
    assert is_allowed("/v1/control/register-node", "127.0.0.1", LOOPBACK)
    assert is_allowed("/v1/control/register-node", "::ffff:127.0.0.1", LOOPBACK)
    assert is_allowed("/v1/control/start-run", "10.0.0.5", ("10.0.0.0/24",))

    # The guard really sits in front of Flower's SuperLink app: an outside client cannot register a node.
    from starlette.testclient import TestClient

    import flwr.superlink.main as superlink_main

    original = superlink_main._get_middleware
    try:
        install(("10.9.9.9",))  # the test client's address ("testclient") is not allowed
        from fastapi import FastAPI

        app = FastAPI(middleware=superlink_main._get_middleware()[:1])

        @app.post("/v1/control/register-node")
        def _register():
            return {"ok": True}

        @app.post("/v1/fleet/activate-node")
        def _activate():
            return {"ok": True}

        client = TestClient(app)
        assert client.post("/v1/control/register-node").status_code == 403
        assert client.post("/v1/fleet/activate-node").status_code == 200
    finally:
        superlink_main._get_middleware = original


class _Grid:
    """A SuperLink stand-in: node n answers ``at[n]`` seconds after the push (None: never; "error": at once,
    with an error the SuperLink writes in a node's place)."""

    def __init__(self, at):
        self.at = at

    def push_messages(self, msgs):
        self.t0, self.out = time.monotonic(), set()
        return [f"m{m.metadata.dst_node_id}" for m in msgs]

    def pull_messages(self, ids):
        due = [i for i in ids if i not in self.out and self.at[int(i[1:])] is not None
               and (self.at[int(i[1:])] == "error" or time.monotonic() - self.t0 >= self.at[int(i[1:])])]
        self.out.update(due)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i, src_node_id=int(i[1:])),
                        has_error=lambda i=i: self.at[int(i[1:])] == "error") for i in due]


def _exchange(monkeypatch, at, straggler_s, timeout_s=30.0):
    from fedse_secure.federation.flower import server_app

    monkeypatch.setattr(server_app, "POLL_S", 0.01)
    said = []
    t = server_app.FlowerTransport(_Grid(at), Path("nodes.json"), Path("."), said.append)
    msgs = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in at]
    t0 = time.monotonic()
    got = t._send_and_receive(msgs, timeout_s, {n: f"inst{n}" for n in at}, straggler_s)
    return sorted(m.metadata.src_node_id for m in got), time.monotonic() - t0, t, said


def test_the_last_silent_institution_is_waited_for_only_straggler_s_once_every_other_one_has_answered(monkeypatch):
    got, took, t, said = _exchange(monkeypatch, {1: 0.0, 2: 0.2, 3: None}, straggler_s=0.3)
    assert got == [1, 2] and took < 10, took
    assert list(t._unanswered.values()) == [("inst3", 3)]  # its late answer still lets it rejoin
    assert "['inst3'] not answered" in said[0]
    # It gets at least as long again as its peers took (they slow down with the machine): 0.9 s < 2 x 0.6 s.
    assert _exchange(monkeypatch, {1: 0.0, 2: 0.6, 3: 0.9}, straggler_s=0.05)[0] == [1, 2, 3]
    # The full stage timeout: without the setting, for the second of two, and when a peer's "answer" is an error.
    for at, straggler_s in (({1: 0.0, 2: 0.0, 3: None}, None), ({1: 0.0, 2: None}, 0.1),
                            ({1: "error", 2: 0.0, 3: None}, 0.1)):
        got, took, _t, said = _exchange(monkeypatch, at, straggler_s, timeout_s=0.5)
        assert took >= 0.5 and not said, (at, straggler_s, took)


def test_training_and_evaluation_stages_always_get_their_full_timeout(monkeypatch, tmp_path):
    from fedse_secure.federation.flower import server_app
    from fedse_secure.federation.wire import EVALUATE, StageRequest

    # A real Message needs the run a ServerApp is started for.
    monkeypatch.setattr(server_app, "Message", lambda *a, **kw: SimpleNamespace(**kw))
    (tmp_path / "nodes.json").write_text(json.dumps({n: i for i, n in enumerate(NAMES, 1)}))
    t = server_app.FlowerTransport(None, tmp_path / "nodes.json", tmp_path, print, straggler_s=5.0)
    seen = []
    monkeypatch.setattr(t, "_send_and_receive", lambda msgs, timeout_s, name_of, straggler_s: seen.append(
        straggler_s) or [])
    for stage, train in (("advertise_keys", True), (EVALUATE, False), ("share_keys", False)):
        t.send_stage({n: StageRequest(stage, 1, "k", "", train=train) for n in NAMES}, 60.0)
    assert seen == [None, None, 5.0]
