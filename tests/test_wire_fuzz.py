"""A hostile peer's bytes: the wire decoders raise only WireError, whatever they are given (bounded, seeded fuzz),
and the round driver counts any bad reply as that institution dropping out, never as the end of the run."""

from __future__ import annotations

import json
import random
from collections import OrderedDict

import numpy as np
import pytest

from fedse_secure.federation.wire import (
    EVALUATE,
    StageReply,
    StageRequest,
    WireError,
    decode_reply,
    decode_request,
    encode,
)

FUZZ_MESSAGES = 30_000


def _valid_messages() -> list[list[bytes]]:
    request = StageRequest("share_keys", 3, "0123456789abcdef", '{"seed": 1}', train=True,
                           blobs={"request": b"\x00\x01" * 40, "global_state": b"x" * 64, "global_state_keys": b"[]"})
    reply = StageReply("share_keys", 3, "maze-clinic", "0123456789abcdef",
                       report={"env": "maze", "privacy": {"epsilon_spent": 1.5, "ledger_head": "ab" * 32}},
                       blobs={"reply": bytes(range(256))}, error="", refusal="")
    return [encode(request), encode(reply), encode(StageReply(EVALUATE, 1, "a", "k", report={"test_tasks": 2}))]


def _mutate(rng: random.Random, frames: list[bytes]) -> list:
    frames = [bytearray(f) for f in frames]
    kind = rng.randrange(9)
    i = rng.randrange(len(frames))
    f = frames[i]
    if kind == 0 and f:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            f[rng.randrange(len(f))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del f[rng.randrange(len(f) + 1):]
    elif kind == 2:  # insert bytes
        pos = rng.randrange(len(f) + 1)
        f[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 22)))
    elif kind == 3:  # drop or duplicate a frame
        if rng.random() < 0.5:
            del frames[i]
        else:
            frames.insert(i, bytearray(f))
    elif kind == 4:  # one header field replaced by a value of any JSON shape
        header = json.loads(bytes(frames[0]))
        header[rng.choice(sorted(header))] = _any_json(rng, 3)
        frames[0] = bytearray(json.dumps(header).encode())
    elif kind == 5:  # a header field removed
        header = json.loads(bytes(frames[0]))
        header.pop(rng.choice(sorted(header)))
        frames[0] = bytearray(json.dumps(header).encode())
    elif kind == 6:  # the report (inside the header) replaced
        header = json.loads(bytes(frames[0]))
        header["report_json"] = rng.choice([json.dumps(_any_json(rng, 4)), "[" * 50_000, "1" * 5_000, "{", "NaN"])
        frames[0] = bytearray(json.dumps(header).encode())
    elif kind == 7:  # the whole message replaced by random bytes
        frames = [bytearray(rng.randbytes(rng.randrange(40))) for _ in range(rng.randrange(4))]
    else:  # deep nesting, non-bytes frames
        frames = rng.choice([[b"[" * 100_000], [], [None], [b'{"kind": "reply"}', 7], "frames", [b"{}" * 3]])
        return frames
    return [bytes(f) for f in frames]


def _any_json(rng: random.Random, depth: int):
    choices = [None, True, False, 0, -1, 2**40, 2**70, 1.5, float("inf"), "", "x" * rng.randrange(10), "\u2603"]
    if depth > 0:
        choices += [[_any_json(rng, depth - 1) for _ in range(rng.randrange(3))],
                    {str(k): _any_json(rng, depth - 1) for k in range(rng.randrange(3))}]
    return rng.choice(choices)


def test_decoders_raise_only_wire_error_on_any_bytes():
    rng = random.Random(20251201)
    valid = _valid_messages()
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(FUZZ_MESSAGES):
        frames = _mutate(rng, rng.choice(valid))
        for decode in (decode_request, decode_reply):
            try:
                message = decode(frames)
            except WireError:
                outcomes["rejected"] += 1
                continue
            outcomes["decoded"] += 1
            # What decodes has the documented types (the driver relies on them).
            assert isinstance(message.stage, str) and type(message.round_id) is int
            assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in message.blobs.items())
            if isinstance(message, StageReply):
                assert isinstance(message.report, dict) and isinstance(message.institution, str)
    assert outcomes["rejected"] > FUZZ_MESSAGES // 2 and outcomes["decoded"] > 100, outcomes


def test_valid_messages_round_trip():
    for frames in _valid_messages():
        header = json.loads(frames[0])
        decode = decode_request if header["kind"] == "request" else decode_reply
        assert encode(decode(frames)) == frames


def test_flower_codec_raises_only_wire_error():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedse_secure.federation.flower.codec import reply_from_record, reply_to_record, request_from_record

    rng = random.Random(7)
    good = reply_to_record(StageReply("share_keys", 1, "a", "k", blobs={"reply": b"abc"}))
    assert reply_from_record(good).blobs == {"reply": b"abc"}
    arrays = [np.zeros(3, np.float32), np.zeros((2, 2), np.uint8), np.arange(5, dtype=np.int64),
              np.frombuffer(b"xyz", np.uint8)]
    values = [1, 2.5, "s", b"b", True, [1, 2], ["a"], 2**62]
    inputs = [None, {}, "x", RecordDict({}), RecordDict({"fedse": ConfigRecord({"kind": "reply"})})]
    for _ in range(400):
        header = {k: rng.choice(values) for k in rng.sample(
            ["kind", "stage", "round_id", "institution", "run_key", "report_json", "error", "refusal", "train"],
            rng.randrange(10))}
        if rng.random() < 0.5:
            header["kind"] = rng.choice(["reply", "request"])
        blobs = ArrayRecord({f"b{i}": Array(rng.choice(arrays)) for i in range(rng.randrange(3))})
        inputs.append(RecordDict({"fedse": ConfigRecord(header), "blobs": blobs}))
    for content in inputs:
        for decode in (reply_from_record, request_from_record):
            try:
                decode(content)
            except WireError:
                pass


