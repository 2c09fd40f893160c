"""The base of every typed settings model (experiment configs, component settings, deployment configs).

Unknown keys are errors (a typo must never be silently ignored), assignments are validated, and each field
carries its documentation as ``Field(description=...)``, which ``fedse config explain`` prints. Numbers must
be finite (an infinite learning rate or noise would only fail hours later, after the model loaded) and a
number is never given as ``true``/``false`` (``rounds: true`` is a typo, not one round).
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _admits(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    return any(_admits(a, kind) for a in typing.get_args(annotation))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is None or not isinstance(value, bool) or _admits(field.annotation, bool):
                    continue
                if _admits(field.annotation, int) or _admits(field.annotation, float):
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}; write a number")
        return data
