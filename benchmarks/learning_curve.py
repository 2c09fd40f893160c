"""How many SFT steps until a model solves held-out test tasks it could not solve: a learning curve, centralised.

Expert demonstrations from an environment's *train* pool (never its test tasks) are rewritten into score mode
and trained on in chunks of steps; after every chunk the adapter is evaluated greedily, in score mode, on the
first test tasks. It answers the question a demo or an experiment budget depends on ("does this environment move
within N steps on this machine?") without running institutions, rounds or secure aggregation.

    python benchmarks/learning_curve.py --env maze --option prompt_file=configs/prompts/maze-without-rules.json \\
        --memoryless --demos 48 --chunk-steps 15 --chunks 4 --json
    python benchmarks/learning_curve.py --env webshop --option catalogue=simple --memoryless --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter

from _common import add_model_options, model_config, offline_torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--env", default="maze")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an env option (repeatable)")
    ap.add_argument("--memoryless", action="store_true",
                    help="act and train on the instruction and the current observation only (history_turns=0)")
    ap.add_argument("--demos", type=int, default=32, help="expert demonstrations from the train pool")
    ap.add_argument("--eval-tasks", type=int, default=12, help="first test tasks evaluated after every chunk")
    ap.add_argument("--chunk-steps", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-seq-len", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-layers", type=int, default=None,
                    help="LoRA in the last N transformer blocks only (lora.top_layers; default: every block)")
    args = ap.parse_args(argv)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--option {item!r} is not KEY=VALUE; write e.g. --option catalogue=simple")
        options[key] = value
    torch = offline_torch(args.threads)

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.rollout import RolloutSettings, as_score_format, run_episodes
    from fedse_secure.agent.sft import encode_for_training, train_lora
    from fedse_secure.config import LoraSettings, TrainingConfig
    from fedse_secure.envs import generate_demonstrations, make_env
    from fedse_secure.envs.base import extract_action
    from fedse_secure.envs.trajectory import conversation_head

    history = 0 if args.memoryless else None
    probe = make_env(args.env, **options)
    pool = list(probe.train_task_ids())
    random.Random(args.seed).shuffle(pool)
    test_ids = list(probe.test_task_ids())[: args.eval_tasks]
    lora = LoraSettings(r=8, alpha=16, target_modules="all-linear", top_layers=args.top_layers)
    agent = AgentModel.load(model_config(args), lora, seed=args.seed)
    demos = [as_score_format(t) for t in generate_demonstrations(args.env, pool[: args.demos], **options)]
    examples = encode_for_training(agent.tokenizer, demos, args.max_seq_len, history, args.max_seq_len - 48)
    settings = RolloutSettings(max_turns=probe.max_turns, greedy=True, batch_size=len(test_ids), action_mode="score",
                               history_turns=history, max_context_tokens=args.max_seq_len)

    def evaluate() -> dict:
        t0 = time.perf_counter()
        trajs, _ = run_episodes(agent.model, agent.tokenizer, lambda: make_env(args.env, **options), test_ids,
                                settings)
        actions = Counter(extract_action(m["content"]) for t in trajs
                          for m in t.messages[conversation_head(t.messages):] if m["role"] == "assistant")
        return {"successes": sum(t.success for t in trajs), "tasks": len(trajs),
                "seconds": round(time.perf_counter() - t0, 1),
                # A policy that answers every state alike shows here as one action taking nearly every step.
                "top_action_share": round(actions.most_common(1)[0][1] / sum(actions.values()), 3) if actions else None}

    curve = [{"steps": 0, "loss": None, "train_s": 0.0, **evaluate()}]
    print(f"{args.env}: {len(demos)} demonstrations -> {len(examples)} examples; before training "
          f"{curve[0]['successes']}/{curve[0]['tasks']} held-out test tasks", flush=True)
    for chunk in range(args.chunks):
        cfg = TrainingConfig(learning_rate=args.lr, lr_schedule="constant", epochs_per_round=10_000,
                             max_steps_per_round=args.chunk_steps, batch_size=args.batch_size, micro_batch_size=1,
                             max_seq_len=args.max_seq_len)
        t0 = time.perf_counter()
        stats = train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=args.seed + chunk)
        point = {"steps": (chunk + 1) * args.chunk_steps, "loss": round(sum(stats.losses[-3:]) / 3, 4),
                 "train_s": round(time.perf_counter() - t0, 1), **evaluate()}
        curve.append(point)
        print(f"after {point['steps']} steps ({point['train_s']:.0f} s): {point['successes']}/{point['tasks']}, "
              f"loss {point['loss']}, top action share {point['top_action_share']}", flush=True)
    result = {"model": args.model, "env": args.env, "options": options, "memoryless": args.memoryless,
              "demos": len(demos), "examples": len(examples), "batch_size": args.batch_size, "lr": args.lr,
              "top_layers": args.top_layers,
              "torch_threads": torch.get_num_threads(), "curve": curve}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
