"""A real deployment on 127.0.0.1: `fedse server start` (Flower SuperLink, TLS, SuperNode authentication),
three `fedse node start` (SuperNode + institution worker), `fedse federation run`, all as separate processes.

Every process is started through the real CLI and stopped (with its whole process tree) at the end of each
test, pass or fail. Ports are picked free at run time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAMES = ["maze-clinic", "wordle-lab", "craft-works"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fedse(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedse_cli.main", *args]


class Deployment:
    def __init__(self, root: Path, *, rounds: int = 2, stage_timeout_s: float = 60.0, train_s: float = 300.0,
                 straggler_s: float | None = None, privacy: dict | None = None,
                 policies: dict[str, Path] | None = None):
        self.root = root
        self.policies = policies or {}
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.pki = root / "pki"
        for cmd in (["certs", "init"], ["keys", "init"]):
            subprocess.run(_fedse(*cmd, "--out", str(self.pki), *sum((["-i", n] for n in NAMES), [])),
                           check=True, capture_output=True)
        data = yaml.safe_load((REPO / "configs/deploy/coordinator.yaml").read_text())
        exp = data["experiment"]
        exp["federation"]["rounds"] = rounds
        exp["federation"]["secure_aggregation"]["stage_timeout_s"] = stage_timeout_s
        exp["evaluation"].update(test_tasks=1, every_round=False)
        if privacy is not None:
            exp["privacy"] = privacy
        self.experiment = exp
        self.port = _free_port()
        data["superlink"] = {"host": "127.0.0.1", "port": self.port}
        data["tls"] = {"ca_cert": str(self.pki / "ca/ca.pem"), "cert": str(self.pki / "coordinator/superlink.pem"),
                       "key": str(self.pki / "coordinator/superlink.key")}
        data["institutions"] = [{"name": n,
                                 "node_auth_public_key": str(self.pki / f"institutions/{n}/node_auth.pub"),
                                 "identity_public_key": str(self.pki / f"institutions/{n}/identity_ed25519.pub")}
                                for n in NAMES]
        data["state_dir"] = str(root / "coordinator")
        data["identity_key"] = str(self.pki / "coordinator/identity_ed25519.pem")
        data["timeouts"] = {"join_s": 120, "train_s": train_s, "evaluate_s": 120}
        if straggler_s is not None:
            data["timeouts"]["straggler_s"] = straggler_s
        self.coordinator = root / "coordinator.yaml"
        self.coordinator.write_text(yaml.safe_dump(data))
        self.state = root / "coordinator"
        self.institutions = {n: self._institution_config(n, self.pki, self.pki / "registry.json") for n in NAMES}

    def _institution_config(self, name: str, pki_dir: Path, registry: Path) -> Path:
        base = yaml.safe_load((REPO / f"configs/deploy/institution-{NAMES[0]}.yaml").read_text())
        client = next((c for c in self.experiment["clients"] if c["name"] == name), {"env": "maze", "seed_demos": 4})
        d = pki_dir / "institutions" / name
        base.update(
            name=name, env=client["env"], seed_demos=client["seed_demos"], data_dir=str(self.root / name),
            ledger_path=str(self.root / name / "privacy_ledger.jsonl"),
            superlink={"address": f"127.0.0.1:{self.port}", "ca_cert": str(self.pki / "ca/ca.pem")},
            runtime_api={"port": _free_port(), "cert": str(d / "supernode.pem"), "key": str(d / "supernode.key")},
            identity_key=str(d / "identity_ed25519.pem"), node_auth_key=str(d / "node_auth"), registry=str(registry),
            policy=str(self.policies.get(name, REPO / "configs/deploy/policy.yaml")),
            coordinator_public_key=str(self.pki / "coordinator/identity_ed25519.pub"),
        )
        path = self.root / f"institution-{name}.yaml"
        path.write_text(yaml.safe_dump(base))
        return path

    def intruder_config(self) -> Path:
        """An institution with a valid certificate chain and its own keys, whose node key nobody admitted."""
        other = self.root / "intruder-pki"
        subprocess.run(_fedse("keys", "init", "--out", str(other), "-i", "intruder"), check=True, capture_output=True)
        subprocess.run(_fedse("certs", "init", "--out", str(self.pki), "-i", "intruder"), check=True,
                       capture_output=True)
        for f in ("supernode.pem", "supernode.key"):
            os.replace(self.pki / "institutions/intruder" / f, other / "institutions/intruder" / f)
        return self._institution_config("intruder", other, other / "registry.json")

    # -- processes ---------------------------------------------------------------------------------------------
    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        fh = open(log, "ab")
        proc = subprocess.Popen(_fedse(*args), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        fh.close()
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def start_server(self, resume: bool = False) -> None:
        proc = self.start("server", ["server", "start", "--config", str(self.coordinator),
                                     *(["--resume"] if resume else [])])
        ready = self.state / "coordinator.ready"
        self.wait_for(lambda: ready.is_file() and ready.read_text().strip() == str(proc.pid), 180,
                      "the coordinator to be ready", "server")

    def start_nodes(self) -> None:
        for n in NAMES:
            self.start(n, ["node", "start", "--config", str(self.institutions[n])])

    def wait_for(self, cond, timeout_s: float, what: str, watch: str | None = None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if watch and self.procs[watch][0].poll() is not None:
                # The coordinator's own lines first: they say which institution went silent in which stage, and
                # a traceback printed twice would otherwise push them out of the tail.
                said = [line for line in self.log(watch).splitlines() if "[fedse coordinator]" in line]
                pytest.fail(f"{watch} exited ({self.procs[watch][0].returncode}) waiting for {what}:\n"
                            + "\n".join(said[-40:]) + f"\n...\n{self.log(watch)[-3000:]}")
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; logs in {self.root / 'logs'}")

    def events(self) -> list[dict]:
        path = self.state / "events.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def crash(self, name: str) -> None:
        """SIGKILL the whole process tree at once: no goodbye to the SuperLink, as in a power cut."""
        import psutil

        proc = self.procs[name][0]
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)

    def worker(self, name: str):
        """The institution's worker process (it holds the model and the secure-aggregation client)."""
        import psutil

        for p in psutil.Process(self.procs[name][0].pid).children(recursive=True):
            if "fedse_secure.federation.flower.worker" in " ".join(p.cmdline()):
                return p
        raise AssertionError(f"no worker process under {name}'s `fedse node start`")

    def stop_all(self) -> None:
        from fedse_secure.federation.flower.processes import stop_tree

        for proc, _log in reversed(list(self.procs.values())):
            stop_tree(proc.pid, grace_s=8)


