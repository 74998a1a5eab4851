"""The base of every config section and the config error: imported by ``vlp.config``, by the objectives' own
``Config`` classes and by the data format, so none of them has to import ``vlp.config``."""
from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file in the message."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors (a typo is never silently ignored); values are validated on
    assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """``key: null`` (``train.steps=null``) on a key that cannot be null means its default, as if unset."""
        if isinstance(data, dict):
            nullable = {n for n, f in cls.model_fields.items()
                        if f.annotation is None or type(None) in typing.get_args(f.annotation)}
            data = {k: v for k, v in data.items() if v is not None or k in nullable or k not in cls.model_fields}
        return data
