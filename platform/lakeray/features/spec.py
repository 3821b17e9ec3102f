"""What a feature job is: a plain PySpark function plus a small declaration.

```python
@feature_job(name="customer_aggregates", inputs=["transactions"], entity_keys=["customer_id"],
             event_time="event_time", description="…", owner="risk-ml")
def customer_aggregates(transactions: DataFrame) -> DataFrame: ...
```

The function receives one DataFrame per declared input table (same order, as keyword arguments named
after the tables) and returns the feature DataFrame. It stays a plain function: it can be unit-tested
on a hand-built DataFrame without lakeray's runner.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["FeatureJob", "feature_job"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FeatureJob(BaseModel):
    """A declared feature job; ``fn`` computes the output table ``name`` from ``inputs``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    name: str = Field(description="Output Delta table name (letters, digits, underscores).")
    inputs: list[str] = Field(default_factory=list, description="Input table names, passed to fn by name.")
    entity_keys: list[str] = Field(default_factory=list, description="Columns that identify an entity.")
    event_time: str | None = Field(None, description="Event-time column of the output.")
    description: str = Field("", description="What the table holds, for `lakeray features list`.")
    owner: str = Field("", description="Team or person to ask about the table.")
    fn: Callable[..., Any] = Field(description="The PySpark function.", exclude=True)
    source: str = Field("", description="File the job was loaded from.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be letters, digits and underscores, starting with a letter")
        return value

    @field_validator("inputs")
    @classmethod
    def _valid_inputs(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"input {name!r} must be a table name (letters, digits, underscores)")
        return value


def feature_job(**declaration: Any) -> Callable[[Callable[..., Any]], FeatureJob]:
    """Decorator that turns a PySpark function into a :class:`FeatureJob` (validated at import)."""

    def wrap(fn: Callable[..., Any]) -> FeatureJob:
        return FeatureJob(fn=fn, **declaration)

    return wrap
