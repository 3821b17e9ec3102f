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
import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
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


def feature_job(**declaration: Any) -> Callable[[Callable[..., Any]], FeatureJob]:
    """Decorator that turns a PySpark function into a :class:`FeatureJob` (validated at import)."""

    def wrap(fn: Callable[..., Any]) -> FeatureJob:
        return FeatureJob(fn=fn, **declaration)

    return wrap
