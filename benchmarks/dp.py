"""DP-SGD step time ÷ non-DP step time for LoRA on the default model (target: ratio <= 1.5).

Both step kinds run side by side in one process on the same peft model, batch and loss
(``fedse_secure.privacy.per_sequence_loss``), interleaved in blocks so that machine load drifts affect both:

* non-DP: forward, backward, AdamW step.
* DP-SGD: the same through Opacus exactly as ``train_dp_sgd`` builds it (hooks-mode ``GradSampleModule``, per-sample
  clipping and Gaussian noise in ``DPOptimizer``), on a fixed batch so that both kinds see the same work (Poisson
  batches vary in size around the same expected batch).

Usage: ``python benchmarks/dp.py [--model smollm2-135m-instruct] [--seq-len 256] [--batch 4] [--json]``;
with ``--json`` the last line printed is one JSON object with ``dp_step_s``, ``nondp_step_s`` and ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from _common import add_model_options, model_config, offline_torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=3, help="interleaved blocks of each step kind")
    parser.add_argument("--steps-per-block", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    args = parser.parse_args(argv)
    torch = offline_torch(args.threads)
    from opacus.optimizers import DPOptimizer
    from peft import LoraConfig, get_peft_model

    from fedse_secure.models import load_model_and_tokenizer
    from fedse_secure.privacy import per_sequence_loss
    from fedse_secure.privacy.dpsgd import IGNORE_INDEX, wrap_for_per_sample_grads

    cfg = model_config(args)
    t0 = time.perf_counter()
    # On its device before peft wraps it, as AgentModel.load does (adapters are created beside their layers).
    loaded = load_model_and_tokenizer(args.model, cfg.dtype, cfg.device)
    device = loaded.device
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(10, vocab, (args.batch, args.seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : args.seq_len // 2] = IGNORE_INDEX  # loss on the agent's half of the conversation, as in SFT
    batch = [t.to(device) for t in (input_ids, attention_mask, labels)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    nondp_opt = torch.optim.AdamW(params, lr=1e-5)

    # CPU seconds of this process next to wall seconds: on a shared machine the wall time mostly measures the
    # neighbours, while the process's CPU time tracks the work done.
    nondp_cpu: list[float] = []
    dp_cpu: list[float] = []

    def nondp_step() -> float:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        nondp_opt.zero_grad(set_to_none=True)
        per_sequence_loss(model, *batch).backward()
        nondp_opt.step()
        sync()
        nondp_cpu.append(time.process_time() - cpu)
        return time.perf_counter() - start

    def dp_block(n: int, timed: bool) -> list[float]:
        gsm = wrap_for_per_sample_grads(model)
        opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-5), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=args.batch, loss_reduction="mean")
        times = []
        try:
            for _ in range(n):
                sync()
                start, cpu = time.perf_counter(), time.process_time()
                opt.zero_grad(set_to_none=True)
                per_sequence_loss(gsm, *batch).backward()
                opt.step()
                sync()
                times.append(time.perf_counter() - start)
                if timed:
                    dp_cpu.append(time.process_time() - cpu)
        finally:
            opt.zero_grad(set_to_none=True)
            gsm.to_standard_module()
        return times if timed else []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"loaded {args.model} in {load_s:.1f} s; {trainable} trainable LoRA params; warming up")
    for _ in range(args.warmup):
        nondp_step()
    nondp_cpu.clear()
    dp_block(args.warmup, timed=False)
    nondp_times: list[float] = []
    dp_times: list[float] = []
    for block in range(args.blocks):
        nondp_times += [nondp_step() for _ in range(args.steps_per_block)]
        dp_times += dp_block(args.steps_per_block, timed=True)
        log(f"block {block + 1}/{args.blocks}: non-DP {nondp_times[-1]:.3f} s, DP-SGD {dp_times[-1]:.3f} s")

    nondp_s = statistics.median(nondp_times)
    dp_s = statistics.median(dp_times)
    result = {
        "dp_step_s": round(dp_s, 4),
        "nondp_step_s": round(nondp_s, 4),
        "ratio": round(dp_s / nondp_s, 3),
        "target_ratio": 1.5,
        "meets_target": dp_s / nondp_s <= 1.5,
        "model": args.model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lora_r": 8,
        "trainable_params": trainable,
        "dp_step_cpu_s": round(statistics.median(dp_cpu), 4),
        "nondp_step_cpu_s": round(statistics.median(nondp_cpu), 4),
        "cpu_ratio": round(statistics.median(dp_cpu) / statistics.median(nondp_cpu), 3),
        "timed_steps_each": len(dp_times),
        "dp_steps_s": [round(t, 4) for t in dp_times],
        "nondp_steps_s": [round(t, 4) for t in nondp_times],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if not args.json:
        print(f"{args.model} LoRA r=8, batch {args.batch} x {args.seq_len} tokens on {result['device']}:")
        print(f"  non-DP step {nondp_s:.3f} s, DP-SGD step {dp_s:.3f} s, ratio {dp_s / nondp_s:.2f}x (target <= 1.5x)")
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
