"""Rollouts on merged weights against the unmerged LoRA path, side by side in one process.

Each repetition plays the same episodes (greedy, so both paths face the same prompts while their replies agree)
once folded (``fedse_secure/agent/merged.py``, what ``run_episodes`` does on a GPU) and once through peft's LoRA
layers, alternating, and reports each path's best time, generated tokens and agent steps per second, the time
ratio, how many replies the two paths gave alike (folding rounds differently: in bfloat16 a greedy reply can
differ), and the operator calls of one decode step on each path (what a launch-bound GPU step pays for).

    python benchmarks/merged_rollouts.py --device cuda --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from _common import add_model_options, model_config, offline_torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--env", default="webshop")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--action-mode", default="generate", choices=["generate", "score", "constrained"])
    args = ap.parse_args(argv)
    torch = offline_torch(args.threads)
    from fedse_secure.agent import rollout
    from fedse_secure.agent.merged import merged_adapter
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.config import LoraSettings
    from fedse_secure.envs import ENVIRONMENTS

    agent = AgentModel.load(model_config(args), LoraSettings(), seed=0)
    gen = torch.Generator().manual_seed(0)
    # lora_B starts at zero; a trained adapter does not, and the LoRA path costs the same either way.
    agent.load_adapter_state({k: torch.randn(v.shape, generator=gen) * 0.01 if "lora_B" in k else v
                              for k, v in agent.adapter_state().items()})
    spec = ENVIRONMENTS.get(args.env)
    tasks = list(spec.make().test_task_ids())[: args.episodes]
    head = len(spec.make().conversation_start())  # the environment's fixed opening turns are not replies
    settings = rollout.RolloutSettings(max_turns=args.turns, max_new_tokens=args.max_new_tokens, greedy=True,
                                       batch_size=args.episodes, max_context_tokens=4096,
                                       action_mode=args.action_mode)
    paths = {"merged": True, "unmerged": False}

    def play(path: str):
        if agent.device.type == "cuda":
            torch.cuda.synchronize(agent.device)
        t0 = time.perf_counter()
        trajs, stats = rollout.run_episodes(agent.model, agent.tokenizer, spec.make, tasks, settings, seed=0,
                                            fold_adapter=paths[path])
        if agent.device.type == "cuda":
            torch.cuda.synchronize(agent.device)
        return trajs, stats, time.perf_counter() - t0

    def operator_calls_per_decode_step(fold: bool) -> int:
        """Operator calls the model makes in one batch decode step (not those inside other operators): each costs
        dispatch time on the CPU and on a GPU most launch a kernel, so a launch-bound step's time follows them."""
        from torch.profiler import ProfilerActivity, profile
        from transformers import DynamicCache

        ids = torch.full((args.episodes, 8), agent.tokenizer.pad_token_id or 0, device=agent.device)
        with torch.no_grad(), (merged_adapter(agent.model) if fold else contextlib.nullcontext()):
            cache = DynamicCache()
            agent.model(input_ids=ids, past_key_values=cache, use_cache=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                agent.model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        return sum(1 for e in prof.events() if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

    play("merged")  # warm-up: kernels, allocator, caches
    best: dict[str, dict] = {}
    replies: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for path in paths:
            trajs, stats, seconds = play(path)
            if path not in best or seconds < best[path]["seconds"]:
                best[path] = {"seconds": seconds, "generated_tokens": stats.generated_tokens,
                              "tokens_per_s": stats.generated_tokens / seconds,
                              "agent_steps": stats.agent_steps, "agent_steps_per_s": stats.agent_steps / seconds}
            replies[path] = [m["content"] for t in trajs for m in t.messages[head:] if m["role"] == "assistant"]
    same = sum(a == b for a, b in zip(replies["merged"], replies["unmerged"]))
    result = {
        "model": args.model, "device": str(agent.device), "dtype": str(agent.dtype).removeprefix("torch."),
        "env": args.env, "action_mode": args.action_mode, "episodes": args.episodes, "turns": args.turns,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, **best,
        # Same episodes on both paths, so the time ratio is the speed-up while their replies agree.
        "unmerged_over_merged_time": best["unmerged"]["seconds"] / best["merged"]["seconds"],
        "operator_calls_per_decode_step": {"merged": operator_calls_per_decode_step(True),
                                           "unmerged": operator_calls_per_decode_step(False)},
        "same_replies": f"{same}/{max(len(replies['merged']), len(replies['unmerged']))}",
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
