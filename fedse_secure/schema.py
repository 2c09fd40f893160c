"""The base of every typed settings model (experiment configs, component settings, deployment configs).

Unknown keys are errors (a typo must never be silently ignored), assignments are validated, and each field
carries its documentation as ``Field(description=...)``, which ``fedse config explain`` prints.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
