"""Typed configs for a real deployment: one coordinator file and one file per institution.

Relative paths inside a deployment config are resolved against the folder of the file that names them, so a
set of configs can be moved around together (and the examples in ``configs/deploy/`` work from any cwd).

* :class:`CoordinatorDeployConfig` — the experiment (an :class:`ExperimentConfig`, inline or a path), where the
  SuperLink listens, its TLS certificate, the institutions it admits (node-auth public key for Flower's
  SuperNode authentication, Ed25519 identity public key for secure aggregation), where state and
  checkpoints go, and timeouts.
* :class:`InstitutionDeployConfig` — one institution: its name, environment, data folder, DP budget, ledger,
  identity key, node-auth key, the CA it trusts, the registry of identity keys it trusts (received out of
  band, never from the coordinator), its SuperNode's own Runtime API certificate, and its node policy (what it
  accepts from the coordinator, the secure-aggregation setup included: its own, never the coordinator's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fedse_secure.config import (
    FEDERATED_MODES,
    NAME_PATTERN,
    ClientConfig,
    ConfigError,
    ExperimentConfig,
    format_validation_error,
    not_a_mapping,
    parse_config,
    read_yaml,
)
from fedse_secure.schema import StrictModel

_NAME = NAME_PATTERN


def _addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT; write e.g. 127.0.0.1:9443")
    return value


class TlsServerFiles(StrictModel):
    ca_cert: Path
    cert: Path
    key: Path


class SuperLinkSettings(StrictModel):
    # Where the SuperLink binds. One port serves the Fleet API (institutions), the Control API (`flwr run`)
    # and the Runtime API (the ServerApp process) in Flower 1.42.
    host: str = "127.0.0.1"
    port: int = Field(9443, ge=1, le=65535)
    # Addresses (or CIDR networks) allowed to use the Control and Runtime APIs on that port (register nodes,
    # start runs, the ServerApp). Institutions only ever need the Fleet API, which stays open to node-authed
    # SuperNodes. Flower 1.42 open source has no authentication on the Control API, hence this allowlist.
    control_allow: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"], min_length=1)

    @field_validator("control_allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network; write e.g. 127.0.0.1 or 10.0.0.0/24")
        return v


class AdmittedInstitution(StrictModel):
    name: str = Field(..., pattern=_NAME)
    # OpenSSH EC public key (node_auth.pub): registered with the SuperLink so this SuperNode may connect.
    node_auth_public_key: Path
    # PEM Ed25519 public key (identity_ed25519.pub): pins this institution's secure-aggregation signatures.
    identity_public_key: Path


class CoordinatorTimeouts(StrictModel):
    # How long round 1 waits for the admitted institutions to connect before starting with whoever is there.
    join_s: float = Field(120.0, gt=0)
    # The first stage of a round includes the institutions' local training (explore + fine-tune).
    train_s: float = Field(3600.0, gt=0)
    # Evaluation requests (each institution evaluates the global adapter on its own test tasks).
    evaluate_s: float = Field(1800.0, gt=0)
    # The other secure-aggregation stages use experiment.federation.secure_aggregation.stage_timeout_s.
    # Opt-in: once every institution asked in such a stage but one has answered (at least two did), the last one
    # is waited for at most max(straggler_s, the time the others took) more. In those stages every institution
    # does the same small step, so one that far behind its peers is most likely down, and a power cut is only
    # seen by Flower after two missed heartbeats (up to 60 s). A slow one that is cut rejoins in the next round
    # (its late answer shows it is alive). None: always the full stage timeout.
    straggler_s: float | None = Field(None, gt=0)


class CoordinatorDeployConfig(StrictModel):
    experiment: ExperimentConfig
    superlink: SuperLinkSettings = Field(default_factory=SuperLinkSettings)
    tls: TlsServerFiles
    institutions: list[AdmittedInstitution] = Field(..., min_length=1)
    # SuperLink database, Flower home, node registrations, checkpoints and logs.
    state_dir: Path
    # Where the run folder (metrics.jsonl, adapters/, summary.json) goes; default state_dir/run.
    run_dir: Path | None = None
    # The coordinator's Ed25519 identity (PEM, `fedse keys init` writes coordinator/identity_ed25519.pem): it signs
    # every global adapter it sends and publishes. None: adapters go unsigned, and institutions whose policy
    # requires signatures refuse them.
    identity_key: Path | None = None
    timeouts: CoordinatorTimeouts = Field(default_factory=CoordinatorTimeouts)
    # Fewer connected institutions than this and a round is not started (it waits up to timeouts.join_s).
    min_institutions: int | None = Field(None, ge=3)

    @model_validator(mode="after")
    def _check(self) -> CoordinatorDeployConfig:
        names = [i.name for i in self.institutions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"institutions {dup} are listed twice; list each once")
        clients = [c.name for c in self.experiment.clients]
        if sorted(names) != sorted(clients):
            raise ValueError(
                f"institutions {sorted(names)} differ from experiment.clients {sorted(clients)}; every experiment "
                "client needs an institutions entry (its keys) and vice versa"
            )
        fed = self.experiment.federation
        if fed.mode not in FEDERATED_MODES:
            raise ValueError(
                f"experiment.federation.mode {fed.mode!r} never aggregates; a deployment runs fedse or fedit (use "
                "`fedse simulate` for the local/centralized/pretrained baselines)"
            )
        backend = fed.backend()
        if not backend.capabilities.cross_machine:
            raise ValueError(
                f"experiment.federation.secure_aggregation {backend.name!r} is not available across machines (it "
                "declares itself single-site); choose a backend that can be deployed, such as masking"
            )
        if fed.simulate_dropouts:
            raise ValueError(
                "experiment.federation.simulate_dropouts is for `fedse simulate` only; in a deployment "
                "institutions drop out for real; remove it"
            )
        return self

    @property
    def address(self) -> str:
        return f"{self.superlink.host}:{self.superlink.port}"

    @property
    def resolved_run_dir(self) -> Path:
        return self.run_dir or (self.state_dir / "run")


class SuperLinkConnection(StrictModel):
    address: str = "127.0.0.1:9443"
    # The CA that signed the SuperLink's certificate.
    ca_cert: Path

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        return _addr(v)


class RuntimeApi(StrictModel):
    # The SuperNode's own Runtime API (SuperNode <-> ClientApp process), served with TLS on loopback.
    port: int = Field(9094, ge=1, le=65535)
    cert: Path
    key: Path


class PrivacyBudget(StrictModel):
    # This institution's own cap; a round that would exceed it is refused before training (fail closed). The
    # node policy's privacy.max_epsilon caps it too; the smaller cap wins.
    epsilon: float | None = Field(None, gt=0)


class InstitutionDeployConfig(StrictModel):
    name: str = Field(..., pattern=_NAME)
    env: str
    env_options: dict[str, Any] = Field(default_factory=dict)
    seed_demos: int = Field(16, ge=0)
    # The institution's private working folder: experience buffer, checkpoints of its own state.
    data_dir: Path
    # Hash-chained DP ledger; default data_dir/privacy_ledger.jsonl. Its audit log is audit.jsonl next to it.
    ledger_path: Path | None = None
    privacy: PrivacyBudget = Field(default_factory=PrivacyBudget)
    # The institution's node policy (configs/deploy/policy*.yaml): what it accepts from the coordinator and what
    # may leave it. None: the conservative defaults of fedse_secure.policy.NodePolicy (DP required, no statistic
    # leaves, signed adapters only).
    policy: Path | None = None
    # The coordinator's Ed25519 identity public key (PEM, coordinator/identity_ed25519.pub), received out of band:
    # global adapters are loaded only if its signature over them verifies.
    coordinator_public_key: Path | None = None
    superlink: SuperLinkConnection
    runtime_api: RuntimeApi
    identity_key: Path
    node_auth_key: Path
    # JSON {institution: hex Ed25519 public key} of every institution, obtained out of band.
    registry: Path
    # torch threads for this institution's worker; None keeps the experiment's model.num_threads.
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> InstitutionDeployConfig:
        ClientConfig(name=self.name, env=self.env, env_options=self.env_options, seed_demos=self.seed_demos)
        return self

    def client_config(self) -> ClientConfig:
        return ClientConfig(name=self.name, env=self.env, env_options=self.env_options, seed_demos=self.seed_demos)

    @property
    def resolved_ledger_path(self) -> Path:
        return self.ledger_path or (self.data_dir / "privacy_ledger.jsonl")

    @property
    def audit_path(self) -> Path:
        from fedse_secure.audit import audit_path_for

        return audit_path_for(self.resolved_ledger_path)

    @property
    def work_dir(self) -> Path:
        # Sockets, the worker's authentication secret and logs; inside data_dir so one folder is the institution.
        return self.data_dir / ".fedse-node"


# -- loading -------------------------------------------------------------------------------------------------
def _read_yaml(path: Path, example: str = "configs/deploy/coordinator.yaml") -> dict[str, Any]:
    data = read_yaml(path, example=example)
    if not isinstance(data, dict):
        raise ConfigError(not_a_mapping(str(path), data, f"start from {example}"))
    return data


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Make every Path field absolute relative to ``base`` (recursively), in place."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(model, name, (base / value).resolve())
        elif isinstance(value, BaseModel) and not isinstance(value, ExperimentConfig):
            _resolve_paths(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _resolve_paths(item, base)


def load_coordinator_config(path: str | Path) -> CoordinatorDeployConfig:
    path = Path(path).resolve()
    data = _read_yaml(path)
    exp = data.get("experiment")
    if isinstance(exp, str):
        exp_path = (path.parent / exp).resolve()
        data["experiment"] = parse_config(_read_yaml(exp_path, example="configs/smoke.yaml"), source=str(exp_path))
    elif isinstance(exp, dict):
        data["experiment"] = parse_config(exp, source=f"{path}: experiment")
    try:
        cfg = CoordinatorDeployConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    _resolve_paths(cfg, path.parent)
    return cfg


def load_institution_config(path: str | Path) -> InstitutionDeployConfig:
    path = Path(path).resolve()
    data = _read_yaml(path, example="configs/deploy/institution-maze-clinic.yaml")
    try:
        cfg = InstitutionDeployConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    _resolve_paths(cfg, path.parent)
    return cfg
