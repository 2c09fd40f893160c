"""GPU-hours of a Fed-SE run, estimated from its config, measured trajectory sizes and stated hardware figures.

Nothing here is a GPU measurement. What is measured: the token counts of expert trajectories in each
environment (the institutions' own oracles, tokenised with the config's model when its folder is here, else
with SmolLM2's tokenizer as a stand-in, which the output says). What is assumed (each an option, printed):

* training is compute-bound: forward 2N FLOPs per token, activation gradients 2N (the base is frozen; LoRA's
  own gradients are negligible), and 2N more to recompute activations under gradient checkpointing; a GPU
  sustains ``--mfu`` of its ``--peak-tflops``;
* decoding is bandwidth-bound: each decode step reads every weight once, at ``--efficiency`` of
  ``--bandwidth-gbs``, and yields one token per active slot (``exploration.batch_size``); the KV cache reads and
  the prompt prefill (2N per new prompt token) are added on top;
* the buffer holds at least the seed demonstrations (no success ever kept: "low") and at most those plus every
  explored episode ("high"); an explored episode lasts as long as a demonstration ("low") or the whole turn
  limit with full-length replies ("high").

Usage: ``python benchmarks/paper_estimate.py [configs/paper/qwen2.5-7b-instruct.yaml] [--params 7.62e9] [--json]``.
Defaults describe one RTX A6000 (the paper's GPU): 155 dense bf16 TFLOP/s, 768 GB/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import offline_torch

#: Weights of models the estimate may meet without their folder (from their model cards).
KNOWN_PARAMS = {"qwen2.5-7b": 7.62e9, "qwen2.5-3b": 3.09e9, "llama-2-7b": 6.74e9, "qwen3-8b": 8.19e9,
                "qwen3-1.7b": 2.03e9, "smollm2-135m": 1.35e8}


def _params_of(cfg, override: float | None) -> tuple[float, str]:
    from fedse_secure.machine import safetensors_weights

    if override:
        return override, "--params"
    folder = Path(cfg.model.name_or_path).expanduser()
    counts = safetensors_weights(folder) if folder.is_dir() else None
    if counts:
        return float(sum(counts.values())), f"safetensors headers in {folder}"
    key = next((k for k in KNOWN_PARAMS if k in cfg.model.name_or_path.lower()), None)
    if key is None:
        raise SystemExit(f"unknown size of {cfg.model.name_or_path}; pass --params")
    return KNOWN_PARAMS[key], f"model card of {key}"


def _tokenizer_for(cfg):
    from transformers import AutoTokenizer

    from fedse_secure.models.loading import DEFAULT_MODEL, prepare_default_model

    folder = Path(cfg.model.name_or_path).expanduser()
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder)), str(folder)
    return AutoTokenizer.from_pretrained(str(prepare_default_model())), f"{DEFAULT_MODEL} (stand-in)"


def _trajectory_sizes(cfg, tokenizer, env: str, sample: int) -> dict[str, float]:
    from fedse_secure.agent.sft import encode_for_experiment
    from fedse_secure.envs import ENVIRONMENTS, generate_demonstrations

    spec = ENVIRONMENTS.get(env)
    ids = list(spec.make().train_task_ids())[:sample]
    demos = generate_demonstrations(env, ids)
    examples = encode_for_experiment(tokenizer, demos, cfg)
    replies = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
               for d in demos for m in d.messages if m["role"] == "assistant"]
    return {"demos": len(demos), "train_tokens": statistics.mean(len(e.input_ids) for e in examples),
            "turns": statistics.mean(sum(m["role"] == "assistant" for m in d.messages) for d in demos),
            "reply_tokens": statistics.mean(replies), "max_turns": spec.make().max_turns,
            "test_tasks": len(spec.make().test_task_ids())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/paper/qwen2.5-7b-instruct.yaml")
    parser.add_argument("--params", type=float, default=None, help="model weights (default: from the folder or card)")
    parser.add_argument("--sample", type=int, default=20, help="demonstrations measured per environment")
    parser.add_argument("--peak-tflops", type=float, default=155.0, help="dense bf16 TFLOP/s of one GPU")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the peak training sustains")
    parser.add_argument("--bandwidth-gbs", type=float, default=768.0, help="memory bandwidth of one GPU, GB/s")
    parser.add_argument("--efficiency", type=float, default=0.7, help="share of the bandwidth decoding sustains")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    offline_torch(None)
    from fedse_secure.config import ExperimentConfig
    import yaml

    # The estimate is for the machine the config names, not this one: skip the local device check.
    cfg = ExperimentConfig.model_validate(yaml.safe_load(Path(args.config).read_text()),
                                          context={"check_local_device": False})
    n, n_source = _params_of(cfg, args.params)
    tokenizer, tok_source = _tokenizer_for(cfg)
    bytes_per_weight = 0.516 if cfg.model.quantization == "nf4" else (4 if cfg.model.dtype == "float32" else 2)
    flops_per_s = args.peak_tflops * 1e12 * args.mfu
    step_s = n * bytes_per_weight / (args.bandwidth_gbs * 1e9 * args.efficiency)
    train_flops = (6 if cfg.training.gradient_checkpointing else 4) * n
    rounds, episodes = cfg.federation.rounds, cfg.exploration.episodes_per_round
    slots = cfg.exploration.batch_size
    per_env = {}
    totals = {"low": 0.0, "high": 0.0}
    for client in cfg.clients:
        size = _trajectory_sizes(cfg, tokenizer, client.env, args.sample)
        test = cfg.evaluation.test_tasks or size["test_tasks"]
        evals = rounds + (1 if cfg.evaluation.include_initial else 0) if cfg.evaluation.every_round else 1
        hours = {}
        for case in ("low", "high"):
            turns = size["turns"] if case == "low" else size["max_turns"]
            reply = size["reply_tokens"] if case == "low" else cfg.exploration.max_new_tokens
            # Decode: ceil(episodes / slots) waves, each turns x reply steps; prefill: the episode's prompt tokens.
            waves = -(-episodes // slots)
            explore_s = waves * turns * reply * step_s + episodes * size["train_tokens"] * 2 * n / flops_per_s
            eval_waves = -(-test // cfg.evaluation.batch_size)
            eval_s = evals * (eval_waves * turns * reply * step_s + test * size["train_tokens"] * 2 * n / flops_per_s)
            train_s = 0.0
            for r in range(1, rounds + 1):
                kept = 0 if case == "low" else episodes * r
                buffer = client.seed_demos + kept
                train_s += cfg.training.epochs_per_round * buffer * size["train_tokens"] * train_flops / flops_per_s
            hours[case] = {"explore_h": rounds * explore_s / 3600, "evaluate_h": eval_s / 3600,
                           "train_h": train_s / 3600}
            hours[case]["total_h"] = sum(hours[case].values())
            totals[case] += hours[case]["total_h"]
        per_env[client.env] = {"measured": {k: round(v, 1) for k, v in size.items()}, **{
            case: {k: round(v, 2) for k, v in h.items()} for case, h in hours.items()}}
    result = {
        "config": args.config, "model": cfg.model.name_or_path, "params": n, "params_from": n_source,
        "tokenizer": tok_source, "rounds": rounds, "episodes_per_round": episodes,
        "assumed": {"peak_tflops": args.peak_tflops, "mfu": args.mfu, "bandwidth_gbs": args.bandwidth_gbs,
                    "bandwidth_efficiency": args.efficiency, "train_flops_per_token": f"{train_flops / n:.0f}N",
                    "decode_step_s": round(step_s, 4)},
        "per_environment": per_env,
        "gpu_hours_low": round(totals["low"], 1), "gpu_hours_high": round(totals["high"], 1),
    }
    if not args.json:
        for env, v in per_env.items():
            print(f"{env:>10}: {v['low']['total_h']:8.1f} .. {v['high']['total_h']:8.1f} GPU-hours "
                  f"(train {v['low']['train_h']:.1f}..{v['high']['train_h']:.1f})")
        print(f"{'total':>10}: {result['gpu_hours_low']:8.1f} .. {result['gpu_hours_high']:8.1f} GPU-hours")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
