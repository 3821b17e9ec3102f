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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lakeray.lakehouse.quality import Expectation

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
    write_mode: Literal["overwrite", "partitions", "merge"] = Field(
        "overwrite",
        description="overwrite: full refresh. partitions: replace only the partitions of the run's date "
        "range (replaceWhere on partition_by[0]). merge: upsert by entity_keys (+ event_time).",
    )
    partition_by: list[str] = Field(default_factory=list, description="Partition columns of the table.")
    expectations: list[Expectation] = Field(default_factory=list, description="Quality gate, checked "
                                            "on the output before commit.")
    allow_column_changes: bool = Field(False, description="Allow dropping or retyping existing columns "
                                       "(added columns are always allowed).")
    fn: Callable[..., Any] = Field(description="The PySpark function.", exclude=True)
    source: str = Field("", description="File the job was loaded from.")

    @model_validator(mode="after")
    def _mode_needs(self) -> "FeatureJob":
        if self.write_mode == "partitions" and not self.partition_by:
            raise ValueError("write_mode 'partitions' needs partition_by (a date column)")
        if self.write_mode == "merge" and not self.entity_keys:
            raise ValueError("write_mode 'merge' needs entity_keys")
        return self

    @property
    def merge_keys(self) -> list[str]:
        return [*self.entity_keys, *([self.event_time] if self.event_time else [])]

    @property
    def code_version(self) -> str:
        """Content hash of the job's source file: two runs with the same hash ran the same code."""
        import hashlib
        from pathlib import Path

        if not self.source or not Path(self.source).is_file():
            return "unknown"
        return hashlib.sha256(Path(self.source).read_bytes()).hexdigest()[:12]

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
