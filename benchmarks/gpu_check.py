"""The GPU check (``benchmarks/gpu_check.sh``): does the whole system work on this GPU, and how fast is it.

One run, one JSON object as the last line:

* ``machine``: device, torch build, CUDA version, memory (as ``fedse doctor`` reads them);
* ``sft``: one SFT step on the same batch (real multi-turn examples from all five environments) on the GPU and
  on the CPU, their times and ratio, and the losses of both on that batch before any update;
* ``sft_memory``: peak GPU memory of one SFT step per memory setting (plain, micro-batches, gradient
  checkpointing, both, an NF4 base when bitsandbytes is installed);
* ``rollouts``: generated tokens per second of each rollout engine (``hf``: the project's batched KV-cache
  engine; vLLM is not built, and the JSON says so);
* ``dp_sgd``: DP-SGD steps on the GPU with the LoRA-update sanity check (opacus#820): with σ = 0 the GPU's
  update must equal the CPU's on the same sampled batches, and with noise the adapter must move and stay finite;
* ``fedse``: two rounds of ``configs/paper/one-gpu-small.yaml`` through the real CLI, success per environment.

``--sections`` runs some of them and ``--fedse-rounds`` sets the rounds: a round of that config at the paper's
turn limits takes minutes on a GPU, so a short lease measures it alone (``--sections fedse --fedse-rounds 1``).

It keeps to a deadline (``--budget-s``, 450 s by default, well inside 8 minutes): the Fed-SE run gets what is
left and is interrupted (and reported as such, with the rounds it finished) if it needs more. Without a CUDA
device, or with ``--reduced``, it runs the same sections in a reduced form on the CPU (the tiny model, small
sizes, no GPU figures), which is what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import offline_torch

REPO = Path(__file__).resolve().parents[1]
ENVS = ("babyai", "webshop", "textcraft", "maze", "wordle")
SECTIONS = ("sft", "sft_memory", "rollouts", "dp_sgd", "fedse")


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def _timed(torch, device, fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` on ``device`` (synchronised on CUDA)."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _load(model: str, device: str, dtype: str = "auto", quantization: str = "none"):
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.config import LoraSettings, ModelConfig

    return AgentModel.load(ModelConfig(name_or_path=model, device=device, dtype=dtype, quantization=quantization),
                           LoraSettings(), seed=0)


def _examples(tokenizer, max_seq_len: int):
    from fedse_secure.agent.sft import encode_for_training
    from fedse_secure.envs import generate_demonstrations

    demos = [t for env in ENVS for t in generate_demonstrations(env, [0, 1])]
    return encode_for_training(tokenizer, demos, max_seq_len)


def _sft_step(torch, agent, batch, optimizer):
    from fedse_secure.agent.sft import collate_examples, target_token_loss

    ids, mask, labels = (t.to(agent.device) for t in collate_examples(batch, agent.tokenizer.pad_token_id))
    loss = target_token_loss(agent.model, ids, mask, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def check_sft(torch, model: str, gpu, examples_of, batch_size: int, repeats: dict[str, int]) -> dict:
    """One SFT step on the same batch on each device: seconds, ratio, and the loss before any update."""
    out = {"batch": batch_size}
    for name, device in (("gpu", gpu), ("cpu", torch.device("cpu"))):
        if device is None:
            out[f"{name}_step_s"] = out[f"{name}_loss"] = None
            continue
        agent = _load(model, str(device))
        batch = examples_of(agent.tokenizer)[:batch_size]
        from fedse_secure.agent.sft import collate_examples, target_token_loss

        with torch.no_grad():
            ids, mask, labels = (t.to(agent.device) for t in collate_examples(batch, agent.tokenizer.pad_token_id))
            out[f"{name}_loss"] = float(target_token_loss(agent.model, ids, mask, labels))
        params = [p for p in agent.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        agent.model.train()
        out[f"{name}_step_s"] = _timed(torch, device, lambda: _sft_step(torch, agent, batch, opt), repeats[name])
        out[f"{name}_dtype"] = str(agent.dtype).removeprefix("torch.")
        out["tokens"] = sum(len(e.input_ids) for e in batch)
        del agent, opt
    out["cpu_over_gpu"] = (out["cpu_step_s"] / out["gpu_step_s"]) if out.get("gpu_step_s") else None
    return out


def check_sft_memory(torch, model: str, gpu) -> dict | None:
    """Peak GPU memory of one SFT step per memory setting (benchmarks/train_memory.py, in this process)."""
    if gpu is None:
        return None
    from train_memory import measure_all

    return measure_all(torch, model, str(gpu), "auto", batch=4, max_seq_len=4096)


def check_rollouts(torch, model: str, device, episodes: int, max_new_tokens: int) -> dict:
    """Greedy episodes through each rollout engine: generated tokens per second."""
    from fedse_secure.agent.rollout import RolloutSettings, run_episodes
    from fedse_secure.envs import ENVIRONMENTS

    agent = _load(model, str(device))
    spec = ENVIRONMENTS.get("webshop")
    tasks = list(spec.make().test_task_ids())[:episodes]
    settings = RolloutSettings(max_turns=4, max_new_tokens=max_new_tokens, greedy=True, batch_size=episodes,
                               max_context_tokens=2048)
    run_episodes(agent.model, agent.tokenizer, spec.make, tasks[:1], settings, seed=0)  # warm-up (kernels, caches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _, stats = run_episodes(agent.model, agent.tokenizer, spec.make, tasks, settings, seed=0)
    return {"hf": {"device": str(device), "episodes": stats.episodes, "generated_tokens": stats.generated_tokens,
                   "seconds": stats.seconds, "tokens_per_s": stats.generated_tokens / stats.seconds,
                   "batch": settings.batch_size},
            "vllm": {"available": False, "reason": "exploration.engine vllm is not built in this project"}}


def check_dp_sgd(torch, model: str, gpu, examples_of, records: int) -> dict:
    """DP-SGD on the device: σ = 0 must give the CPU's update on the same batches; with noise the adapter moves."""
    from fedse_secure.config import PrivacyConfig, TrainingConfig
    from fedse_secure.privacy import train_dp_sgd

    device = gpu or torch.device("cpu")
    training = TrainingConfig(learning_rate=1e-3, epochs_per_round=1, max_steps_per_round=2)
    updates = {}
    for name, where in (("device", device), ("cpu", torch.device("cpu"))):
        agent = _load(model, str(where), dtype="float32")
        examples = examples_of(agent.tokenizer)[:records]
        start = agent.adapter_state()
        agent.model.train()
        res = train_dp_sgd(agent.model, examples, training,
                           PrivacyConfig(mode="dp-sgd", noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=3),
                           agent.tokenizer.pad_token_id, seed=7, reproducible_noise=True)
        after = agent.adapter_state()
        updates[name] = ({k: after[k] - start[k] for k in start}, res.batch_sizes)
        del agent
    (dev_update, dev_batches), (cpu_update, cpu_batches) = updates["device"], updates["cpu"]
    # Relative L2 over the whole update: AdamW's first steps are close to lr * sign(g), so the few weights whose
    # gradient is within rounding of zero may differ elementwise; a misplaced or lost update differs wholesale.
    diff = math.sqrt(sum(float((dev_update[k] - cpu_update[k]).pow(2).sum()) for k in dev_update))
    size = math.sqrt(sum(float(cpu_update[k].pow(2).sum()) for k in cpu_update))
    # With noise, in the precision a run on this device uses (bf16 on recent GPUs): the sanity check inside
    # train_dp_sgd raises if the adapter did not move or went non-finite.
    agent = _load(model, str(device))
    examples = examples_of(agent.tokenizer)[:records]
    agent.model.train()
    t0 = time.perf_counter()
    noisy = train_dp_sgd(agent.model, examples, training,
                         PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=3),
                         agent.tokenizer.pad_token_id, seed=7)
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(v).all()) for v in agent.adapter_state().values())
    return {"device": str(device), "same_batches": dev_batches == cpu_batches,
            "sigma0_update_l2": size, "sigma0_device_vs_cpu_l2": diff,
            "sigma0_relative_diff": diff / size if size else None,
            "noisy": {"dtype": str(agent.dtype).removeprefix("torch."), "steps": noisy.steps,
                      "step_s": seconds / max(1, noisy.steps), "epsilon": noisy.round_epsilon, "finite": finite},
            "lora_update_ok": dev_batches == cpu_batches and finite and size > 0 and diff <= 1e-2 * size}


