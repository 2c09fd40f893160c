"""Threat checks that train models: update inversion (T2) and membership inference (T7).

Both use real agent data (Maze expert trajectories, tokenised by ``encode_trajectory`` with the SmolLM2
tokenizer), the real trainers (``train_lora`` for SFT, ``train_dp_sgd`` with Opacus for DP-SGD), the real
aggregation payload (``FedAvg.client_payload``) and the real secure aggregation (the masking backend).

To keep every check within seconds on two CPU cores, the model is the tiny Llama architecture (2 layers,
hidden 64) with its vocabulary cut down to the tokens that occur in the records: SmolLM2's 49k-entry output
layer would otherwise cost about 97% of the compute. Token ids are remapped one-to-one, so the data, the LoRA
layers and the training code paths are unchanged; only the embedding and output matrices are smaller.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedse_threat_model.attacks import coordinator_view
from fedse_threat_model.harness import CheckResult, ProtectionSettings, check, rounded

MAX_SEQ_LEN = 128


@dataclass
class _Records:
    examples: list  # EncodedExample with remapped ids
    vocab_size: int
    pad_id: int


@functools.lru_cache(maxsize=4)
def _records(n: int, first_task: int) -> _Records:
    """``n`` records: the first decision of a Maze expert trajectory (observation, expert thought and action), with
    a random six-character case reference in the thought.

    The reference is a canary in the sense of Carlini et al.'s "Secret Sharer": it makes each record's content
    unpredictable from the others, which is what a private trajectory has (names, identifiers, free text) and
    what lets a non-DP model's memorisation show within seconds. Without it, templated Maze steps are learnt as a
    rule, and no attack (with or without DP) separates members from non-members at this scale.
    """
    from transformers import AutoTokenizer

    from fedse_secure.agent.sft import IGNORE_INDEX, EncodedExample, encode_messages
    from fedse_secure.envs import generate_demonstrations, make_env
    from fedse_secure.envs.trajectory import conversation_head
    from fedse_secure.models.loading import prepare_tiny_model

    tok = AutoTokenizer.from_pretrained(str(prepare_tiny_model()), local_files_only=True)
    env = make_env("maze")
    ids = list(env.train_task_ids())[first_task:]
    demos = generate_demonstrations("maze", ids[: n + 16])[:n]
    if len(demos) < n:
        raise RuntimeError(f"only {len(demos)} Maze demonstrations for {n} records; the oracle failed on many tasks")
    rng = np.random.default_rng(first_task)
    alphabet = list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789")
    encoded = []
    for d in demos:
        # The first observation without the rules the Maze prompt opens it with (records stay short), and the
        # agent's first reply (after the conversation start's "OK").
        head = conversation_head(d.messages)
        observation = d.messages[head - 1]["content"].removeprefix(env.prompt.preamble).lstrip("\n")
        user = {"role": "user", "content": observation}
        reply = d.messages[head]
        ref = "".join(rng.choice(alphabet, 6))
        thought, action = reply["content"].split("\nAction:", 1)
        msgs = [user, {"role": "assistant", "content": f"{thought} Case {ref}.\nAction:{action}"}]
        encoded.append(encode_messages(tok, msgs, MAX_SEQ_LEN))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vocab = sorted({t for e in encoded for t in e.input_ids} | {pad})
    remap = {t: i for i, t in enumerate(vocab)}
    examples = [
        EncodedExample([remap[t] for t in e.input_ids], [remap[t] if t != IGNORE_INDEX else t for t in e.labels])
        for e in encoded
    ]
    return _Records(examples, len(vocab), remap[pad])


@contextlib.contextmanager
def _one_thread():
    """The models here are tiny: one thread avoids OpenMP spin-waits that make them many times slower on a
    shared, busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model(vocab_size: int, pad_id: int, seed: int, r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_SEQ_LEN,
                      tie_word_embeddings=True, pad_token_id=pad_id,
                      # With the default 0.02 the tied output layer caps every logit near +-1, so no LoRA can
                      # make the model confident about anything; a wider initialisation lets training fit.
                      initializer_range=0.3)
    base = LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                            task_type="CAUSAL_LM", bias="none"))
    model.eval()
    return model


