"""The threat list (threats.yaml) and the runner behind `fedse threats verify`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from fedse_threat_model.harness import CHECKS, CheckResult, ProtectionSettings, run_check


@dataclass(frozen=True)
class Threat:
    id: str
    title: str
    adversary: str
    assets: list[str]
    wants: str
    mitigations: list[str]
    fails_without: list[str]
    residual: str
    check: str
    tests: list[str] = field(default_factory=list)


def _text(name: str) -> str:
    return resources.files("fedse_threat_model").joinpath(name).read_text(encoding="utf-8")


def load_threats() -> list[Threat]:
    data = yaml.safe_load(_text("threats.yaml"))
    return [Threat(**{**t, "residual": " ".join(str(t["residual"]).split())}) for t in data["threats"]]


def threats_markdown() -> str:
    return _text("THREATS.md")


def select(threats: list[Threat], only: list[str] | None) -> list[Threat]:
    if not only:
        return threats
    wanted = {o.upper() for o in only}
    unknown = sorted(wanted - {t.id for t in threats})
    if unknown:
        raise ValueError(f"unknown threat id(s) {unknown}; `fedse threats list` shows T1..T{len(threats)}")
    return [t for t in threats if t.id in wanted]


@dataclass
class Row:
    threat: Threat
    result: CheckResult

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.threat.id, "title": self.threat.title, "check": self.threat.check,
                "passed": self.result.passed, "summary": self.result.summary, "evidence": self.result.evidence,
                "disabled": self.result.disabled, "seconds": round(self.result.seconds, 2),
                "tests": self.threat.tests}


def verify(settings: ProtectionSettings | None = None, only: list[str] | None = None,
           on_row=None) -> list[Row]:
    settings = settings or ProtectionSettings()
    rows = []
    for threat in select(load_threats(), only):
        if threat.check not in CHECKS:
            raise KeyError(f"{threat.id}: check {threat.check!r} is not defined in fedse_threat_model.checks")
        row = Row(threat, run_check(threat.check, settings))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