def check_fedse(clock: Clock, reduced: bool, out_dir: Path, rounds: int) -> dict:
    """``rounds`` rounds of one-gpu-small.yaml through the real CLI, within what is left of the budget."""
    config = REPO / "configs" / "paper" / "one-gpu-small.yaml"
    overrides = [f"federation.rounds={rounds}"]
    if reduced:
        overrides += ["model.name_or_path=tiny-llama", "model.device=cpu", "model.max_context_tokens=1024",
                      "training.max_seq_len=512", "training.max_steps_per_round=2", "exploration.episodes_per_round=2",
                      "exploration.max_turns=2", "exploration.max_new_tokens=12", "exploration.batch_size=2",
                      "evaluation.test_tasks=2", "evaluation.max_new_tokens=12", "evaluation.batch_size=2"]
        overrides += [f"clients.{i}.seed_demos=2" for i in range(len(ENVS))]
    run = out_dir / "one-gpu-small"
    cmd = [sys.executable, "-m", "fedse_cli.main", "simulate", str(config), "--out", str(run), "--overwrite", "-q"]
    for o in overrides:
        cmd += ["--set", o]
    limit = max(30.0, clock.left() - 15)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)  # the run folder then holds every finished round and says "interrupted"
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    out = {"config": str(config.relative_to(REPO)), "overrides": overrides, "returncode": proc.returncode,
           "timed_out": timed_out, "limit_s": round(limit, 1), "wall_s": time.perf_counter() - t0}
    summary_path = run / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        last = max(s["micro_avg"], key=int) if s["micro_avg"] else None
        out.update({"status": s["status"], "rounds_completed": s["rounds_completed"], "round_s": s["round_s"],
                    "success_by_env": {env: by_round.get(last) for env, by_round in s["success_by_env"].items()},
                    "micro_avg": s["micro_avg"].get(last) if last else None, "evaluated_round": last})
    if proc.returncode != 0 and not timed_out:
        out["error"] = (err or "").strip().splitlines()[-1:] or None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450.0, help="deadline for the whole check (default 450)")
    parser.add_argument("--reduced", action="store_true", help="the CPU form even where a GPU is present")
    parser.add_argument("--out", type=Path, default=None, help="folder for the Fed-SE run (default: a temporary one)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="which sections, comma-separated (default: all): " + ", ".join(SECTIONS))
    parser.add_argument("--fedse-rounds", type=int, default=2, help="rounds of the Fed-SE run (default 2)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen or args.fedse_rounds < 1:
        parser.error(f"--sections takes some of {', '.join(SECTIONS)} (got {args.sections!r}) and --fedse-rounds "
                     "at least 1")
    clock = Clock(args.budget_s)
    torch = offline_torch(None)
    from fedse_secure.machine import inspect_machine

    gpu = torch.device("cuda", 0) if torch.cuda.is_available() and not args.reduced else None
    reduced = gpu is None
    machine = inspect_machine()
    model = "tiny-llama" if reduced else "smollm2-135m-instruct"
    cache: dict = {}

    # The reduced form trains on shorter windows: the CPU it runs on is usually shared (CI, 2 cores).
    def examples_of(tokenizer, max_seq_len: int = 512 if reduced else 4096):
        if max_seq_len not in cache:
            cache[max_seq_len] = _examples(tokenizer, max_seq_len)
        return cache[max_seq_len]

    result: dict = {"mode": "cpu-reduced" if reduced else "gpu", "model": model,
                    "machine": {k: machine[k] for k in ("platform", "torch", "gpus", "auto", "cpu")}}
    sections = [
        ("sft", lambda: check_sft(torch, model, gpu, examples_of, batch_size=2 if reduced else 4,
                                  repeats={"gpu": 5, "cpu": 1 if reduced else 2})),
        ("sft_memory", lambda: check_sft_memory(torch, model, gpu)),
        ("rollouts", lambda: check_rollouts(torch, model, gpu or torch.device("cpu"), episodes=4 if reduced else 16,
                                            max_new_tokens=12 if reduced else 64)),
        ("dp_sgd", lambda: check_dp_sgd(torch, model, gpu, examples_of, records=6 if reduced else 12)),
    ]
    sections = [(name, run) for name, run in sections if name in chosen]
    for name, run in sections:
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as err:  # one failing section must not hide the others' figures
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        if isinstance(result[name], dict):
            result[name]["section_s"] = time.perf_counter() - t0
        if gpu is not None:
            torch.cuda.empty_cache()
    if "fedse" in chosen:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            result["fedse"] = check_fedse(clock, reduced, args.out or Path(tmp), args.fedse_rounds)
    result["wall_s"] = clock.elapsed()
    result["ok"] = all("error" not in (result[k] or {}) for k, _ in sections) \
        and result.get("dp_sgd", {}).get("lora_update_ok", True) is True \
        and result.get("fedse", {}).get("returncode", 0) == 0
    print(json.dumps(result, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