def _per_record_loss(model, examples, pad_id: int) -> np.ndarray:
    import torch

    from fedse_secure.agent.sft import collate_examples
    from fedse_secure.privacy import per_sequence_loss

    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            ids, mask, labels = collate_examples(examples[i : i + 16], pad_id)
            out += per_sequence_loss(model, ids, mask, labels, reduction="none").tolist()
    return np.array(out)


# ======================================================================================================
# T7: membership inference against the released adapter
# ======================================================================================================

MIA_RECORDS = 32  # members; as many non-members
MIA_EPSILON = 1.0
MIA_DELTA = 1e-5


def advantage_bound(eps: float, delta: float) -> float:
    """Largest membership advantage TPR - FPR of any test against an (eps, delta)-DP mechanism.

    From the hypothesis-testing view of DP (Kairouz, Oh, Viswanath 2015): TPR <= e^eps FPR + delta and
    1 - FPR <= e^eps (1 - TPR) + delta; maximising TPR - FPR under both gives (e^eps - 1 + 2 delta) / (e^eps + 1).
    """
    return (math.exp(eps) - 1 + 2 * delta) / (math.exp(eps) + 1)


def _threshold_advantage(member_loss: np.ndarray, other_loss: np.ndarray) -> float:
    """Loss-threshold attack (Yeom et al. 2018), threshold fitted on one half and scored on the other half,
    both ways round: a fitted-and-scored-on-the-same-data threshold would overstate the advantage."""
    rng = np.random.default_rng(0)
    m, o = rng.permutation(member_loss), rng.permutation(other_loss)
    halves = [(m[::2], o[::2], m[1::2], o[1::2]), (m[1::2], o[1::2], m[::2], o[::2])]
    scores = []
    for fm, fo, em, eo in halves:
        cands = np.concatenate([fm, fo])
        best = max(cands, key=lambda th: np.mean(fm <= th) - np.mean(fo <= th))
        scores.append(np.mean(em <= best) - np.mean(eo <= best))
    return float(np.mean(scores))


@functools.lru_cache(maxsize=2)
def _mia_experiment(seed: int) -> dict[str, Any]:
    import torch

    from fedse_secure.agent.sft import train_lora
    from fedse_secure.config import PrivacyConfig, TrainingConfig
    from fedse_secure.privacy import noise_multiplier_for_target, planned_steps, sample_rate, train_dp_sgd

    recs = _records(2 * MIA_RECORDS, 0)
    order = np.random.default_rng(seed).permutation(2 * MIA_RECORDS)
    members = [recs.examples[i] for i in order[:MIA_RECORDS]]
    others = [recs.examples[i] for i in order[MIA_RECORDS:]]
    out: dict[str, Any] = {"records_per_side": MIA_RECORDS}
    with torch.random.fork_rng(devices=[]), _one_thread():
        # Without DP: the institution's ordinary SFT, run long enough to fit its records well.
        plain = _model(recs.vocab_size, recs.pad_id, seed, r=16)
        sft = TrainingConfig(learning_rate=2e-2, lr_schedule="constant", epochs_per_round=30, batch_size=8,
                             max_seq_len=MAX_SEQ_LEN, grad_clip_norm=1.0)
        train_lora(plain, members, sft, recs.pad_id, seed)
        lm, lo = _per_record_loss(plain, members, recs.pad_id), _per_record_loss(plain, others, recs.pad_id)
        out["no_dp"] = {"advantage": _threshold_advantage(lm, lo), "member_loss": float(lm.mean()),
                        "non_member_loss": float(lo.mean())}
        # With DP-SGD calibrated to (MIA_EPSILON, MIA_DELTA) for the same records.
        dp_train = TrainingConfig(learning_rate=2e-2, lr_schedule="constant", epochs_per_round=8,
                                  max_seq_len=MAX_SEQ_LEN)
        probe = PrivacyConfig(mode="dp-sgd", expected_batch_size=8, max_grad_norm=1.0, delta=MIA_DELTA)
        q, steps = sample_rate(MIA_RECORDS, probe), planned_steps(MIA_RECORDS, dp_train, probe)
        sigma = noise_multiplier_for_target(MIA_EPSILON, MIA_DELTA, q, steps, 1)
        privacy = probe.model_copy(update={"noise_multiplier": sigma})
        dp_model = _model(recs.vocab_size, recs.pad_id, seed, r=16)
        dp_model.train()  # Opacus validates that the model is in training mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reproducible noise is announced with a warning; intended here
            res = train_dp_sgd(dp_model, members, dp_train, privacy, recs.pad_id, seed, reproducible_noise=True)
        dm, do = _per_record_loss(dp_model, members, recs.pad_id), _per_record_loss(dp_model, others, recs.pad_id)
        out["dp"] = {"advantage": _threshold_advantage(dm, do), "member_loss": float(dm.mean()),
                     "non_member_loss": float(do.mean()), "epsilon": float(res.round_epsilon),
                     "noise_multiplier": float(sigma), "sample_rate": q, "steps": res.steps}
        out["initial_loss"] = float(_per_record_loss(_model(recs.vocab_size, recs.pad_id, seed, r=16), members,
                                                     recs.pad_id).mean())
    return out