@pytest.fixture
def tmp_path():
    # Our own folder rather than pytest's: concurrent pytest sessions on one machine rotate the shared basetemp
    # (keeping three), which could delete it under processes that run for minutes. FEDSE_KEEP_TEST_DIRS=1 keeps it.
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fedse-deploy-test-"))
    yield root
    if os.environ.get("FEDSE_KEEP_TEST_DIRS") != "1":
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")


@pytest.fixture
def deployment_factory(tmp_path):
    made: list[Deployment] = []

    def make(**kw) -> Deployment:
        d = Deployment(tmp_path, **kw)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop_all()


def _adapter(path: Path):
    from fedse_secure.models.adapters import load_adapter_state

    return load_adapter_state(str(path))


def _history(d: Deployment) -> list[dict]:
    latest = (d.state / "checkpoint" / "LATEST").read_text().strip()
    return json.loads((d.state / "checkpoint" / latest / "meta.json").read_text())["history"]


def test_two_rounds_over_flower_with_tls_and_node_auth_equal_the_in_process_simulation(deployment_factory, tmp_path):
    from fedse_secure.federation.flower.processes import DeployError, wait_tls

    d = deployment_factory(rounds=2)
    # The in-process reference runs meanwhile (same experiment, same seed); the deployment mostly waits on I/O.
    exp_file = tmp_path / "experiment.yaml"
    # The simulated institutions apply the same node policy as the deployed ones.
    simulated = {**d.experiment, "clients": [{**c, "policy": str(REPO / "configs/deploy/policy.yaml")}
                                             for c in d.experiment["clients"]]}
    exp_file.write_text(yaml.safe_dump(simulated))
    sim = d.start("simulate", ["simulate", str(exp_file), "--out", str(tmp_path / "sim"), "-q"])

    d.start_server()
    # TLS: the SuperLink verifies against our CA and is refused under any other CA.
    wait_tls("127.0.0.1", d.port, d.pki / "ca/ca.pem", 10)
    from fedse_secure.federation.flower import pki

    foreign = pki.init_certs(tmp_path / "foreign-ca", ["x"])
    with pytest.raises(DeployError, match="does not verify"):
        wait_tls("127.0.0.1", d.port, foreign.ca_cert, 10)

    d.start_nodes()
    intruder = d.start("intruder", ["node", "start", "--config", str(d.intruder_config()), "--rejoin-timeout", "0"])

    t0 = time.monotonic()
    run = subprocess.run(_fedse("federation", "run", "--config", str(d.coordinator)), capture_output=True, text=True,
                         timeout=900)
    flower_s = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads((d.state / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    history = _history(d)
    assert [h["survivors"] for h in history] == [sorted(NAMES)] * 2

    # An unknown node is refused by the SuperLink and gives up with a message naming both possible causes.
    assert intruder.wait(timeout=120) == 2, d.log("intruder")[-3000:]
    assert "refuses this node" in d.log("intruder")
    assert "No SuperNode found with the given public key" in (d.state / "logs/superlink.log").read_text()
    # Every Flower endpoint served TLS: the SuperLink and each SuperNode's Runtime API.
    assert "running on https://127.0.0.1" in (d.state / "logs/superlink.log").read_text()
    for n in NAMES:
        assert "running on https://127.0.0.1" in (tmp_path / n / ".fedse-node/supernode.log").read_text()

    assert sim.wait(timeout=600) == 0, d.log("simulate")[-3000:]
    ours, ref = _adapter(d.state / "run/adapters/final"), _adapter(tmp_path / "sim/adapters/final")
    assert list(ours) == list(ref)
    diff = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    print(f"\nFlower deployment: 2 rounds in {flower_s:.1f} s ({summary['round_s']}); max |diff| vs simulation {diff}")
    assert diff == 0.0
    _same_records(d.state / "run", tmp_path / "sim")

    # Every global adapter the deployment published carries the coordinator's signature.
    signed = subprocess.run(_fedse("adapter", "verify", str(d.state / "run/adapters/final"), "--public-key",
                                   str(d.pki / "coordinator/identity_ed25519.pub")), capture_output=True, text=True)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    # Each institution's audit trail verifies against its ledger and the coordinator's signed round records.
    for n in NAMES:
        audited = subprocess.run(_fedse("audit", "verify", str(tmp_path / n), "--run", str(d.state / "run"),
                                        "--registry", str(d.pki / "registry.json")), capture_output=True, text=True)
        assert audited.returncode == 0 and "2 round attestation(s) verified" in audited.stdout, audited.stdout

    # `fedse report` reads a deployment's run folder as it reads a simulation's.
    rep = subprocess.run(_fedse("report", str(d.state / "run"), str(tmp_path / "sim"), "--json", "--plots",
                                str(tmp_path / "plots")), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = json.loads(rep.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["run"], r["seeds"]) for r in rows] == [("deploy-loopback (fedse)", 2)]


#: Fields that differ between two runs of the same rounds by nature: wall-clock times and CPU seconds.
_TIMING = ("_s", "time", "seconds", "gb_per_s")


def _comparable(value, key=""):
    """A round record with its timings left out (what must be equal between two transports)."""
    if isinstance(value, dict):
        # Signatures differ by nature too: each run has its own keys (the attested content is compared elsewhere).
        return {k: _comparable(v, k) for k, v in value.items()
                if not k.endswith(_TIMING) and k not in ("timing", "attestation")}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _same_records(deployed, simulated) -> None:
    """The Flower path and the in-process path, driven through the same backend interface, release the same sums
    and write the same round records, field by field (timings aside)."""
    from fedse_secure.federation.run_folder import RunFolder

    ours, ref = RunFolder(deployed).records(), RunFolder(simulated).records()
    assert [(r.round, r.status) for r in ours] == [(r.round, r.status) for r in ref]
    for a, b in zip(ours, ref):
        assert a.released_sum_sha256 == b.released_sum_sha256, a.round
        left, right = _comparable(a.to_dict()), _comparable(b.to_dict())
        for field in sorted(set(left) | set(right)):
            assert left.get(field) == right.get(field), (a.round, a.status, field)


def test_killed_institution_drops_out_and_a_crashed_coordinator_resumes(deployment_factory):
    """Round 1: an institution is killed mid-round; the round finishes with the two survivors. Round 2: the
    coordinator itself is killed mid-round; `fedse server start --resume` continues from the checkpoint."""
    # The default 60 s stage timeout: one CI run on a loaded 2-core box saw a survivor miss a 30 s stage (5 s when
    # idle), which aborted round 1. The survivors keep it; only the last one, once both have answered, is cut
    # early (straggler_s): Flower itself would see the power cut only after two missed heartbeats (~60 s).
    d = deployment_factory(rounds=2, train_s=300.0, straggler_s=10.0)
    victim = "wordle-lab"
    survivors = sorted(set(NAMES) - {victim})
    d.start_server()
    d.start_nodes()
    d.start("run", ["federation", "run", "--config", str(d.coordinator)])

    def seen(event: str, round_id: int, stage: str | None = None) -> bool:
        return any(e["event"] == event and e.get("round") == round_id and (stage is None or e.get("stage") == stage)
                   for e in d.events())

    # Kill the victim as soon as round 1 has moved past key advertisement: its keys are in, its shares are not.
    d.wait_for(lambda: seen("stage_opened", 1, "share_keys"), 600, "round 1 to reach share_keys", "run")
    d.crash(victim)
    d.wait_for(lambda: seen("round_completed", 1), 600, "round 1 to complete without the victim", "run")
    history = _history(d)
    assert history[0]["status"] == "completed"
    assert history[0]["survivors"] == survivors and history[0]["dropped"] == [victim]
    closed = [e for e in d.events() if e["event"] == "stage_closed" and e["round"] == 1]
    assert [e["silent"] for e in closed if e["stage"] == "share_keys"] == [[victim]]
    round1 = _adapter(d.state / "run/adapters/round-001")

    # Power cut on the coordinator in round 2: SuperLink, its SuperExec, the ServerApp and `flwr run` die.
    d.wait_for(lambda: seen("round_started", 2), 300, "round 2 to start", "run")
    d.crash("server")
    d.crash("run")
    d.start_server(resume=True)

    def finished() -> bool:
        s = json.loads((d.state / "run/summary.json").read_text())
        return s.get("status") == "completed" and s.get("rounds_completed") == 2

    d.wait_for(finished, 600, "the resumed run to complete", "server")
    history = _history(d)
    assert [(h["round"], h["status"]) for h in history] == [(1, "completed"), (2, "completed")]
    assert history[1]["survivors"] == survivors
    assert any(e["event"] == "resumed" and e["completed_rounds"] == 1 for e in d.events())
    assert [e["resume"] for e in d.events() if e["event"] == "serverapp_started"] == [False, True]
    # The resumed round 2 lists the victim but does not ask it (its node never reconnected): no 300 s wait.
    assert [e["asked"] for e in d.events() if e["event"] == "round_started"][-1] == survivors
    # Round 1's aggregate is exactly what was checkpointed before the crash: nothing redone, nothing lost.
    again = _adapter(d.state / "run/adapters/round-001")
    assert all(bool((again[k] == round1[k]).all()) for k in round1)


def test_an_institution_that_answers_late_is_asked_again_in_the_next_round(deployment_factory):
    """A slow institution is not a dead one. Its worker is paused through round 1's share_keys stage, so it
    drops out of round 1; resumed, it answers that closed stage late. Its SuperNode never disconnected, so only
    the late reply shows it is alive: round 2 must ask it again, and it contributes to round 2's sum."""
    # Cut as a straggler once the other two have answered, rather than after the full 60 s stage timeout; in round
    # 2 the same setting must not cut any of the three.
    d = deployment_factory(rounds=2, train_s=300.0, straggler_s=10.0)
    slow = "craft-works"
    d.start_server()
    d.start_nodes()
    d.start("run", ["federation", "run", "--config", str(d.coordinator)])

    def stage_event(event: str, round_id: int, stage: str) -> dict | None:
        return next((e for e in d.events() if e["event"] == event and e.get("round") == round_id
                     and e.get("stage") == stage), None)

    d.wait_for(lambda: stage_event("stage_opened", 1, "share_keys"), 600, "round 1 to reach share_keys", "run")
    worker = d.worker(slow)
    worker.suspend()
    try:
        closed = d.wait_for(lambda: stage_event("stage_closed", 1, "share_keys"), 300, "share_keys to close", "run")
    finally:
        worker.resume()
    assert closed["silent"] == [slow], closed  # the pause landed before its reply: the test means something
    d.wait_for(lambda: any(e["event"] == "round_completed" and e["round"] == 2 for e in d.events()), 600,
               "round 2 to complete", "run")
    started = {e["round"]: e["asked"] for e in d.events() if e["event"] == "round_started"}
    assert slow not in _history(d)[0]["survivors"]
    assert started[2] == sorted(NAMES), started
    assert _history(d)[1]["survivors"] == sorted(NAMES)


def test_institutions_refuse_a_weaker_request_over_flower_naming_the_field(deployment_factory, tmp_path):
    """The coordinator asks for DP-SGD with delta 0.5 and noise 0.5 at threshold 2. Each institution decides under
    its own node policy, before its model is even loaded, and refuses with one line per violated field: the
    strict one names the noise, delta and threshold (it assumes 10% colluders: t = 3 of 3), one requiring threshold
    3 names the threshold, one that approved
    another experiment (and client-dp only, at its default delta cap and colluder assumption) names the experiment
    hash, the mode, delta and the threshold."""
    other = tmp_path / "policy-threshold.yaml"
    other.write_text(yaml.safe_dump({"privacy": {"mechanisms": ["dp-sgd"], "max_delta": 0.9},
                                     "secure_aggregation": {"min_threshold": 3}}))
    approved = tmp_path / "policy-approved.yaml"
    approved.write_text(yaml.safe_dump({"privacy": {"mechanisms": ["client-dp"]},
                                        "approvals": {"experiments": ["ab" * 32]}}))
    d = deployment_factory(rounds=1, privacy={"mode": "dp-sgd", "delta": 0.5, "noise_multiplier": 0.5},
                           policies={"maze-clinic": REPO / "configs/deploy/policy-strict.yaml",
                                     "wordle-lab": other, "craft-works": approved})
    d.start_server()
    d.start_nodes()
    run = subprocess.run(_fedse("federation", "run", "--config", str(d.coordinator)), capture_output=True, text=True,
                         timeout=900)
    from fedse_secure.federation.run_folder import RunFolder

    (record,) = RunFolder(d.state / "run").records()
    assert record.status == "aborted" and record.released_sum_sha256 is None, run.stdout[-3000:]
    expected = {"maze-clinic": ["privacy.noise_multiplier", "privacy.delta", "federation.secure_aggregation.threshold"],
                "wordle-lab": ["federation.secure_aggregation.threshold"],
                "craft-works": ["experiment", "privacy.mode", "privacy.delta", "federation.secure_aggregation.threshold"]}
    for name, fields in expected.items():
        inst = record.institutions[name]
        assert inst.status == "refused" and inst.report == {}, (name, inst)
        lines = [line.strip() for line in inst.reason.splitlines()[1:]]
        assert [line.split(":")[0] for line in lines] == fields, (name, inst.reason)
        # Refused before any data was touched: no buffer was seeded, no ledger written; the refusal is audited.
        assert not (tmp_path / name / "buffer.jsonl").exists() and not (tmp_path / name / "privacy_ledger.jsonl").exists()
        from fedse_secure.audit import AuditLog

        kinds = [e["kind"] for e in AuditLog(tmp_path / name / "audit.jsonl").records()]
        assert kinds[:2] == ["session", "refusal"], kinds
