"""SFT step time, one effect at a time: the LM head on every position (the model's own ``labels=`` loss) vs on
the target tokens only (``fedse_secure.agent.sft.target_token_loss``); one pass over the batch vs the prefix that
every row shares run once (``decode_sharing_prefix``); LoRA in every block vs in the top ``--top-layers``
blocks only (``lora.top_layers``: the backward pass stops below them); and those top blocks run alone on the
frozen lower blocks' hidden states cached once per example, with the shared prefix (``FrozenPrefix``). The
shared and cached settings are what ``train_lora`` does; an example's first step pays its lower pass, reported
per example.

All run side by side in one process on the same peft models (the paper's LoRA: r=8, all linear layers) and the
same batches of real multi-turn SFT examples (expert demonstrations from all five environments, tokenised as
the institutions tokenise their buffers; consecutive ones, so a batch holds one environment's), interleaved in
blocks so that machine load drifts affect all. The losses of each pair are checked equal on every batch.

Usage: ``python benchmarks/sft.py [--model smollm2-135m-instruct] [--batch 2] [--max-seq-len 768] [--json]``;
with ``--json`` the last line printed is one JSON object with the median step time of each setting
(``full_head_step_s``, ``target_only_step_s``, ``shared_step_s``, ``top_layers_step_s``, ``cached_step_s``), the
ratio of each pair (``speedup``: full head / target only; ``shared_speedup``: one pass / shared prefix;
``top_layers_speedup``: every block / top blocks; ``cached_speedup``: top blocks, one pass / cached and shared),
``shared_prefix_share`` (the positions the batches share) and ``lower_pass_s_per_example``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from _common import add_model_options, model_config, offline_torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=768)
    parser.add_argument("--blocks", type=int, default=3, help="interleaved blocks of each kind")
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=None,
                        help="blocks adapted in the top-layers setting (default: a third of the model's, at least 1)")
    args = parser.parse_args(argv)
    torch = offline_torch(args.threads)

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.sft import (
        collate_examples,
        encode_for_training,
        frozen_prefix,
        shared_prefix_length,
        target_token_loss,
    )
    from fedse_secure.config import LoraSettings
    from fedse_secure.envs import generate_demonstrations

    agent = AgentModel.load(model_config(args), LoraSettings(), seed=0)
    model, tok = agent.model, agent.tokenizer
    demos = [t for env in ("babyai", "webshop", "textcraft", "maze", "wordle") for t in generate_demonstrations(env, [0, 1])]
    examples = encode_for_training(tok, demos, args.max_seq_len)
    chunks = [examples[i : i + args.batch] for i in range(0, len(examples) - args.batch + 1, args.batch)]
    batches = [tuple(t.to(agent.device) for t in collate_examples(chunk, tok.pad_token_id)) for chunk in chunks]
    positions = sum(int(m.sum()) for _, m, _ in batches)
    targets = sum(int((lab != -100).sum()) for _, _, lab in batches)
    # Positions a shared-prefix pass runs once instead of once per row.
    shared_positions = sum((len(c) - 1) * shared_prefix_length(ids, m) for c, (ids, m, _) in zip(chunks, batches))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    # The same LoRA in the top blocks only: a second peft model on its own copy of the base weights.
    top_n = args.top_layers or max(1, model.base_model.model.config.num_hidden_layers // 3)
    top = AgentModel.load(model_config(args), LoraSettings(top_layers=top_n), seed=0).model
    top_opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-5)
    top.train()
    frozen = frozen_prefix(top)
    t0 = time.perf_counter()
    for e in examples:  # every example's lower pass, once: what its first step in a run pays on top
        frozen.hidden(e)
    lower_pass_s = (time.perf_counter() - t0) / len(examples)

    def full_head(ids, mask, labels, _chunk):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def target_only(ids, mask, labels, _chunk):
        return target_token_loss(model, ids, mask, labels, share_prefix=False)

    def shared(ids, mask, labels, _chunk):
        return target_token_loss(model, ids, mask, labels)

    def top_layers(ids, mask, labels, _chunk):
        return target_token_loss(top, ids, mask, labels, share_prefix=False)

    def cached(ids, mask, labels, chunk):
        return target_token_loss(top, ids, mask, labels, frozen, chunk)

    # Each setting, and the setting whose loss it must equal on the same batch.
    settings = {"full_head": (full_head, None), "target_only": (target_only, full_head),
                "shared": (shared, target_only), "top_layers": (top_layers, None), "cached": (cached, top_layers)}
    optimisers = {"full_head": opt, "target_only": opt, "shared": opt, "top_layers": top_opt, "cached": top_opt}
    times: dict[str, list[float]] = {name: [] for name in settings}
    loss_diff: dict[str, float] = {name: 0.0 for name, (_, ref) in settings.items() if ref is not None}
    k = 0
    for _ in range(args.blocks):
        for name, (fn, reference) in settings.items():
            for _ in range(args.steps_per_block):
                ids, mask, labels = batches[k % len(batches)]
                chunk = chunks[k % len(batches)]
                k += 1
                if reference is not None:
                    with torch.no_grad():
                        diff = abs(float(fn(ids, mask, labels, chunk) - reference(ids, mask, labels, chunk)))
                    loss_diff[name] = max(loss_diff[name], diff)
                t0 = time.perf_counter()
                loss = fn(ids, mask, labels, chunk)
                optimisers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimisers[name].step()
                times[name].append(time.perf_counter() - t0)
    # The optimiser moved the adapter between steps; that does not change the cost of a step.
    step = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": args.model, "batch": args.batch, "max_seq_len": args.max_seq_len, "examples": len(examples),
        "target_token_share": targets / positions, "shared_prefix_share": shared_positions / positions,
        **{f"{name}_step_s": value for name, value in step.items()},
        "speedup": step["full_head"] / step["target_only"], "shared_speedup": step["target_only"] / step["shared"],
        "top_layers": top_n, "blocks": top.base_model.model.config.num_hidden_layers,
        "top_layers_speedup": step["target_only"] / step["top_layers"],
        "cached_speedup": step["top_layers"] / step["cached"], "lower_pass_s_per_example": lower_pass_s,
        "max_loss_diff": loss_diff["target_only"], "max_shared_loss_diff": loss_diff["shared"],
        "max_cached_loss_diff": loss_diff["cached"], "steps_each": len(times["full_head"]),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    print(json.dumps(result))
    return 0 if max(loss_diff.values()) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
