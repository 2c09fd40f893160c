"""A careless user's and a damaged disk's inputs, through the real `fedse` command tree.

Every case must end with a non-zero exit (2 for bad input unless the case says otherwise), exactly one
``error:`` line that is an expected failure (never the "this is a bug" line), no traceback, and a file system left
exactly as it was (no stub run folder, nothing deleted, nothing rewritten).

Cases run through the CLI's own entry point in this process (click's runner: the same command tree, parsing and
error handling as the `fedse` executable, without paying a Python start per case on a 2-core box); those marked
``process`` (a resource limit, signal handlers, services) and a sample of every other kind also run as a real
`fedse` process, which must behave identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


@dataclass
class Case:
    id: str
    args: list[str]
    setup: Callable[[Path], None] | None = None
    code: int = 2
    #: RLIMIT_FSIZE for the command: writes beyond it fail as on a full disk.
    max_file_bytes: int | None = None
    needs_non_root: bool = False
    #: Folder (relative to the sandbox) to run in, when not the sandbox itself.
    cwd: str = "."
    #: Run as a separate `fedse` process (needs a resource limit, installs signal handlers, ...).
    process: bool = False
    #: The one line the failure must print (a prefix); `privacy verify` reports a failed check as FAILED.
    line: str = "error:"
    #: Words that line must hold, where the problem is worth pinning down (it names the file, the cause).
    says: str = ""


def _config(mutate: Callable[[dict], None] | None = None, name: str = "cfg.yaml") -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        data = json.loads(json.dumps(SMOKE))
        data["output_dir"] = "runs/{name}"
        if mutate:
            mutate(data)
        (root / name).write_text(yaml.safe_dump(data, sort_keys=False))

    return setup


def _text(text: str | bytes, name: str = "cfg.yaml") -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / name).write_bytes(text.encode() if isinstance(text, str) else text)

    return setup


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for s in setups:
            s(root)

    return setup


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value

    return mutate


def _files(files: dict[str, str | bytes]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for rel, content in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def _run_folder(summary: object | None = None, raw: bytes | None = None, marker: bool = True) -> Callable[[Path], None]:
    """A run folder as fedse leaves it, with ``summary.json`` replaced by ``summary`` (JSON) or ``raw`` bytes."""

    def setup(root: Path) -> None:
        run = root / "run"
        run.mkdir()
        _config()(run)
        (run / "cfg.yaml").rename(run / "config.yaml")
        if marker:
            (run / ".fedse-run").write_text('{"created_by": "fedse-secure test"}\n')
        good = {"name": "smoke", "mode": "fedse", "status": "completed", "rounds_planned": 2, "rounds_completed": 2,
                "success_by_env": {"maze": {"2": 0.5}}, "micro_avg": {"2": 0.5}}
        if raw is not None:
            (run / "summary.json").write_bytes(raw)
        else:
            (run / "summary.json").write_text(json.dumps(good if summary is None else summary))
        (run / "metrics.jsonl").write_text("")

    return setup


def _nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _model_copy(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        from fedse_secure.models.loading import prepare_tiny_model

        src = prepare_tiny_model()
        dst = root / "model"
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        damage(dst)
        _config(_set("model.name_or_path", str(dst)))(root)

    return setup


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep])

    return damage


def _pki(root: Path) -> None:
    from fedse_secure.federation.flower import pki
    from fedse_secure.secagg.masking.identity import PublicKeyRegistry

    pki.init_certs(root / "pki", ["a", "b", "c"])
    paths = pki.init_keys(root / "pki", ["a", "b", "c"])
    registry = PublicKeyRegistry({n: pki.raw_public_bytes(pki.load_identity_public(pub))
                                  for n, (_priv, pub) in paths.identity.items()})
    (root / "pki" / "registry.json").write_text(registry.to_json() + "\n")


def _coordinator(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        _pki(root)
        exp = json.loads(json.dumps(SMOKE))
        exp["clients"] = [{"name": n, "env": "maze", "seed_demos": 2} for n in "abc"]
        pki = root / "pki"
        tls = {"ca_cert": str(pki / "ca/ca.pem"), "cert": str(pki / "coordinator/superlink.pem"),
               "key": str(pki / "coordinator/superlink.key")}
        admitted = [{"name": n, "node_auth_public_key": str(pki / f"institutions/{n}/node_auth.pub"),
                     "identity_public_key": str(pki / f"institutions/{n}/identity_ed25519.pub")} for n in "abc"]
        cfg = {"experiment": exp, "tls": tls, "institutions": admitted,
               "state_dir": str(root / "state"), "superlink": {"port": 9},
               "timeouts": {"join_s": 1}}
        (root / "coordinator.yaml").write_text(yaml.safe_dump(cfg))
        damage(root)

    return setup


def _garble(rel: str, data: bytes = b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"):
    def damage(root: Path) -> None:
        (root / rel).write_bytes(data)

    return damage


def _ledger_line(content: bytes) -> Callable[[Path], None]:
    return _files({"ledger.jsonl": content})


def _read_only(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).mkdir()
        (root / rel).chmod(0o555)

    return setup


def _symlink(rel: str, target: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / target, root / rel)

    return setup


def _resumable_run(mutate: Callable[[dict], None] | None = None) -> Callable[[Path], None]:
    return _both(_run_folder({"name": "smoke", "mode": "fedse", "status": "running", "rounds_planned": 2}),
                 _config(mutate))


V = ["config", "validate", "cfg.yaml"]
S = ["simulate", "cfg.yaml", "--out", "out", "-q"]

CASES: list[Case] = [
    # -- the config file itself -------------------------------------------------------------------------------------
    Case("config-missing", ["config", "validate", "nope.yaml"]),
    Case("config-is-folder", ["config", "validate", "folder"], _files({"folder/x": ""})),
    Case("config-binary", V, _text(bytes(range(256)) * 4)),
    Case("config-utf16", V, _text((REPO / "configs" / "smoke.yaml").read_text().encode("utf-16"))),
    Case("config-nul-bytes", V, _text(b"name: x\x00\n")),
    Case("config-empty", V, _text("")),
    Case("config-a-list", V, _text("- a\n- b\n")),
    Case("config-a-scalar", V, _text("hello\n")),
    Case("config-bad-syntax", V, _text("name: [unclosed\n")),
    Case("config-tab-indent", V, _text("name: x\n\tseed: 1\n")),
    Case("config-duplicate-key", V, _text((REPO / "configs" / "smoke.yaml").read_text() + "seed: 1\n"),
         says="key 'seed' appears twice"),
    Case("config-duplicate-nested-key", V,
         _text((REPO / "configs" / "smoke.yaml").read_text().replace("  rounds: 2\n", "  rounds: 2\n  rounds: 5\n"))),
    Case("config-deeply-nested", V, _text("name: " + "[" * 20000 + "]" * 20000 + "\n")),
    Case("config-unknown-field", V, _config(_set("federation.roundz", 3))),
    Case("rounds-true", V, _config(_set("federation.rounds", True)), says="rounds: expected a number"),
    Case("rounds-zero", V, _config(_set("federation.rounds", 0))),
    Case("rounds-text", V, _config(_set("federation.rounds", "three"))),
    Case("rounds-float", V, _config(_set("federation.rounds", 2.5))),
    Case("learning-rate-inf", V, _config(_set("training.learning_rate", float("inf"))),
         says="training.learning_rate: Input should be a finite number"),
    Case("learning-rate-nan", V, _config(_set("training.learning_rate", float("nan")))),
    Case("learning-rate-negative", V, _config(_set("training.learning_rate", -1.0))),
    Case("clip-range-inf", V, _config(_set("federation.secure_aggregation", {"backend": "masking",
                                                                             "clip_range": float("inf")}))),
    Case("noise-inf", V, _config(_set("privacy.noise_multiplier", float("inf")))),
    Case("max-grad-norm-inf", V, _config(_set("privacy.max_grad_norm", float("inf")))),
    Case("temperature-inf", V, _config(_set("exploration.temperature", float("inf")))),
    Case("weight-decay-nan", V, _config(_set("training.weight_decay", float("nan")))),
    Case("delta-above-one", V, _config(_set("privacy.delta", 1.5))),
    Case("epsilon-budget-inf", V, _config(_set("privacy.epsilon_budget", float("inf")))),
    Case("env-options-typo", V, _config(_set("clients.0.env_options", {"max_turn": 3}))),
    Case("agentgym-without-options", V, _config(_set("clients.0.env", "agentgym"))),
    Case("unknown-env", V, _config(_set("clients.0.env", "chess"))),
    Case("unknown-backend", V, _config(_set("federation.secure_aggregation", "magic"))),
    Case("unknown-rule", V, _config(_set("federation.aggregation", "median"))),
    Case("unknown-mode", V, _config(_set("federation.mode", "fedx"))),
    Case("unknown-privacy", V, _config(_set("privacy.mode", "laplace"))),
    Case("lora-targets-empty", V, _config(_set("lora.target_modules", []))),
    Case("lora-target-typo", V, _config(_set("lora.target_modules", ["q_projj"])), says="name no module of"),
    Case("lora-target-empty-name", V, _config(_set("lora.target_modules", [""]))),
    Case("lora-top-layers-above-depth", V, _config(_set("lora.top_layers", 99)), says="exceeds the 2 transformer"),
    Case("lora-top-layers-zero", V, _config(_set("lora.top_layers", 0))),
    Case("lora-rank-zero", V, _config(_set("lora.r", 0))),
    Case("seed-2-pow-70", V, _config(_set("seed", 2**70))),
    Case("seed-negative", V, _config(_set("seed", -1))),
    Case("threads-1e6", V, _config(_set("model.num_threads", 1_000_000))),
    Case("threads-1e6-text", V, _text((REPO / "configs" / "smoke.yaml").read_text().replace(
        "  max_context_tokens: 768\n", "  max_context_tokens: 768\n  num_threads: 1e6\n"))),
    Case("context-too-small", V, _config(_set("model.max_context_tokens", 1))),
    Case("client-name-dot", V, _config(_set("clients.0.name", "."))),
    Case("client-name-dotdot", V, _config(_set("clients.0.name", ".."))),
    Case("client-name-hidden", V, _config(_set("clients.0.name", ".secret"))),
    Case("client-name-slash", V, _config(_set("clients.0.name", "a/b"))),
    Case("client-names-case", V, _config(_set("clients.1.name", "MAZE-clinic")), says="ignoring case"),
    Case("client-names-duplicate", V, _config(_set("clients.1.name", "maze-clinic"))),
    Case("client-name-300", V, _config(_set("clients.0.name", "x" * 300))),
    Case("name-dotdot", V, _config(_set("name", ".."))),
    Case("name-300", V, _config(_set("name", "n" * 300))),
    Case("name-empty", V, _config(_set("name", ""))),
    Case("output-dir-unknown-field", V, _config(_set("output_dir", "runs/{foo}"))),
    Case("output-dir-positional", V, _config(_set("output_dir", "runs/{0}"))),
    Case("output-dir-empty", V, _config(_set("output_dir", ""))),
    Case("no-clients", V, _config(_set("clients", []))),
    Case("clients-missing", V, _config(lambda d: d.pop("clients"))),
    Case("masking-two-clients", V, _config(lambda d: d["clients"].pop())),
    Case("dropouts-unknown-client", V, _config(_set("federation.simulate_dropouts", {"nobody": "masked_input"}))),
    Case("dropouts-unknown-stage", V, _config(_set("federation.simulate_dropouts", {"maze-clinic": "lunch"}))),
    Case("centralized-with-dp", V, _config(lambda d: (_set("federation.mode", "centralized")(d),
                                                      _set("privacy.mode", "dp-sgd")(d)))),
    # -- --set overrides ---------------------------------------------------------------------------------------------
    Case("set-unparseable", ["config", "validate", "cfg.yaml", "--set", "federation.rounds=["], _config()),
    Case("set-unclosed-map", ["config", "validate", "cfg.yaml", "--set", "name={"], _config()),
    Case("set-no-equals", ["config", "validate", "cfg.yaml", "--set", "federation.rounds"], _config()),
    Case("set-empty-key", ["config", "validate", "cfg.yaml", "--set", "=5"], _config()),
    Case("set-double-dot", ["config", "validate", "cfg.yaml", "--set", "federation..rounds=2"], _config()),
    Case("set-bad-index", ["config", "validate", "cfg.yaml", "--set", "clients.9.name=x"], _config()),
    Case("set-into-scalar", ["config", "validate", "cfg.yaml", "--set", "federation.rounds.x=1"], _config()),
    Case("set-name-dotdot", ["config", "validate", "cfg.yaml", "--set", "name=.."], _config()),
    Case("set-rounds-true", ["config", "validate", "cfg.yaml", "--set", "federation.rounds=true"], _config()),
    Case("config-explain-unknown", ["config", "explain", "federation.nope"]),
    # -- simulate: where the run folder goes ---------------------------------------------------------------------------
    Case("simulate-no-config", ["simulate", "-q"]),
    Case("simulate-bad-config", S, _config(_set("training.learning_rate", float("inf")))),
    Case("simulate-name-dotdot-overwrite", ["simulate", "cfg.yaml", "--set", "name=..", "--overwrite", "-q"],
         _both(_config(), _files({"notes.txt": "my notes", "scripts/run.sh": "echo hi"}))),
    Case("simulate-out-is-file", ["simulate", "cfg.yaml", "--out", "afile", "-q"],
         _both(_config(), _files({"afile": "x"}))),
    Case("simulate-out-under-file", ["simulate", "cfg.yaml", "--out", "afile/run", "-q"],
         _both(_config(), _files({"afile": "x"}))),
    Case("simulate-out-read-only", ["simulate", "cfg.yaml", "--out", "ro/run", "-q"],
         _both(_config(), _read_only("ro")), needs_non_root=True),
    # 200 bytes per file: Python's own start-up probes fit, the run folder's config.yaml does not.
    Case("simulate-out-disk-full", S, _config(), code=1, max_file_bytes=200, process=True, says="the disk is full"),
    Case("simulate-out-name-too-long", ["simulate", "cfg.yaml", "--out", "r" * 300, "-q"], _config()),
    Case("simulate-out-dangling-symlink", S, _both(_config(), _symlink("out", "nowhere"))),
    Case("simulate-out-not-empty", S, _both(_config(), _files({"out/notes.txt": "mine"}))),
    Case("overwrite-foreign-folder", S + ["--overwrite"], _both(_config(), _files({"out/notes.txt": "mine"}))),
    Case("overwrite-project-folder", S + ["--overwrite"],
         _both(_config(), _files({"out/config.yaml": "name: mine\n", "out/analysis.py": "print(1)\n"})),
         says="not created by fedse"),
    Case("overwrite-working-folder", ["simulate", "../cfg.yaml", "--out", ".", "--overwrite", "-q"],
         _both(_config(), _files({"work/.fedse-run": "{}", "work/config.yaml": "x", "work/notes.txt": "mine"})),
         cwd="work", says="working folder"),
    Case("overwrite-parent-folder", ["simulate", "../cfg.yaml", "--out", "..", "--overwrite", "-q"],
         _both(_config(), _files({".fedse-run": "{}", "work/notes.txt": "mine"})), cwd="work"),
    Case("overwrite-run-with-user-files", ["simulate", "cfg.yaml", "--out", "run", "--overwrite", "-q"],
         _both(_config(), _run_folder(), _files({"run/my-notes.md": "mine"}))),
    Case("model-missing", S, _config(_set("model.name_or_path", "./no-such-model"))),
    Case("model-truncated-weights", S, _model_copy(_truncate("model.safetensors", 1000)), says="damaged or incomplete"),
    Case("model-corrupt-config", S, _model_copy(_truncate("config.json", 10))),
    # -- simulate --resume -----------------------------------------------------------------------------------------
    Case("resume-missing", ["simulate", "--resume", "nowhere", "-q"]),
    Case("resume-not-a-run", ["simulate", "--resume", "folder", "-q"], _files({"folder/notes.txt": "x"})),
    Case("resume-with-overwrite", ["simulate", "--resume", "run", "--overwrite", "-q"], _resumable_run()),
    Case("resume-with-out", ["simulate", "--resume", "run", "--out", "x", "-q"], _resumable_run()),
    Case("resume-set-without-config", ["simulate", "--resume", "run", "--set", "seed=1", "-q"], _resumable_run()),
    Case("resume-changed-config", ["simulate", "cfg.yaml", "--resume", "run", "-q"],
         _resumable_run(_set("federation.rounds", 5)), says="federation.rounds: 2 -> 5"),
    Case("resume-damaged-config", ["simulate", "--resume", "run", "-q"],
         _both(_resumable_run(), _files({"run/config.yaml": "name: [\n"}))),
    # -- report on damaged summaries ------------------------------------------------------------------------------
    Case("report-missing", ["report", "nowhere"]),
    Case("report-no-summary", ["report", "folder"], _files({"folder/x": ""})),
    Case("report-summary-not-json", ["report", "run"], _run_folder(raw=b"{not json")),
    Case("report-summary-empty", ["report", "run"], _run_folder(raw=b"")),
    Case("report-summary-binary", ["report", "run"], _run_folder(raw=bytes(range(256)))),
    Case("report-summary-list", ["report", "run"], _run_folder(summary=[1, 2])),
    Case("report-summary-no-name", ["report", "run"], _run_folder(summary={"mode": "fedse"})),
    Case("report-summary-bad-count", ["report", "run"],
         _run_folder(summary={"name": "x", "mode": "fedse", "rounds_completed": "many"})),
    Case("report-summary-env-list", ["report", "run"],
         _run_folder(summary={"name": "x", "mode": "fedse", "success_by_env": [1]})),
    Case("report-summary-rate-text", ["report", "run"],
         _run_folder(summary={"name": "x", "mode": "fedse", "micro_avg": {"1": "high"}})),
    Case("report-summary-deep", ["report", "run"], _run_folder(raw=_nested_json(100_000))),
    # -- privacy ------------------------------------------------------------------------------------------------------
    Case("plan-epsilon-zero", ["privacy", "plan", "--target-epsilon", "0", "--rounds", "2", "--records", "10"]),
    Case("plan-epsilon-negative", ["privacy", "plan", "--target-epsilon", "-1", "--rounds", "2", "--records", "10"]),
    Case("plan-epsilon-inf", ["privacy", "plan", "--target-epsilon", "inf", "--rounds", "2", "--records", "10"]),
    Case("plan-delta-two", ["privacy", "plan", "-e", "4", "--rounds", "2", "--records", "10", "--delta", "2"]),
    Case("plan-rounds-zero", ["privacy", "plan", "-e", "4", "--rounds", "0", "--records", "10"]),
    Case("plan-no-records", ["privacy", "plan", "-e", "4", "--rounds", "2"]),
    Case("plan-bad-config", ["privacy", "plan", "-e", "4", "--config", "cfg.yaml"], _text("name: [\n")),
    Case("ledger-missing", ["privacy", "verify", "nope.jsonl"]),
    Case("ledger-is-folder", ["privacy", "report", "folder"], _files({"folder/x": ""})),
    Case("ledger-deep-json", ["privacy", "verify", "ledger.jsonl", "--no-cross-check"],
         _ledger_line(_nested_json(100_000) + b"\n"), code=1, line="FAILED "),
    Case("ledger-binary", ["privacy", "verify", "ledger.jsonl", "--no-cross-check"],
         _ledger_line(bytes(range(256)) + b"\n"), code=1, line="FAILED "),
    Case("ledger-report-delta-zero", ["privacy", "report", "ledger.jsonl", "--delta", "0"], _ledger_line(b"")),
    # -- keys and certificates ----------------------------------------------------------------------------------------
    Case("keys-name-dotdot", ["keys", "init", "--out", "pki", "-i", ".."]),
    Case("keys-name-slash", ["keys", "init", "--out", "pki", "-i", "a/b"]),
    Case("keys-dangling-symlink", ["keys", "init", "--out", "pki", "-i", "a"],
         _symlink("pki/institutions/a/node_auth", "stolen-key"), says="is a symbolic link"),
    Case("keys-twice", ["keys", "init", "--out", "pki", "-i", "a"], _pki),
    Case("keys-registry-corrupt", ["keys", "init", "--out", "pki", "-i", "d"], _both(_pki, _files(
        {"pki/registry.json": "{not json"}))),
    Case("certs-corrupt-ca", ["certs", "init", "--out", "pki", "-i", "a"], _files({"pki/ca/ca.pem": "garbage",
                                                                                  "pki/ca/ca.key": "garbage"})),
    Case("certs-corrupt-ca-key", ["certs", "init", "--out", "pki", "-i", "a"],
         _both(_pki, _garble("pki/ca/ca.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))),
    Case("certs-name-dotdot", ["certs", "init", "--out", "pki", "-i", ".."]),
    Case("server-config-missing", ["server", "start", "--config", "nope.yaml"], process=True),
    Case("server-corrupt-cert", ["server", "start", "--config", "coordinator.yaml"],
         _coordinator(_garble("pki/coordinator/superlink.pem")), process=True, says="superlink.pem is damaged"),
    Case("server-corrupt-identity", ["server", "start", "--config", "coordinator.yaml"],
         _coordinator(_garble("pki/institutions/a/identity_ed25519.pub", b"not a key")), process=True,
         says="identity_ed25519.pub is damaged"),
    Case("server-corrupt-node-key", ["server", "start", "--config", "coordinator.yaml"],
         _coordinator(_garble("pki/institutions/b/node_auth.pub", b"ecdsa-sha2-nistp384 AAAA")), process=True,
         says="node_auth.pub is damaged"),
    Case("server-duplicate-key", ["server", "start", "--config", "coordinator.yaml"],
         _coordinator(lambda root: (root / "coordinator.yaml").write_text(
             (root / "coordinator.yaml").read_text() + "state_dir: elsewhere\n")), process=True),
    Case("node-config-missing", ["node", "start", "--config", "nope.yaml"], process=True),
    Case("keys-registry-bad-config", ["keys", "registry", "--config", "cfg.yaml", "--out", "r.json"], _text("[1]\n")),
    # -- other commands --------------------------------------------------------------------------------------------
    Case("envs-check-unknown", ["envs", "check", "--env", "chess"]),
    Case("threats-unknown-protection", ["threats", "verify", "--disable", "moat"]),
    Case("sweep-bad-seeds", ["sweep", "cfg.yaml", "--seeds", "a,b"], _config()),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                state[rel] = ("dir", st.st_mode)
            else:
                state[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def _limit(max_bytes: int | None):
    if max_bytes is None:
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


@dataclass
class Outcome:
    code: int
    output: str
    #: An exception that escaped the command (in-process only): a traceback in the real program.
    escaped: BaseException | None = None


def _in_process(case: Case, cwd: Path) -> Outcome:
    from typer.testing import CliRunner

    from fedse_cli.main import app

    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, case.args, catch_exceptions=True, env={"COLUMNS": "200"})
    finally:
        os.chdir(here)
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout + result.stderr, escaped)


def _as_process(case: Case, cwd: Path) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", *case.args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, preexec_fn=_limit(case.max_file_bytes),
                          env={**os.environ, "COLUMNS": "200"})
    return Outcome(proc.returncode, proc.stdout + proc.stderr)


def _run_case(case: Case, base: Path, as_process: bool) -> str | None:
    """None if the case behaved, else what went wrong."""
    root = base / ("process" if as_process else "in-process") / case.id
    root.mkdir(parents=True)
    if case.setup:
        case.setup(root)
    before = _snapshot(root)
    outcome = (_as_process if as_process else _in_process)(case, root / case.cwd)
    problems = []
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(case.line)]
    if outcome.escaped is not None or "Traceback" in outcome.output:
        problems.append(f"an exception escaped: {outcome.escaped!r}")
    if outcome.code != case.code:
        problems.append(f"exit {outcome.code}, expected {case.code}")
    if len(errors) != 1:
        problems.append(f"{len(errors)} lines starting {case.line!r}")
    if any("this is a bug" in line for line in errors):
        problems.append("an unexpected exception")
    if case.says and not any(case.says in line for line in errors):
        problems.append(f"the line does not say {case.says!r}")
    after = _snapshot(root)
    if after != before:
        changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
        problems.append(f"changed the file system: {changed[:5]}")
    if problems:
        how = "process" if as_process else "in-process"
        return (f"{case.id} ({how}): {'; '.join(problems)}\n    $ fedse {' '.join(case.args)}\n    "
                f"{outcome.output.strip()[-600:]}")
    return None


def _applicable(cases: list[Case]) -> list[Case]:
    return [c for c in cases if not (c.needs_non_root and os.geteuid() == 0)]


def test_bad_input_table(tmp_path, capsys):
    cases = _applicable([c for c in CASES if not c.process])
    failures = [f for f in (_run_case(c, tmp_path, as_process=False) for c in cases) if f]
    with capsys.disabled():
        print(f"\nbad-input table (in-process): {len(cases) - len(failures)} of {len(cases)} cases gave one clear "
              "line, the expected non-zero exit and an untouched file system")
    assert not failures, "\n".join(failures)


#: Every kind of case also as a real process: the executable must behave exactly as the command tree does.
SAMPLE = ["config-binary", "set-unparseable", "simulate-name-dotdot-overwrite", "overwrite-working-folder",
          "report-summary-deep", "keys-dangling-symlink", "resume-changed-config", "model-truncated-weights"]


def test_bad_input_table_as_processes(tmp_path, capsys):
    cases = _applicable([c for c in CASES if c.process or c.id in SAMPLE])
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda c: _run_case(c, tmp_path, as_process=True), cases))
    failures = [o for o in outcomes if o]
    with capsys.disabled():
        print(f"\nbad-input table (processes): {len(cases) - len(failures)} of {len(cases)} cases gave one clear line, "
              f"the expected non-zero exit and an untouched file system")
    assert not failures, "\n".join(failures)


def test_cases_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(SAMPLE) <= set(ids)
    assert len(CASES) >= 100, "the table covers the issue's categories with at least 100 cases"


@pytest.mark.parametrize("args", [["simulate", "missing.yaml"], ["report", "missing"]])
def test_debug_flag_shows_the_traceback(tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", "--debug", *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
