"""The audit trail a reviewer reads, and what the coordinator receives, on a real simulated run where each
institution applies its own node policy: a strict one (nothing but the DP-protected update leaves), the pilot
one (the evaluation's success rate may leave too), and one that refuses the experiment. `fedse audit verify`
catches an edited line and a deleted ledger; `fedse adapter verify` catches a tampered adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from fedse_secure.policy.exports import PUBLIC

pytestmark = pytest.mark.slow


def _fedse(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedse_cli.main", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def run(repo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    refusing = root / "policy-refusing.yaml"
    refusing.write_text(yaml.safe_dump({"privacy": {"mechanisms": ["dp-sgd"], "min_noise_multiplier": 2.0}}))
    # The strict policy, except that (like the pilot's) it accepts t = 2 of 3 by assuming no colluder: the round
    # must survive the refusing institution, and what is checked here is what leaves, not the threshold.
    strict = yaml.safe_load((repo_root / "configs/deploy/policy-strict.yaml").read_text())
    strict["secure_aggregation"].update(colluder_fraction=0.0, dropout_fraction=0.34)
    (root / "policy-strict.yaml").write_text(yaml.safe_dump(strict))
    out = root / "run"
    proc = _fedse("simulate", str(repo_root / "configs/smoke.yaml"), "--out", str(out), "-q",
                  "--set", "privacy.mode=dp-sgd", "--set", "federation.secure_aggregation.threshold=2",
                  "--set", "federation.secure_aggregation.colluder_fraction=0.0",
                  "--set", f"clients.0.policy={root / 'policy-strict.yaml'}",
                  "--set", f"clients.1.policy={repo_root / 'configs/deploy/policy.yaml'}",
                  "--set", f"clients.2.policy={refusing}", cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _keys(report: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in report.items():
        if isinstance(v, dict) and k != "attestation":
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_the_coordinator_receives_no_unnoised_statistic_unless_the_policy_allows_it(run):
    records = _records(run)
    rounds = [r for r in records if r["status"] == "completed"]
    evaluations = [r for r in records if r["status"] == "evaluated"]
    assert [r["round"] for r in rounds] == [1, 2] and len(evaluations) == 2
    for record in rounds:
        assert record["survivors"] == ["maze-clinic", "wordle-lab"]
        for name in ("maze-clinic", "wordle-lab"):
            report = record["institutions"][name]["report"]
            assert _keys(report) <= set(PUBLIC), _keys(report) - set(PUBLIC)
            assert {"train.loss", "explore.buffer_size", "privacy.sample_rate", "privacy.epsilon_spent"} <= \
                set(report["withheld"])
            assert report["privacy"]["private"] is True and report["attestation"]["statement"]["round"] == \
                record["round"]
        refused = record["institutions"]["craft-works"]
        assert refused["status"] == "refused" and refused["report"] == {}
        assert "privacy.noise_multiplier: the request has 1; the policy requires >= 2" in refused["reason"]
    for record in evaluations:
        strict, pilot = record["institutions"]["maze-clinic"], record["institutions"]["wordle-lab"]
        assert strict["status"] == "not_evaluated" and "keeps evaluation results inside" in strict["reason"]
        assert set(pilot["evaluation"]) == {"env", "test_tasks", "successes", "success_rate", "withheld"}
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["epsilon_spent"] == {} and set(summary["ledger_heads"]) == {"maze-clinic", "wordle-lab"}


def test_ledgers_record_delta_and_relation_and_the_audit_trail_verifies(run):
    from fedse_secure.privacy import PrivacyLedger

    for name in ("maze-clinic", "wordle-lab"):
        entries = PrivacyLedger(run / "institutions" / name / "privacy_ledger.jsonl").entries()
        assert [e.round for e in entries] == [1, 2]
        assert {(e.delta, e.event.neighbouring) for e in entries} == {(1e-5, "add-remove")}
    assert not (run / "institutions/craft-works/privacy_ledger.jsonl").exists()  # refused: nothing touched
    result = _fedse("audit", "verify", str(run), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    by_name = {i["institution"]: i for i in data["institutions"]}
    assert by_name["maze-clinic"]["attestations_verified"] == 2
    assert sum(by_name["maze-clinic"]["heads_checked"].values()) == 4  # two from the log, two attested
    assert by_name["craft-works"]["ledger"] and by_name["craft-works"]["ledger_ok"] is None


def test_audit_verify_catches_an_edited_line(run, tmp_path):
    copy = tmp_path / "maze-clinic"
    shutil.copytree(run / "institutions" / "maze-clinic", copy)
    lines = (copy / "audit.jsonl").read_text().splitlines(keepends=True)
    third = json.loads(lines[2])
    assert third["kind"] == "export"
    lines[2] = lines[2].replace(f'"bytes":{third["data"]["bytes"]}', '"bytes":1')  # understate what left
    (copy / "audit.jsonl").write_text("".join(lines))
    result = _fedse("audit", "verify", str(copy))
    assert result.returncode == 1
    assert "line 3: its content does not match its hash: the line was edited" in result.stdout


def test_a_deleted_or_replaced_ledger_is_caught(run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    ledger = run_copy / "institutions/maze-clinic/privacy_ledger.jsonl"
    # Deleting the ledger and its head would reset the budget: the audit log and the signed round records remember.
    ledger.unlink()
    ledger.with_name(ledger.name + ".head").unlink()
    gone = _fedse("audit", "verify", str(run_copy / "institutions/maze-clinic"))
    assert gone.returncode == 1 and "was deleted" in gone.stdout
    # A fresh ledger in its place (what a rerun that lost it would start) does not hold the recorded heads.
    from fedse_secure.privacy import DpEvent, PrivacyLedger

    PrivacyLedger(ledger).append(DpEvent("subsampled_gaussian", "record", 1.0, 0.5, 2, 1.0), 1, "maze-clinic", 1e-5)
    replaced = _fedse("audit", "verify", str(run_copy / "institutions/maze-clinic"))
    assert replaced.returncode == 1 and "is not the head of any prefix" in replaced.stdout
    # ... and so does the audit log, replaced along with it: the coordinator's signed round records catch it.
    (run_copy / "institutions/maze-clinic/audit.jsonl").unlink()
    (run_copy / "institutions/maze-clinic/audit.jsonl.head").unlink()
    from fedse_secure.audit import AuditLog

    AuditLog(run_copy / "institutions/maze-clinic/audit.jsonl").record("session", "maze-clinic", ledger=str(ledger))
    both = _fedse("audit", "verify", str(run_copy / "institutions/maze-clinic"))
    assert both.returncode == 1 and "is not the head of any prefix" in both.stdout


def test_adapter_verify_catches_a_tampered_adapter(run, tmp_path):
    from safetensors.torch import load_file, save_file

    final, pub = run / "adapters" / "final", run / "coordinator_identity.pub"
    ok = _fedse("adapter", "verify", str(final), "--public-key", str(pub))
    assert ok.returncode == 0 and "signed by the pinned key" in ok.stdout and "round 2" in ok.stdout
    tampered = tmp_path / "final"
    shutil.copytree(final, tampered)
    weights = tampered / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    bad = _fedse("adapter", "verify", str(tampered), "--public-key", str(pub))
    assert bad.returncode == 1 and "the adapter was altered after it was signed" in bad.stdout
    other = tmp_path / "other.pub"
    from fedse_secure.secagg.masking.identity import IdentityKey

    other.write_bytes(IdentityKey.generate().public_pem())
    foreign = _fedse("adapter", "verify", str(final), "--public-key", str(other))
    assert foreign.returncode == 1 and "not by the pinned key" in foreign.stdout
    (tampered / "signature.json").unlink()
    unsigned = _fedse("adapter", "verify", str(tampered))
    assert unsigned.returncode == 1 and "not signed" in unsigned.stdout


def test_audit_report_is_a_self_contained_page_with_the_epsilon_curve(run, tmp_path):
    out = tmp_path / "report.html"
    result = _fedse("audit", "report", str(run), "--out", str(out))
    assert result.returncode == 0 and "every check passed" in result.stdout
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == 2  # the two DP institutions' epsilon curves
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    for text in ("What left the institution", "Refusals", "Policy in force", "policy-strict.yaml",
                 "privacy.noise_multiplier: the request has 1", "withheld by policy: "):
        assert text in page, text
