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

import ast
import datetime as dt
import hashlib
import importlib.util
import re
import sys
import zoneinfo
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lakeray.errors import ConfigError
from lakeray.lakehouse.quality import Expectation

__all__ = ["FeatureJob", "feature_job", "check_cron", "check_timezone"]

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
    # Scheduling (lakeray.scheduler turns these into Dagster schedules and retry policies).
    schedule: str | None = Field(None, description="Cron expression (5 fields, or @hourly/@daily/@weekly/"
                                 "@monthly) on which the scheduler runs the job; none: run by hand only.")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    retries: int = Field(0, ge=0, le=20, description="Retries of a failed scheduled run (exponential backoff).")
    retry_delay_s: float = Field(30.0, ge=0, description="Wait before the first retry; doubles each retry.")
    timeout_s: float | None = Field(None, gt=0, description="Longest a scheduled run may take before the "
                                    "scheduler cancels it.")
    catchup: Literal["all", "latest"] = Field("latest", description="Intervals missed while the scheduler "
                                              "was down: run all of them, or only the latest.")
    partitions_start: str | None = Field(None, description="First day (ISO date) of a partitions job's "
                                         "daily partitions in the scheduler (needed to schedule it).")
    fn: Callable[..., Any] = Field(description="The PySpark function.", exclude=True)
    source: str = Field("", description="File the job was loaded from.")
    project_roots: tuple[str, ...] = Field((), exclude=True, description="Folders whose modules count as "
                                           "the project's code (feature_paths, the project folder).")

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
        """Hash of what the job's result depends on: two runs with the same hash ran the same code.

        Covers the job file, every project module it imports (transitively, from their import
        statements; a module counts when its file lies under the job's folder or ``project_roots`` and
        outside installed packages), lakeray's version and the runner/write/join code it goes through.
        Backfill skips a chunk only when this is unchanged, so a helper edit reruns stale chunks.
        """
        if not self.source or not Path(self.source).is_file():
            return "unknown"
        source = Path(self.source).resolve()
        digest = hashlib.sha256(source.read_bytes())
        roots = [source.parent, *(Path(r).resolve() for r in self.project_roots)]
        for name, file in sorted(_project_imports(source, roots).items()):
            digest.update(f"\0{name}\0".encode())
            digest.update(file.read_bytes())
        digest.update(_lakeray_fingerprint().encode())
        return digest.hexdigest()[:12]

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        return check_timezone(value)

    @field_validator("partitions_start")
    @classmethod
    def _valid_start(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an ISO date (e.g. 2026-01-01)") from None
        return value

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


# lakeray's own code that turns a job's output into committed rows (and the point-in-time join).
_LAKERAY_CODE = ("features/runner.py", "lakehouse/delta.py", "lakehouse/pit.py")


@lru_cache(maxsize=1)
def _lakeray_fingerprint() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = [version("lakeray")]
    except PackageNotFoundError:  # a source checkout that was never installed
        parts = ["unknown"]
    package = Path(__file__).resolve().parents[1]
    parts += [hashlib.sha256((package / rel).read_bytes()).hexdigest() for rel in _LAKERAY_CODE
              if (package / rel).is_file()]
    return ":".join(parts)


def _imported_names(file: Path) -> Iterator[str]:
    """Absolute module names a Python file imports (top level and inside functions), with their parents."""
    try:
        tree = ast.parse(file.read_bytes(), str(file))
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            parts = name.split(".")
            yield from (".".join(parts[: i + 1]) for i in range(len(parts)))


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file is None and module is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    return Path(file).resolve() if file and file.endswith(".py") else None


def _project_imports(source: Path, roots: list[Path]) -> dict[str, Path]:
    """Project modules ``source`` imports, transitively: name → file."""
    installed = {Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}

    def local(file: Path) -> bool:
        if "site-packages" in file.parts or "dist-packages" in file.parts:
            return False
        if any(file.is_relative_to(prefix) for prefix in installed):
            return False
        return any(file.is_relative_to(root) for root in roots)

    found: dict[str, Path] = {}
    pending = [source]
    while pending:
        for name in _imported_names(pending.pop()):
            if name in found or name == "lakeray" or name.startswith("lakeray."):
                continue  # lakeray itself is covered by its version and code fingerprint
            file = _module_file(name)
            if file is not None and file != source and local(file):
                found[name] = file
                pending.append(file)
    return found


# Cron fields: (name, lowest, highest, names). Checked here, without the scheduler, so a bad
# expression fails when the job is declared, not when the daemon first evaluates it.
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
                ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
_CRON_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}
_CRON_ITEM = re.compile(r"(\*|(\w+)(?:-(\w+))?)(?:/(\d+))?")


def check_cron(expression: str) -> str:
    """``expression`` as a 5-field cron string (aliases expanded); ValueError saying which field is wrong."""
    text = _CRON_ALIASES.get(expression.strip().lower(), expression.strip())
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r} must have 5 fields (minute hour day-of-month month day-of-week) "
                         f"or be one of {', '.join(_CRON_ALIASES)}")
    for value, (what, low, high, names) in zip(fields, _CRON_FIELDS):
        for item in value.split(","):
            match = _CRON_ITEM.fullmatch(item.lower())
            bounds = [match.group(2), match.group(3)] if match else []
            try:
                numbers = [names.index(b) + (low if names and low else 0) if b in names else int(b)
                           for b in bounds if b is not None]
            except ValueError:
                numbers = [-1]
            step = match.group(4) if match else None
            if not match or any(not low <= n <= high for n in numbers) or (step is not None and int(step) < 1) \
                    or (len(numbers) == 2 and numbers[0] > numbers[1]):
                raise ValueError(f"cron {expression!r}: {what} field {value!r} is not valid ({low}-{high})")
    return text


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA time zone; ValueError otherwise."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as UTC or Europe/Berlin)") from None
    return name


def feature_job(**declaration: Any) -> Callable[[Callable[..., Any]], FeatureJob]:
    """Decorator that turns a PySpark function into a :class:`FeatureJob` (validated at import).

    An invalid declaration raises a ConfigError naming the job and each field (``feature job 'x':
    schedule: cron '61 * * * *': minute field '61' is not valid (0-59)``).
    """

    def wrap(fn: Callable[..., Any]) -> FeatureJob:
        try:
            return FeatureJob(fn=fn, **declaration)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'declaration'}: "
                               f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
            name = declaration.get("name", getattr(fn, "__name__", "?"))
            raise ConfigError(f"feature job {name!r}: {fields}", "fix the @feature_job declaration") from None

    return wrap
