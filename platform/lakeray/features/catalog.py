"""Every Delta table under the storage root, with what kind of table it is; read from the Delta logs
with delta-rs (no JVM), so listing is quick."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["TableInfo", "list_tables", "commit_kind"]


@dataclass(frozen=True)
class TableInfo:
    name: str
    kind: str  # input | feature | training set | not a Delta table
    version: int | None
    rows: int | None
    last_commit: dt.datetime | None
    path: str


def commit_kind(run: dict[str, Any]) -> str:
    """What wrote a commit, from lakeray's userMetadata: import, feature run, training set, or other."""
    if "lakeray_import_id" in run:
        return "import"
    if "training_set" in run:
        return "training set"
    if "lakeray_run_id" in run:
        return "feature run"
    return "other"


def list_tables(settings: Settings) -> list[TableInfo]:
    """Every table folder under ``<root>/tables/``, sorted by name.

    kind: ``feature`` when a declared feature job writes it, ``training set`` when it has manifests,
    else ``input``; a folder that is not a readable Delta table is listed as such (e.g. what a failed
    first write left behind), so it can be found and removed.
    """
    from deltalake import DeltaTable

    from lakeray.features.runner import discover_jobs
    from lakeray.features.training_sets import manifest_dir
    from lakeray.lakehouse.delta import table_rows

    root = settings.storage_root
    if "://" in root:
        raise ConfigError(f"listing tables under {root} is not supported yet (local storage roots only)",
                          "use `lakeray tables history NAME` for one table")
    try:
        jobs = set(discover_jobs(settings))
    except ConfigError:  # no feature folder (a project with imported data only): no feature tables
        jobs = set()
    folder = Path(root, "tables")
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        name = path.name
        kind = "feature" if name in jobs else "training set" if os.path.isdir(manifest_dir(settings, name)) else "input"
        try:
            table = DeltaTable(str(path))
            version = table.version()
            stamp = table.history(1)[0].get("timestamp")
            when = dt.datetime.fromtimestamp(stamp / 1000, dt.timezone.utc) if stamp is not None else None
            rows = table_rows(str(path), version)
        except Exception:  # delta-rs raises several types for a missing or empty log
            out.append(TableInfo(name, "not a Delta table", None, None, None, str(path)))
            continue
        out.append(TableInfo(name, kind, version, rows, when, str(path)))
    return out