@check
def membership_inference(settings: ProtectionSettings) -> CheckResult:
    """Whoever receives the trained adapter (the coordinator, other institutions, anyone it is published to)
    tests whether a given trajectory was in an institution's training data. Pass: the attack's advantage on the
    released model stays within what (eps, delta)-DP allows for the configured eps."""
    exp = _mia_experiment(settings.seed)
    bound = advantage_bound(MIA_EPSILON, MIA_DELTA)
    released = exp["dp"] if settings.on("dp") else exp["no_dp"]
    adv = released["advantage"]
    # The spread of TPR - FPR estimated from 2 x 32 records (two-fold) is about 0.12; reported, not hidden.
    stderr = math.sqrt(0.5 / MIA_RECORDS)
    # The guarantee must exist (accounted eps within the claim) and the attack must respect it.
    accounted = exp["dp"]["epsilon"] if settings.on("dp") else math.inf
    passed = adv <= bound and accounted <= MIA_EPSILON * 1.01
    evidence = {
        "claimed_epsilon": MIA_EPSILON, "delta": MIA_DELTA, "advantage_bound": rounded(bound),
        "released_model": "dp-sgd" if settings.on("dp") else "no dp",
        "advantage_released": rounded(adv), "advantage_standard_error": rounded(stderr),
        "advantage_dp_model": rounded(exp["dp"]["advantage"]), "advantage_non_dp_model": rounded(exp["no_dp"]["advantage"]),
        "dp_epsilon_accounted": rounded(exp["dp"]["epsilon"]),
        "released_model_epsilon": "inf (no DP)" if math.isinf(accounted) else rounded(accounted), "dp_noise_multiplier": rounded(exp["dp"]["noise_multiplier"]),
        "dp_steps": exp["dp"]["steps"], "dp_sample_rate": rounded(exp["dp"]["sample_rate"]),
        "loss_member_vs_non_member_dp": [rounded(exp["dp"]["member_loss"]), rounded(exp["dp"]["non_member_loss"])],
        "loss_member_vs_non_member_no_dp": [rounded(exp["no_dp"]["member_loss"]), rounded(exp["no_dp"]["non_member_loss"])],
        "loss_before_training": rounded(exp["initial_loss"]), "records_per_side": exp["records_per_side"],
    }
    summary = (f"loss-threshold MIA advantage {adv:.2f} (+-{stderr:.2f}) on the released model vs bound "
               f"{bound:.2f} for eps={MIA_EPSILON:g}; DP model {exp['dp']['advantage']:.2f}, non-DP model "
               f"{exp['no_dp']['advantage']:.2f}")
    return CheckResult(passed, summary, evidence)


# ======================================================================================================
# T2: update inversion - the coordinator identifies an institution's training trajectories
# ======================================================================================================

INV_POOL = 36  # candidate trajectories the attacker can generate itself (the environment is public)
INV_PER_INSTITUTION = 6
INV_INSTITUTIONS = 3


