"""Import a user's own data (parquet, CSV, JSON files or a JDBC table) into a Delta input table.

One import is one Delta commit whose ``userMetadata`` carries its lineage: the source URI, format,
file count, bytes, schema and an import id. Everything that can be checked before writing is checked
first (the name, the source, the format, the schema against the table on append), so bad input
writes nothing; a write that fails after Delta started it leaves no folder behind for a table that
did not exist before (an empty ``_delta_log`` would break every later reader of the name).
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from lakeray.errors import ConfigError, DataQualityError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from lakeray.config import Settings

__all__ = ["FORMATS", "ImportPlan", "ImportResult", "plan_import", "import_table"]

FORMATS = ("parquet", "csv", "json", "jdbc")
MODES = ("overwrite", "append")

# File name endings → format; a compression suffix (.gz, ...) is looked through.
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json",
               ".jsonl": "json", ".ndjson": "json"}
_COMPRESSION = {".gz", ".bz2", ".zst", ".lz4", ".snappy", ".deflate", ".xz"}
# Reader defaults (the user's --option wins): typed columns, and a malformed row refuses the import
# instead of turning into nulls. JSON infers timestamps only when asked (inferTimestamp defaults to
# false in Spark); an import wants typed event times.
_DEFAULT_OPTIONS = {"csv": {"header": "true", "inferSchema": "true", "mode": "FAILFAST"},
                    "json": {"inferTimestamp": "true", "mode": "FAILFAST"}, "parquet": {}, "jdbc": {}}
# Delta refuses these characters in column names (without column mapping).
_BAD_COLUMN_CHARS = re.compile(r"[ ,;{}()\n\t=]")
_SECRET_OPTION = re.compile(r"pass|secret|token|credential|key", re.IGNORECASE)
# Widening casts an append applies to a source column narrower than the table's (lossless).
_WIDENS = {("tinyint", "smallint"), ("tinyint", "int"), ("tinyint", "bigint"), ("smallint", "int"),
           ("smallint", "bigint"), ("int", "bigint"), ("tinyint", "double"), ("smallint", "double"),
           ("int", "double"), ("float", "double")}


@dataclass(frozen=True)
class ImportPlan:
    """What an import will read and write, checked without Spark."""

    table: str
    path: str
    source: str          # as given (a path, a URI or a JDBC URL)
    source_uri: str      # absolute URI recorded in the lineage (JDBC: password removed)
    format: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)
    local_files: tuple[str, ...] | None = None  # the data files of a local source; None for URIs and JDBC


@dataclass(frozen=True)
class ImportResult:
    """One committed import: the table version it made and what it read."""

    table: str
    version: int
    rows: int
    files: int
    bytes: int
    source: str
    format: str = ""
    mode: str = ""
    schema: str = ""
    import_id: str = ""
    seconds: float = 0.0


def _is_uri(source: str) -> bool:
    return "://" in source or source.startswith("file:")


def _local_path(source: str) -> str | None:
    """The filesystem path of a local source (plain path or file: URI); None for other URIs."""
    if source.startswith("file:"):
        return unquote(urlparse(source).path)
    return None if _is_uri(source) else os.path.abspath(os.path.expanduser(source))


def _format_of(name: str) -> str | None:
    suffixes = [s.lower() for s in Path(name).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _hidden(part: str) -> bool:
    return part.startswith(("_", "."))  # Spark skips these (_SUCCESS, .crc files, _temporary/)


def _data_files(path: str) -> list[str]:
    """The files Spark would read under a local file, folder or glob (hidden ones skipped)."""
    if glob.has_magic(path) and not os.path.exists(path):
        matches = sorted(glob.glob(path))
        out: list[str] = []
        for match in matches:
            out.extend(_data_files(match))
        return out
    if os.path.isfile(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        out.extend(os.path.join(root, f) for f in sorted(files) if not _hidden(f))
    return out


def _parse_options(options: dict[str, str] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (options or {}).items()}


def _redacted(options: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if _SECRET_OPTION.search(k) else v) for k, v in options.items()}


def _redact_url(url: str) -> str:
    return re.sub(r"(?i)((?:password|pwd|secret|token)=)[^;&]*", r"\1***", url)


def plan_import(settings: Settings, name: str, source: str, format: str | None = None,
                mode: str = "overwrite", options: dict[str, str] | None = None) -> ImportPlan:
    """Check an import without Spark: the name, the mode, the source and its format.

    Raises ConfigError (the command's arguments are wrong: exit 2) naming the problem and the fix.
    """
    path = settings.table_path(name)  # ConfigError for an invalid name
    if mode not in MODES:
        raise ConfigError(f"import mode {mode!r} is not one of {', '.join(MODES)}", "pass --mode overwrite or append")
    if format is not None and format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(FORMATS)}",
                          "pass --format parquet, csv, json or jdbc")
    _refuse_managed_names(settings, name)
    user_options = _parse_options(options)
    if source.startswith("jdbc:") or format == "jdbc":
        if not source.startswith("jdbc:"):
            raise ConfigError(f"--format jdbc needs a JDBC URL as SOURCE, not {source!r}",
                              "pass e.g. jdbc:postgresql://host:5432/db --option dbtable=schema.table")
        if format not in (None, "jdbc"):
            raise ConfigError(f"{_redact_url(source)} is a JDBC URL but --format is {format}",
                              "pass --format jdbc (or leave --format out)")
        if not {"dbtable", "query"} & set(user_options):
            raise ConfigError(f"importing from {_redact_url(source)} needs the table to read",
                              "pass --option dbtable=schema.table (or --option query='SELECT ...')")
        return ImportPlan(name, path, source, _redact_url(source), "jdbc", mode, user_options)

    local = _local_path(source)
    if local is None:  # an object-store URI: Spark lists it; infer from its own name only
        fmt = format or _format_of(urlparse(source).path)
        if fmt is None:
            raise ConfigError(f"cannot tell the format of {source} from its name",
                              "pass --format parquet, csv or json")
        return ImportPlan(name, path, source, source, fmt, mode, {**_DEFAULT_OPTIONS[fmt], **user_options})

    if not os.path.exists(local) and not (glob.has_magic(local) and glob.glob(local)):
        raise ConfigError(f"source {source} does not exist", "check the path (relative paths start at the "
                          "current folder)")
    if os.path.isdir(os.path.join(local, "_delta_log")):
        raise ConfigError(f"source {source} is a Delta table: its files include replaced versions",
                          "read it with Spark's Delta reader instead of importing its files")
    files = _data_files(local)
    if not files:
        raise ConfigError(f"source {source} holds no data files (hidden _* and .* files do not count)",
                          "point SOURCE at a folder or file with the data")
    by_format: dict[str, int] = {}
    for f in files:
        known = _format_of(f)
        if known is not None:
            by_format[known] = by_format.get(known, 0) + 1
    if format is None:
        if len(by_format) != 1:
            found = ", ".join(f"{n} {k}" for k, n in sorted(by_format.items())) or "no known file extension"
            raise ConfigError(f"cannot infer the format of {source} ({found})",
                              "pass --format parquet, csv or json" + (" or import each format from its own folder"
                                                                      if len(by_format) > 1 else ""))
        fmt = next(iter(by_format))
    else:
        fmt = format
        others = {k: n for k, n in by_format.items() if k != fmt}
        if others:
            found = ", ".join(f"{n} {k} file(s)" for k, n in sorted(others.items()))
            raise DataQualityError(f"--format {fmt} does not match {source}: it holds {found}",
                                   f"pass the files' format with --format, or point SOURCE at the {fmt} files only")
    defaults = dict(_DEFAULT_OPTIONS[fmt])
    if fmt == "csv" and all(f.lower().removesuffix(".gz").endswith(".tsv") for f in files):
        defaults["sep"] = "\t"
    uri = Path(local).as_uri() if not glob.has_magic(local) else "file://" + local
    return ImportPlan(name, path, source, uri, fmt, mode, {**defaults, **user_options}, tuple(files))


def _refuse_managed_names(settings: Settings, name: str) -> None:
    """An import must not overwrite a table lakeray writes itself (its lineage would lie)."""
    from lakeray.features.runner import discover_jobs
    from lakeray import storage
    from lakeray.features.training_sets import manifest_dir

    try:
        job = discover_jobs(settings).get(name)
    except ConfigError:  # no (or a broken) feature folder: nothing there to protect
        job = None
    if job is not None:
        raise ConfigError(f"{name!r} is the output of feature job {name!r} ({job.source})",
                          "import into another table name (e.g. the job's input)")
    if storage.is_dir(manifest_dir(settings, name)):
        raise ConfigError(f"{name!r} is a training set (it has manifests)", "import into another table name")


def _spark_message(exc: BaseException) -> str:
    """The first line of a Spark/JVM error, without py4j's call prefix or the stack trace."""
    java = getattr(exc, "java_exception", None)
    text = None
    try:
        # The root cause names the problem (`Malformed CSV record: 3,4,5`); the outer ones name the task.
        for _ in range(16):
            if java is None:
                break
            message = java.getMessage()
            text = str(message) if message else text
            java = java.getCause()
    except Exception:  # the JVM may be gone
        pass
    text = text or str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("\tat ", "at "))]
    line = next((x for x in lines if not x.startswith("An error occurred while calling")), text)
    line = line.removeprefix(": ")
    return line if len(line) <= 300 else line[:297] + "..."


