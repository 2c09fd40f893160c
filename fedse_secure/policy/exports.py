"""What leaves an institution besides the (DP-protected, securely aggregated) update: its round report and its
evaluation, filtered by the node policy.

Every statistic an institution reports is classified here. ``PUBLIC`` ones follow from the experiment's
configuration or are built to reveal nothing (a salted hash, a signature); they always leave. Everything in
``CATALOGUE`` is computed from the institution's private data **without** differential privacy (success
counts, losses, buffer sizes, durations, the sample rate and the ε spent, which give away the record count):
each leaves only if the policy lists it under ``exports.allow``. Anything a future version reports that is in
neither list is withheld (fail closed). The names of withheld statistics leave, so a reader knows what is
missing and why.
"""

from __future__ import annotations

import math
from typing import Any

#: Always exported: configuration, public facts, and values designed to leak nothing.
PUBLIC: dict[str, str] = {
    "env": "the environment's name (from the experiment)",
    "payload_values": "length of the update vector (the adapter's size, from the experiment)",
    "privacy.mechanism": "the privacy mechanism (from the experiment)",
    "privacy.private": "whether the release carries a DP guarantee",
    "privacy.non_private": "why a DP mechanism's release is labelled non-private",
    "privacy.delta": "the delta the ledger is accounted at (from the policy and the experiment)",
    "privacy.accountant": "the accountant (from the experiment)",
    "privacy.neighbouring": "the neighbouring relation (from the experiment)",
    "privacy.noise_multiplier": "the noise multiplier (from the experiment)",
    "privacy.clip_norm": "the clipping bound (from the experiment)",
    "privacy.noise_std": "client-dp: the std of this institution's noise share (from the experiment)",
    "privacy.contributors_assumed": "client-dp: the contributors the noise is sized for (from the backend)",
    "privacy.ledger_head": "the ledger's head hash after the round (salted: reveals nothing about the events)",
    "attestation": "the institution's signature over the round's ledger head, payload hash and experiment",
    "withheld": "the names of the statistics the policy kept inside",
}

#: Computed from private data without DP: leave only when the policy allows them (name -> why it is sensitive).
CATALOGUE: dict[str, str] = {
    "explore.episodes": "episodes explored (from the experiment, unless the task pool is smaller)",
    "explore.successes": "successful explorations: the agent's success on private tasks",
    "explore.success_rate": "success rate of exploration on private tasks",
    "explore.agent_steps": "turns taken while exploring",
    "explore.generated_tokens": "tokens generated while exploring",
    "explore.kept": "trajectories kept this round",
    "explore.added_to_buffer": "trajectories added to the buffer",
    "explore.buffer_size": "the buffer size: the record count DP-SGD's guarantee is about",
    "train.examples": "training examples: the record count",
    "train.steps": "optimiser steps (epochs / sample rate: reveals the record count)",
    "train.loss": "training loss on private trajectories (dpsgd.py: never to be sent)",
    "train.target_tokens": "labelled tokens trained on",
    "privacy.epsilon_spent": "epsilon spent so far (a function of the sample rate, so of the record count)",
    "privacy.sample_rate": "DP-SGD's sample rate expected_batch_size / records: the record count",
    "privacy.update_norm": "client-dp: the update's norm before clipping",
    "privacy.clipped": "client-dp: whether the update was clipped",
    "timing.explore_s": "exploration time (grows with private trajectories)",
    "timing.train_s": "training time (grows with the record count)",
    "evaluation.success_rate": "held-out test success (with its successes and test_tasks): a coarse exception "
                               "many federations allow, so the global adapter's quality can be followed",
    "evaluation.seconds": "evaluation time",
    "evaluation.agent_steps": "turns taken while evaluating",
}

#: Exporting an evaluation's success rate exports its parts (the micro average needs them).
_EVALUATION_PARTS = {"evaluation.success_rate": ("success_rate", "successes", "test_tasks")}


def _flatten(report: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "attestation":
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _strict(value: Any) -> Any:
    """Strict JSON: an infinite or NaN number never leaves (it is None), whatever produced it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def filter_round_report(report: dict[str, Any], allow: list[str]) -> dict[str, Any]:
    """The round report as it may leave: public fields, the allowed statistics, and the names withheld."""
    allowed = set(allow)
    kept, withheld = {}, []
    for name, value in _flatten(report).items():
        if name in PUBLIC or name in allowed:
            kept[name] = _strict(value)
        else:
            withheld.append(name)
    out = _nest(kept)
    if withheld:
        out["withheld"] = sorted(withheld)
    return out


def evaluation_allowed(allow: list[str]) -> bool:
    return "evaluation.success_rate" in allow


def filter_evaluation(report: dict[str, Any], allow: list[str]) -> dict[str, Any]:
    """An evaluation as it may leave (only called when its success rate may leave at all)."""
    allowed = {part for name in allow for part in _EVALUATION_PARTS.get(name, ())}
    allowed |= {name.split(".", 1)[1] for name in allow if name.startswith("evaluation.")}
    kept = {k: _strict(v) for k, v in report.items() if k == "env" or k in allowed}
    withheld = sorted(f"evaluation.{k}" for k in report if k not in kept)
    if withheld:
        kept["withheld"] = withheld
    return kept