@functools.lru_cache(maxsize=2)
def _inversion_experiment(seed: int) -> dict[str, Any]:
    import torch

    from fedse_secure.agent.sft import train_lora
    from fedse_secure.aggregation.rules.fedavg import FedAvg
    from fedse_secure.models.adapters import get_adapter_state, set_adapter_state
    from fedse_secure.config import TrainingConfig

    recs = _records(INV_POOL, 200)
    with torch.random.fork_rng(devices=[]), _one_thread():
        model = _model(recs.vocab_size, recs.pad_id, seed + 1, r=8)
        global_state = get_adapter_state(model)
        order = np.random.default_rng(seed).permutation(INV_POOL)
        owned = {f"inst{i}": sorted(order[i * INV_PER_INSTITUTION : (i + 1) * INV_PER_INSTITUTION].tolist())
                 for i in range(INV_INSTITUTIONS)}
        cfg = TrainingConfig(learning_rate=5e-3, epochs_per_round=3, batch_size=4, max_seq_len=MAX_SEQ_LEN)
        payloads = {}
        for i, (name, idx) in enumerate(owned.items()):
            set_adapter_state(model, global_state)
            train_lora(model, [recs.examples[j] for j in idx], cfg, recs.pad_id, seed + 10 + i)
            payloads[name] = FedAvg().client_payload(get_adapter_state(model), global_state)
        set_adapter_state(model, global_state)
        base_loss = _per_record_loss(model, recs.examples, recs.pad_id)
    return {"model": model, "global": global_state, "owned": owned, "payloads": payloads, "base_loss": base_loss,
            "records": recs}


def _loss_drop_guess(exp: dict[str, Any], update: np.ndarray, k: int, clip: float = 8.0) -> list[int]:
    """Apply the (estimated) update to the global adapter and name the k candidates whose loss drops most:
    a trained update lowers the loss of its own records far more than that of other trajectories."""
    import torch

    from fedse_secure.aggregation.flat import FlatSpec, unflatten
    from fedse_secure.models.adapters import set_adapter_state

    g = exp["global"]
    # The attacker knows every honest update lies inside the secure-aggregation clip range.
    delta = unflatten(np.clip(np.nan_to_num(update), -clip, clip), FlatSpec.of(g))
    recs = exp["records"]
    with torch.random.fork_rng(devices=[]), _one_thread():
        set_adapter_state(exp["model"], {k_: g[k_] + delta[k_] for k_ in g})
        after = _per_record_loss(exp["model"], recs.examples, recs.pad_id)
        set_adapter_state(exp["model"], g)
    drop = np.nan_to_num(exp["base_loss"] - after, nan=-np.inf)
    return np.argsort(-drop, kind="stable")[:k].tolist()


@check
def update_inversion(settings: ProtectionSettings) -> CheckResult:
    """The coordinator inverts what it receives for one institution: it applies the institution's LoRA update to
    the global adapter and names the candidate trajectories (it can generate them: the environment is public)
    whose loss drops most. Pass: against the coordinator's actual view the attack does no better than chance,
    although it works on the true update (control)."""
    exp = _inversion_experiment(settings.seed)
    owned, payloads = exp["owned"], exp["payloads"]
    k = INV_PER_INSTITUTION
    chance = k / INV_POOL

    def precision(vectors: dict[str, np.ndarray]) -> float:
        hits = sum(len(set(_loss_drop_guess(exp, vectors[n], k)) & set(owned[n])) for n in owned)
        return hits / (k * len(owned))

    control = precision(payloads)
    result, view, _ = coordinator_view(settings, payloads, settings.seed)
    attacked = precision(view)
    all_owned = sorted(i for idx in owned.values() for i in idx)
    mean_update = result.total / len(payloads)
    sum_hits = len(set(_loss_drop_guess(exp, mean_update, len(all_owned))) & set(all_owned)) / len(all_owned)
    # Chance is 1/6; 18 random guesses (hypergeometric) reach 0.45 with probability below 1%.
    limit = chance + 0.28
    passed = control >= 0.8 and attacked <= limit
    evidence = {
        "candidates": INV_POOL, "institutions": INV_INSTITUTIONS, "records_per_institution": k,
        "chance_precision": rounded(chance), "limit": rounded(limit), "secure_aggregation": settings.secure_aggregation,
        "precision_on_true_update_control": rounded(control), "precision_on_coordinator_view": rounded(attacked),
        "residual_precision_on_released_mean": rounded(sum_hits), "update_size": int(next(iter(payloads.values())).size),
    }
    summary = (f"training-set identification from the coordinator's view: precision {attacked:.2f} (chance "
               f"{chance:.2f}, limit {limit:.2f}); {control:.2f} on the true update; {sum_hits:.2f} on the released mean")
    if control < 0.8:
        summary = f"the attack itself is too weak (control precision {control:.2f} < 0.8): the check proves nothing"
    return CheckResult(passed, summary, evidence)
