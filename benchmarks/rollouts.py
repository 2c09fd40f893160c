"""Rollout throughput, measured against the machine's own limit in the same run.

Three measurements, each printed as a table and, with ``--json``, in one last JSON line:

* **limit**: a 2048 x 2048 float32 matmul probe gives the machine's GFLOP/s at the benchmark's thread count;
  divided by the model's FLOPs per token (2 x its parameters, the issue's rule) it gives the prompt tokens per
  second the machine could at most encode. ``limit_fraction`` is the tokens the model really ran through per
  second of forward pass, over that limit; ``flop_fraction`` the same counting the FLOPs those tokens cost
  (decoder for every token, LM head only where logits were needed).
* **score mode, the issue's case** (Maze, memoryless, sampled at temperature 1, batch 8, 16 episodes at the
  environment's turn limit): agent steps per second of the engine (candidates packed in one row per prompt,
  the prompt's prefix and the shared system prompt from caches) against scoring the very same steps the way the
  engine did before (``candidate_log_likelihoods``: every candidate on its own full row), side by side.
* **generate and constrained modes** (one section each): batched (continuous batching + per-slot prefix KV cache +
  shared template) vs one episode at a time, greedy, identical trajectories required.

    python benchmarks/rollouts.py --json
    python benchmarks/rollouts.py --model tiny-llama --episodes 4 --json        # quick
    python benchmarks/rollouts.py --generate-modes constrained   # only the constrained-generation section
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import add_model_options, model_config, offline_torch


def matmul_gflops(torch, size: int = 2048, seconds: float = 2.0) -> float:
    """float32 GFLOP/s of a square matmul at the current thread count (median of repeated timings)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e9


def model_costs(model) -> tuple[float, float]:
    """(FLOPs per token through the decoder, FLOPs per position through the LM head), 2 x parameters each."""
    from fedse_secure.agent.sft import decoder_and_head

    total = sum(p.numel() for p in model.parameters())
    parts = decoder_and_head(model)
    head = parts[1].weight.numel() if parts is not None else 0
    # A tied LM head shares its weight with the embedding, which costs no FLOPs (a lookup): count it once, as head.
    return 2.0 * (total - head), 2.0 * head


