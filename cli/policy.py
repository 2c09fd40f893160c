"""`fedse policy check|hash|explain`: an institution's node policy, as a dry run (heavy imports inside commands)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

policy_app = typer.Typer(
    help="Node policies: check a coordinator's experiment against an institution's policy before any data is touched.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2):
    from fedse_cli.progress import fail

    fail(message, code)


def _experiment(path: Path, overrides: list[str]):
    from fedse_secure.config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as err:
        _fail(str(err))


def _policy(path: Path):
    from fedse_secure.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as err:
        _fail(str(err))


def _model_hash(experiment) -> str:
    from fedse_secure.models import load_model_and_tokenizer
    from fedse_secure.policy import model_hash

    loaded = load_model_and_tokenizer(experiment.model.name_or_path, dtype=experiment.model.dtype)
    return model_hash(loaded.model)


@policy_app.command("check")
def check(
    policy: Path = typer.Option(..., "--policy", "-p", help="The institution's node policy (YAML)."),
    experiment: Path = typer.Option(..., "--experiment", "-e", help="The coordinator's experiment (YAML)."),
    overrides: list[str] = typer.Option([], "--set", help="Override an experiment field, e.g. --set privacy.mode=dp-sgd."),
    institution: str | None = typer.Option(None, "--institution", "-i",
                                           help="The institution deciding (default: the policy file's name)."),
    epsilon_cap: float | None = typer.Option(None, "--epsilon-cap", help="A further epsilon cap (a deployment's "
                                                                          "privacy.epsilon)."),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON (one object)."),
) -> None:
    """Decide as the institution would: exit 0 accepted (with the settings it would use), 1 refused (one line per
    violated field), 2 bad input."""
    from fedse_secure.policy import check_model, decide

    if epsilon_cap is not None and not (math.isfinite(epsilon_cap) and epsilon_cap > 0):
        _fail(f"--epsilon-cap {epsilon_cap:g}: an ε cap must be a positive finite number, e.g. --epsilon-cap 8")
    rules = _policy(policy)
    exp = _experiment(experiment, overrides)
    decision = decide(rules, exp, institution or policy.stem, epsilon_cap=epsilon_cap)
    model_sha = None
    if decision.accepted and rules.approvals.models != "any":
        model_sha = _model_hash(exp)
        check_model(decision, model_sha)
    if as_json:
        typer.echo(json.dumps({
            "accepted": decision.accepted, "experiment_hash": decision.experiment_hash, "model_hash": model_sha,
            "violations": [{"field": v.field, "requested": v.requested, "required": v.required, "line": v.line}
                           for v in decision.violations],
            "adjustments": decision.adjustments,
            "privacy": decision.effective.privacy.model_dump(mode="json") if decision.effective else None,
        }))
        raise typer.Exit(0 if decision.accepted else 1)
    if not decision.accepted:
        typer.echo(f"REFUSED by {policy} ({len(decision.violations)} violated field(s)):")
        for line in decision.lines:
            typer.echo(f"  {line}")
        raise typer.Exit(1)
    p = decision.effective.privacy
    typer.echo(f"ACCEPTED by {policy}: experiment {decision.experiment_hash}")
    for line in decision.adjustments:
        typer.echo(f"  stricter side wins: {line}")
    budget = "none" if p.epsilon_budget is None else f"{p.epsilon_budget:g}"
    typer.echo(f"  the institution would run privacy.mode={p.mode}, noise_multiplier={p.noise_multiplier:g}, "
               f"delta={p.delta:g}, epsilon_budget={budget}, accountant={p.accountant}, neighbouring={p.neighbouring}")
    allow = rules.exports.allow
    typer.echo(f"  statistics that may leave besides the update: {', '.join(allow) if allow else 'none'}")


@policy_app.command("hash")
def hash_(
    experiment: Path = typer.Option(..., "--experiment", "-e", help="The experiment (YAML)."),
    overrides: list[str] = typer.Option([], "--set", help="Override an experiment field."),
    model: bool = typer.Option(False, "--model", help="Also load the base model and print its weights' hash."),
) -> None:
    """The hashes a policy approves (approvals.experiments, approvals.models)."""
    from fedse_secure.policy import experiment_hash

    exp = _experiment(experiment, overrides)
    typer.echo(f"experiment {experiment_hash(exp.model_dump_json())}")
    if model:
        typer.echo(f"model      {_model_hash(exp)}  ({exp.model.name_or_path})")


@policy_app.command("explain")
def explain(section: str | None = typer.Argument(None, help="A section (privacy, exports, ...); all if omitted.")) -> None:
    """Every policy field with its default and meaning; for exports, every statistic that may be allowed."""
    from fedse_secure.policy import NodePolicy
    from fedse_secure.policy.exports import CATALOGUE, PUBLIC
    from fedse_secure.schema import StrictModel

    sections = {name: info for name, info in NodePolicy.model_fields.items()}
    if section is not None and section not in sections:
        _fail(f"policy explain: no section {section!r}; sections: {', '.join(sections)}")
    for name, info in sections.items():
        if section is not None and name != section:
            continue
        model = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, StrictModel) \
            else None
        typer.echo(f"{name}: {info.description}")
        if model is None:
            continue
        defaults = model()
        for field, finfo in model.model_fields.items():
            typer.echo(f"  {name}.{field} (default {getattr(defaults, field)!r}): {finfo.description}")
        if name == "exports":
            typer.echo("  always leave (public or built to reveal nothing):")
            for key, why in PUBLIC.items():
                typer.echo(f"    {key}: {why}")
            typer.echo("  may be allowed (computed from private data without DP):")
            for key, why in CATALOGUE.items():
                typer.echo(f"    {key}: {why}")