def _spark_errors() -> tuple[type[BaseException], ...]:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JJavaError)


def _read(spark: SparkSession, plan: ImportPlan) -> DataFrame:
    reader = spark.read.format(plan.format).options(**plan.options)
    if plan.format == "jdbc":
        return reader.option("url", plan.source).load()
    # A folder is given to Spark as a folder (partition discovery, hidden files skipped), a glob as a glob.
    local = _local_path(plan.source)
    return reader.load(local if local is not None else plan.source)


def _unreadable(plan: ImportPlan, why: str) -> DataQualityError:
    fix = {"csv": "check the delimiter/header (--option sep=';', --option header=false) or pass the right --format",
           "json": "JSON Lines is one object per line; for one JSON document per file pass --option multiLine=true, "
                   "or pass the right --format",
           "parquet": "pass the files' real format with --format",
           "jdbc": "check the URL, the driver jar on spark.jars and --option dbtable/user/password"}[plan.format]
    if "NANOS" in why:
        fix = "write the parquet with microsecond timestamps (pandas: to_parquet(..., coerce_timestamps='us'))"
    return DataQualityError(f"cannot import {plan.source_uri} as {plan.format}: {why}; nothing was written", fix)


def _check_readable(plan: ImportPlan, df: DataFrame) -> None:
    if not df.columns:
        raise _unreadable(plan, "no columns (empty files?)")
    if "_corrupt_record" in df.columns and "columnNameOfCorruptRecord" not in plan.options:
        raise _unreadable(plan, "some records do not parse")
    if plan.format in ("csv", "json") and plan.local_files:
        for f in plan.local_files:
            with open(f, "rb") as handle:
                if handle.read(4) == b"PAR1":
                    raise _unreadable(plan, f"{f} is a parquet file")
    bad = [c for c in df.columns if _BAD_COLUMN_CHARS.search(c)]
    if bad:
        raise DataQualityError(f"cannot import {plan.source_uri}: column name(s) {bad} contain characters Delta "
                               "refuses (space , ; { } ( ) = tab newline); nothing was written",
                               "rename the columns in the source (CSV: the header line)")