def replay_steps(make_env, trajectories, tokenizer, history_turns, budget):
    """(prompt text, valid actions) of every step the trajectories took, by replaying their actions."""
    from fedse_secure.agent.rollout import TokenCounter, fit_history, prompt_texts
    from fedse_secure.envs.trajectory import conversation_head

    count = TokenCounter(tokenizer)
    steps = []
    for t in trajectories:
        env = make_env()
        env.reset(t.task_id)
        for i, m in enumerate(t.messages):
            if m["role"] != "assistant" or i < conversation_head(t.messages):  # AgentGym's "OK" is not a step
                continue
            chat = fit_history(t.messages[:i], budget, count, history_turns)
            steps.append((prompt_texts(tokenizer, [chat])[0], env.valid_actions()))
            env.step(m["content"])
    return steps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(ap)
    ap.add_argument("--env", default="maze", help="environment (its test task ids are used)")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="slots of the score-mode run (the issue's case: 8)")
    ap.add_argument("--generate-batch-size", type=int, default=16)
    ap.add_argument("--generate-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-context-tokens", type=int, default=1024)
    ap.add_argument("--skip-generate", action="store_true", help="only the limit probe and score mode")
    ap.add_argument("--skip-reference", action="store_true",
                    help="score mode without scoring its steps the old way (minutes); no speed-up is reported then")
    ap.add_argument("--generate-modes", default="generate,constrained",
                    help="comma-separated action modes of the batched-vs-one-at-a-time section (each its own section)")
    args = ap.parse_args(argv)
    generate_modes = [m for m in args.generate_modes.split(",") if m]
    unknown = sorted(set(generate_modes) - {"generate", "constrained"})
    if unknown:
        ap.error(f"--generate-modes: unknown mode(s) {unknown}; use generate and/or constrained")
    torch = offline_torch(args.threads)

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.rollout import RolloutSettings, candidate_log_likelihoods, run_episodes
    from fedse_secure.config import LoraSettings
    from fedse_secure.envs import make_env

    t0 = time.perf_counter()
    agent = AgentModel.load(model_config(args), LoraSettings(), seed=0)
    load_s = time.perf_counter() - t0
    model, tok = agent.model, agent.tokenizer
    probe = make_env(args.env)
    tasks = list(probe.test_task_ids())[: args.episodes]
    if len(tasks) < args.episodes:
        tasks = [tasks[i % len(tasks)] for i in range(args.episodes)]
    env_factory = lambda: make_env(args.env)  # noqa: E731

    gflops = matmul_gflops(torch)
    decoder_flops, head_flops = model_costs(model)
    issue_flops_per_token = decoder_flops + head_flops
    limit_tokens_per_s = gflops * 1e9 / issue_flops_per_token

    def throughput(stats) -> dict:
        flops = stats.encoded_tokens * decoder_flops + stats.head_positions * head_flops
        tps = stats.encoded_tokens / stats.forward_seconds if stats.forward_seconds else 0.0
        return {"encoded_tokens": stats.encoded_tokens, "reused_tokens": stats.reused_tokens,
                "head_positions": stats.head_positions, "forward_s": round(stats.forward_seconds, 3),
                "tokens_per_forward_s": round(tps, 1), "limit_fraction": round(tps / limit_tokens_per_s, 3),
                "flop_fraction": round(flops / stats.forward_seconds / (gflops * 1e9), 3) if stats.forward_seconds
                else 0.0}

    # Warm-up (allocator, kernels, tokenizer caches) so no measured run pays one-off costs.
    run_episodes(model, tok, env_factory, tasks[:1], RolloutSettings(max_turns=1, max_new_tokens=4, greedy=True,
                                                                      batch_size=1, action_mode="score"))

    # -- score mode, the issue's case --------------------------------------------------------------------------
    score_settings = RolloutSettings(max_turns=probe.max_turns, greedy=False, temperature=1.0,
                                     batch_size=args.batch_size, max_context_tokens=args.max_context_tokens,
                                     action_mode="score", history_turns=0)
    trajs, stats = run_episodes(model, tok, env_factory, tasks, score_settings, seed=0)
    engine_steps_per_s = stats.agent_steps / stats.seconds
    score = {"episodes": stats.episodes, "agent_steps": stats.agent_steps, "seconds": round(stats.seconds, 3),
             "steps_per_s": round(engine_steps_per_s, 4), "successes": sum(t.success for t in trajs),
             "reference_scoring_s": None, "reference_steps_per_s": None, "speedup_vs_reference": None,
             **throughput(stats)}
    if not args.skip_reference:
        replayed = replay_steps(env_factory, trajs, tok, 0, args.max_context_tokens - score_settings.max_new_tokens)
        assert len(replayed) == stats.agent_steps, (len(replayed), stats.agent_steps)
        t_ref = time.perf_counter()
        for i in range(0, len(replayed), args.batch_size):
            batch = replayed[i : i + args.batch_size]
            candidate_log_likelihoods(model, tok, [p for p, _ in batch], [c for _, c in batch])
        reference_scoring_s = time.perf_counter() - t_ref
        # Same steps, same environments and tokenisation: only the model's work differs between the two.
        overhead_s = stats.seconds - stats.forward_seconds
        reference_steps_per_s = stats.agent_steps / (overhead_s + reference_scoring_s)
        score.update(reference_scoring_s=round(reference_scoring_s, 3),
                     reference_steps_per_s=round(reference_steps_per_s, 4),
                     speedup_vs_reference=round(engine_steps_per_s / reference_steps_per_s, 3))

    result = {
        "model": args.model, "env": args.env, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), "model_load_s": round(load_s, 2),
        "matmul_gflops": round(gflops, 1), "flops_per_token": issue_flops_per_token,
        "limit_tokens_per_s": round(limit_tokens_per_s, 1), "score": score,
        "limit_fraction": score["limit_fraction"], "score_speedup_vs_reference": score["speedup_vs_reference"],
    }

    # -- generate and constrained modes --------------------------------------------------------------------------------
    for mode in [] if args.skip_generate else generate_modes:
        def run(batch_size: int, mode=mode):
            settings = RolloutSettings(max_turns=args.generate_turns, max_new_tokens=args.max_new_tokens, greedy=True,
                                       batch_size=batch_size, max_context_tokens=args.max_context_tokens,
                                       action_mode=mode)
            trajs, stats = run_episodes(model, tok, env_factory, tasks, settings, seed=0)
            return {"seconds": round(stats.seconds, 3), "agent_steps": stats.agent_steps,
                    "generated_tokens": stats.generated_tokens, "forward_batches": stats.generate_calls,
                    "steps_per_s": round(stats.agent_steps / stats.seconds, 4),
                    "tokens_per_s": round(stats.generated_tokens / stats.seconds, 2), **throughput(stats)}, trajs

        batched, b_trajs = run(args.generate_batch_size)
        sequential, s_trajs = run(1)
        result[mode] = {"action_mode": mode,
            "batched": batched, "sequential": sequential,
            "ratio": round(batched["steps_per_s"] / sequential["steps_per_s"], 3),
            "identical_trajectories": [t.messages for t in b_trajs] == [t.messages for t in s_trajs],
        }

    print(f"machine: {gflops:.1f} GFLOP/s (2048^2 float32 matmul, {torch.get_num_threads()} threads); model "
          f"{issue_flops_per_token / 1e9:.3f} GFLOP/token -> limit {limit_tokens_per_s:.0f} prompt tokens/s")
    versus = ("" if score["speedup_vs_reference"] is None else
              f" vs {score['reference_steps_per_s']:.3f} scoring the same steps one candidate per row = "
              f"{score['speedup_vs_reference']:.2f}x")
    print(f"score mode ({args.env}, memoryless, T=1, batch {args.batch_size}, {stats.episodes} episodes): "
          f"{score['steps_per_s']:.3f} agent steps/s{versus}; {score['tokens_per_forward_s']:.0f} "
          f"tokens per forward-second = {score['limit_fraction']:.2f} of the limit (FLOP fraction "
          f"{score['flop_fraction']:.2f}); {score['reused_tokens']} prompt tokens reused from caches, "
          f"{score['encoded_tokens']} encoded")
    for mode in (m for m in ("generate", "constrained") if m in result):
        g = result[mode]
        print(f"{mode} mode: batched {g['batched']['steps_per_s']:.3f} vs one at a time "
              f"{g['sequential']['steps_per_s']:.3f} steps/s = {g['ratio']:.2f}x; limit fraction (batched) "
              f"{g['batched']['limit_fraction']:.2f}; identical greedy trajectories: {g['identical_trajectories']}")
    print(f"load average {result['load_average_1m']:.1f} on {os.cpu_count()} cores")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
