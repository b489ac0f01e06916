"""What every config section shares: the error it raises and the strict model base (unknown keys are errors)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from transfuse.errors import TransfuseError


class ConfigError(TransfuseError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