def _aligned(table: str, existing: Any, df: DataFrame) -> DataFrame:
    """``df`` in the table's column order, narrower numbers widened; refuse any other difference."""
    old = {f.name: f.dataType.simpleString() for f in existing.fields}
    new = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    missing = [c for c in old if c not in new]
    extra = [c for c in new if c not in old]
    retyped = [f"{c} ({new[c]}, table has {old[c]})" for c in old
               if c in new and new[c] != old[c] and (new[c], old[c]) not in _WIDENS]
    if missing or extra or retyped:
        parts = ([f"missing column(s) {missing}"] if missing else []) + \
                ([f"new column(s) {extra}"] if extra else []) + ([f"other type(s): {', '.join(retyped)}"]
                                                                  if retyped else [])
        raise DataQualityError(f"cannot append to {table}: the source's schema conflicts with the table: "
                               f"{'; '.join(parts)}; nothing was written",
                               "make the source match the table, or replace the table with --mode overwrite")
    from pyspark.sql import functions as F

    return df.select(*[F.col(f"`{c}`").cast(old[c]).alias(c) if new[c] != old[c] else F.col(f"`{c}`")
                       for c in old])


def _file_sizes(spark: SparkSession, uris: list[str]) -> int:
    """Total bytes of the input files: os.stat for local files, Hadoop's FileSystem for the rest."""
    total = 0
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for uri in uris:
        local = _local_path(uri)
        if local is not None and os.path.exists(local):
            total += os.stat(local).st_size
        else:
            hpath = jvm.org.apache.hadoop.fs.Path(uri)
            total += int(hpath.getFileSystem(conf).getFileStatus(hpath).getLen())
    return total


def import_table(spark: SparkSession, settings: Settings, name: str, source: str, format: str | None = None,
                 mode: str = "overwrite", options: dict[str, str] | None = None) -> ImportResult:
    """Read ``source`` with Spark's reader into the Delta table ``name``: one commit, lineage in it.

    ``format`` defaults to the one the file extensions name (an error when they name none or several).
    ``append`` refuses a source whose columns differ from the table's (names the columns); numbers
    narrower than the table's column (int into bigint or double) are widened. Bad input writes nothing.
    """
    from lakeray.lakehouse.delta import table_exists, table_history, read_table, write_table

    started = time.perf_counter()
    plan = plan_import(settings, name, source, format, mode, options)
    spark_errors = _spark_errors()
    try:
        df = _read(spark, plan)
        _check_readable(plan, df)
        input_files = list(df.inputFiles()) if plan.format != "jdbc" else []
    except spark_errors as exc:
        raise _unreadable(plan, _spark_message(exc)) from None
    exists = table_exists(spark, plan.path)
    if exists and mode == "append":
        df = _aligned(name, read_table(spark, plan.path).schema, df)
    import_id = uuid.uuid4().hex[:16]
    files, size = len(input_files), _file_sizes(spark, input_files)
    schema = df.schema.simpleString()
    lineage = {"lakeray_import_id": import_id, "source": plan.source_uri, "format": plan.format, "files": files,
               "bytes": size, "schema": schema, "mode": mode, "options": _redacted(plan.options)}
    try:  # a write that fails part-way removes the folder it created (write_table)
        version = write_table(df, plan.path, mode=mode, user_metadata=json.dumps(lineage))
    except spark_errors as exc:
        raise _unreadable(plan, _spark_message(exc)) from None
    commit = next((c for c in table_history(spark, plan.path, 16) if c["version"] == version), None)
    rows = commit["rows"] if commit and commit["rows"] is not None else read_table(spark, plan.path, version).count()
    return ImportResult(name, version, int(rows), files, size, plan.source_uri, plan.format, mode, schema, import_id,
                        time.perf_counter() - started)