# -- the coordinator facing a hostile institution --------------------------------------------------------------
class _Parties:
    """Four institutions reduced to their secure-aggregation side (the backend's real client machines, fed a
    random update): the coordinator's round driver under test sees exactly what real endpoints would send.
    ``hostile`` rewrites one institution's replies."""

    def __init__(self, backend, names, identities, registry, size, hostile):
        self.backend, self.names = backend, names
        self.identities, self.registry, self.size = identities, registry, size
        self.hostile = hostile
        self.clients = {}

    def online(self):
        return set(self.names)

    def reachable(self, names):
        return set(names)

    def send_stage(self, requests, timeout_s):
        replies = {}
        for name, req in requests.items():
            req = decode_request(encode(req))
            if req.stage == EVALUATE:
                rep = StageReply(EVALUATE, req.round_id, name, req.run_key,
                                 report={"env": "maze", "test_tasks": 2, "successes": 1, "success_rate": 0.5})
            else:
                if req.train:
                    client = self.backend.client(name, self.identities[name], self.registry)
                    client.set_input(np.full(self.size, 0.25))
                    self.clients[name] = client
                report = {"env": "maze", "privacy": {"epsilon_spent": None}} if req.train else {}
                rep = StageReply(req.stage, req.round_id, name, req.run_key, report=report,
                                 blobs={"reply": self.clients[name].handle(req.blobs["request"])})
            frames = encode(rep)
            if name == "d":
                frames = self.hostile(req.stage, rep, frames)
            try:
                replies[name] = decode_reply(frames)
            except WireError:
                continue  # what every transport does with bytes that do not decode
        return replies


def _garbage_blob(stage, rep, frames):
    rep.blobs["reply"] = bytes(random.Random(stage).randbytes(22))
    return encode(rep)


def _truncated_masked_input(stage, rep, frames):
    if stage == "masked_input":
        rep.blobs["reply"] = rep.blobs["reply"][: len(rep.blobs["reply"]) // 2]
    return encode(rep)


def _bad_report(stage, rep, frames):
    if stage != EVALUATE:
        rep.report = {"privacy": 5}
    return encode(rep)


def _bad_evaluation(stage, rep, frames):
    if stage == EVALUATE:
        rep.report = {"env": 1, "test_tasks": "two", "successes": 9}
    return encode(rep)


def _impostor(stage, rep, frames):
    rep.institution = "a"
    return encode(rep)


def _garbage_frames(stage, rep, frames):
    return [b"\x00" * 22]


@pytest.mark.parametrize("hostile", [_garbage_blob, _truncated_masked_input, _bad_report, _bad_evaluation, _impostor,
                                     _garbage_frames])
def test_a_bad_reply_drops_its_sender_and_the_round_completes(repo_root, tmp_path, hostile):
    import torch

    from fedse_secure.config import load_config
    from fedse_secure.federation.coordinator import Coordinator
    from fedse_secure.federation.driver import RoundDriver
    from fedse_secure.federation.run_folder import RunFolder, RunSummary
    from fedse_secure.secagg.masking.identity import IdentityKey, PublicKeyRegistry

    names = ["a", "b", "c", "d"]
    clients = "[" + ", ".join(f"{{name: {n}, env: maze, seed_demos: 1}}" for n in names) + "]"
    cfg = load_config(repo_root / "configs" / "smoke.yaml", [
        f"clients={clients}", "federation.rounds=1", "federation.secure_aggregation.threshold=3",
        "federation.secure_aggregation.stage_timeout_s=5"])
    state = OrderedDict([("w", torch.zeros(4, 3)), ("v", torch.ones(5))])
    coordinator = Coordinator("fedavg", state)
    identities = {n: IdentityKey.generate() for n in names}
    registry = PublicKeyRegistry.from_identities(identities)
    backend = cfg.federation.backend()
    size = coordinator.rule.payload_size(state)
    run = RunFolder(tmp_path / "run").create(cfg)
    summary = RunSummary.start(cfg, "in-process")
    parties = _Parties(backend, names, identities, registry, size, hostile)
    driver = RoundDriver(cfg, parties, run, summary, coordinator, peft_config={"r": 8}, registry=registry)
    driver.run(lambda _r: (names, set(names)))

    round_record, evaluation = run.records()
    assert round_record.status == "completed", round_record.reason
    if hostile is _bad_evaluation:
        assert round_record.survivors == names
        assert evaluation.institutions["d"].status == "not_evaluated"
    else:
        assert round_record.survivors == ["a", "b", "c"] and round_record.dropped == ["d"]
    # fedavg over the survivors' 0.25 updates: every value moved by exactly 0.25 (the rule's mean of the sum).
    final = coordinator.global_state
    assert torch.allclose(final["w"], torch.full((4, 3), 0.25), atol=1e-6)
    assert summary.rounds_completed == 1
