"""One rendering of a Delta table's history (a rich table, or JSON for scripts), shared by
`lakeray features history` and `lakeray tables history`."""

from __future__ import annotations

from typing import Any

import click


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def lineage_cells(run: dict[str, Any]) -> tuple[str, str, str]:
    """(run id, inputs, code version) of a commit: what it read, from lakeray's userMetadata."""
    from lakeray.features.catalog import commit_kind

    kind = commit_kind(run)
    if kind == "import":
        source = f"{run.get('source', '')} ({run.get('format', '?')}, {run.get('files', 0)} file(s), " \
                 f"{_size(int(run.get('bytes') or 0))})"
        return run["lakeray_import_id"], source, ""
    inputs = ", ".join(f"{t}@{v}" for t, v in (run.get("inputs") or {}).items())
    if kind == "training set":
        return run.get("build_id", ""), inputs, ""
    return run.get("lakeray_run_id", ""), inputs, run.get("code_version", "")


def print_history(table: str, commits: list[dict[str, Any]], as_json: bool = False) -> None:
    """Print ``table_history`` commits, newest first: a table, or one JSON array."""
    if as_json:
        import json

        from lakeray.features.catalog import commit_kind

        click.echo(json.dumps([{"version": c["version"], "timestamp": c["timestamp"].isoformat(),
                                "operation": c["operation"], "rows": c["rows"], "kind": commit_kind(c["run"]),
                                "lineage": c["run"]} for c in commits], default=str))
        return
    from rich.console import Console
    from rich.table import Table

    out = Table("version", "timestamp", "operation", "rows", "run id", "inputs", "code", title=table)
    for c in commits:
        out.add_row(str(c["version"]), str(c["timestamp"]), c["operation"],
                    "" if c["rows"] is None else str(c["rows"]), *lineage_cells(c["run"]))
    Console().print(out)


def show_history(settings: Any, table: str, limit: int, as_json: bool = False) -> None:
    """Read TABLE's newest ``limit`` commits (Spark) and print them: `features history` and
    `tables history` are this one command under two groups."""
    from lakeray.lakehouse.delta import table_history
    from lakeray.lakehouse.spark import spark_session

    with spark_session(settings) as spark:
        commits = table_history(spark, settings.table_path(table), limit)
    print_history(table, commits, as_json)
