"""Peak memory of one LoRA SFT step under each memory setting, on a GPU (allocator peak) or the CPU (peak RSS).

Settings: ``plain``; ``micro_batch_1`` (training.micro_batch_size 1); ``checkpointing``
(training.gradient_checkpointing); ``checkpointing_micro_batch_1`` (both); ``nf4_checkpointing_micro_batch_1``
(both, on a 4-bit base; only when bitsandbytes is installed). The batch is the ``--batch`` longest real multi-turn
examples from all five environments, at most ``--max-seq-len`` tokens each, the same for every setting.

On CUDA the figure is torch's peak allocation during the step minus what was allocated before it (the weights and
the adapter). On the CPU each setting runs in a fresh process and the figure is how far the step raised the
process's peak resident set (Linux: writing 5 to /proc/self/clear_refs resets the peak first): a coarser measure
that includes the allocator's own slack. ``weights_gib`` is what was resident before the step.

Usage: ``python benchmarks/train_memory.py [--model smollm2-135m-instruct] [--device auto] [--batch 4] [--json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from _common import add_model_options, offline_torch

SETTINGS = {
    "plain": ("none", {}),
    "micro_batch_1": ("none", {"micro_batch_size": 1}),
    "checkpointing": ("none", {"gradient_checkpointing": True}),
    "checkpointing_micro_batch_1": ("none", {"gradient_checkpointing": True, "micro_batch_size": 1}),
    "nf4_checkpointing_micro_batch_1": ("nf4", {"gradient_checkpointing": True, "micro_batch_size": 1}),
}
ENVS = ("babyai", "webshop", "textcraft", "maze", "wordle")


def available_settings() -> list[str]:
    return [s for s, (q, _) in SETTINGS.items() if q == "none" or importlib.util.find_spec("bitsandbytes")]


_EXAMPLES: dict = {}


def longest_examples(tokenizer, batch: int, max_seq_len: int):
    from fedse_secure.agent.sft import encode_for_training
    from fedse_secure.envs import generate_demonstrations

    key = (tokenizer.name_or_path, batch, max_seq_len)
    if key not in _EXAMPLES:  # the oracles' demonstrations are the same for every setting
        demos = [t for env in ENVS for t in generate_demonstrations(env, [0, 1, 2])]
        examples = encode_for_training(tokenizer, demos, max_seq_len)
        _EXAMPLES[key] = sorted(examples, key=lambda e: -len(e.input_ids))[:batch]
    return _EXAMPLES[key]


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(torch, model: str, device: str, dtype: str, setting: str, batch: int, max_seq_len: int) -> dict:
    """One SFT step under ``setting`` in this process; its peak memory above what was resident before."""
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.sft import train_lora
    from fedse_secure.config import LoraSettings, ModelConfig, TrainingConfig

    quantization, options = SETTINGS[setting]
    agent = AgentModel.load(ModelConfig(name_or_path=model, device=device, dtype=dtype, quantization=quantization),
                            LoraSettings(), seed=0)
    examples = longest_examples(agent.tokenizer, batch, max_seq_len)
    cfg = TrainingConfig(learning_rate=1e-5, epochs_per_round=1, batch_size=batch, max_steps_per_round=1,
                         max_seq_len=max_seq_len, **options)
    cuda = agent.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(agent.device)
        torch.cuda.reset_peak_memory_stats(agent.device)
        before = torch.cuda.memory_allocated(agent.device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS") * 1024
    train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=0)
    if cuda:
        torch.cuda.synchronize(agent.device)
        peak = torch.cuda.max_memory_allocated(agent.device)
    else:
        peak = _rss_kib("VmHWM") * 1024
    out = {"setting": setting, "device": str(agent.device), "dtype": str(agent.dtype).removeprefix("torch."),
           "tokens_per_sequence": [len(e.input_ids) for e in examples], "weights_gib": before / 2**30,
           "step_peak_gib": (peak - before) / 2**30, "measure": "cuda allocator" if cuda else "peak RSS growth"}
    del agent
    if cuda:
        torch.cuda.empty_cache()
    return out


def measure_all(torch, model: str, device: str, dtype: str, batch: int, max_seq_len: int) -> dict:
    """Every available setting: in this process on CUDA, one fresh process per setting on the CPU."""
    from fedse_secure.models.device import resolve_device

    results = {}
    for setting in available_settings():
        if resolve_device(device).type == "cuda":
            results[setting] = measure(torch, model, device, dtype, setting, batch, max_seq_len)
            continue
        proc = subprocess.run([sys.executable, __file__, "--only", setting, "--model", model, "--device", device,
                               "--dtype", dtype, "--batch", str(batch), "--max-seq-len", str(max_seq_len), "--json"],
                              capture_output=True, text=True, timeout=1800)
        results[setting] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                            else {"error": proc.stderr.strip().splitlines()[-1:]})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--only", choices=list(SETTINGS), default=None, help="measure this setting only")
    args = parser.parse_args(argv)
    torch = offline_torch(args.threads)
    if args.only:
        result = measure(torch, args.model, args.device, args.dtype, args.only, args.batch, args.max_seq_len)
    else:
        result = {"model": args.model, "batch": args.batch, "max_seq_len": args.max_seq_len,
                  "settings": measure_all(torch, args.model, args.device, args.dtype, args.batch, args.max_seq_len)}
        if not args.json:
            for name, r in result["settings"].items():
                print(f"{name:>32}: " + (f"{r['step_peak_gib']:.3f} GiB over {r['weights_gib']:.3f} GiB resident"
                                         if "error" not in r else f"error {r['error']}"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
