"""Delta → training worker ingest: each worker reads its own share of one pinned table version.

The driver only plans (:func:`table_shards`: the version's data files, from the Delta log, balanced
by bytes); every worker then reads its shard itself (:func:`read_shard`), so no row passes through
the driver. One reader serves every kind of table: the shard's parquet files are read with a pyarrow
dataset (the fast path DESIGN.md measured at ~5× ``ray.data.read_delta``) and the Delta log supplies
what the files do not hold:

- partition columns: constant per file, from the add action's partition values;
- column mapping (``name`` mode): the files hold physical names (``col-<uuid>``), renamed to the
  logical ones; ``id`` mode and nested fields under column mapping are refused (ConfigError);
- deletion vectors: each file's keep mask (``DeltaTable.deletion_vectors()``) filters its rows.

deltalake's own pyarrow readers are not used: in deltalake 1.6.6 ``to_pyarrow_dataset`` /
``to_pyarrow_table`` refuse tables with deletion vectors and, on a column-mapped table without
reader features (reader version 2), silently return every value as null; ``DeltaTable.scan`` handles
both but cannot be restricted to some files and its row order is not guaranteed, so it cannot be
sliced between ranks either.

When the version has fewer files than workers, some shard is empty and every rank falls back to
reading the whole version (files in path order, rows in file order) and keeping its contiguous
``1/world`` of the rows: the same rows on every rank, so the ranks' union is the version exactly once.

Ray Data streaming (``ray.data.read_delta``) for data larger than the workers' memory is chosen by
:func:`should_stream`; the streaming reader itself is not part of this module (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["table_shards", "read_shard", "iter_shard", "read_version", "should_stream", "DECODED_EXPANSION"]

# Arrow in memory is ~3–4× the compressed parquet on disk (DESIGN.md, the duckdb size check): the
# upper end, so the rule errs towards streaming.
DECODED_EXPANSION = 4


def should_stream(total_bytes: int, world: int, worker_memory_bytes: int) -> bool:
    """True when a worker's share would not fit comfortably in its memory: the shard's decoded size
    estimate (``total_bytes / world`` of parquet × :data:`DECODED_EXPANSION`) above half the worker's
    memory (the other half is the trainer's: a DMatrix or tensors are another copy of the rows)."""
    if world < 1 or worker_memory_bytes <= 0:
        raise ValueError(f"world must be >= 1 and worker memory > 0, got {world}, {worker_memory_bytes}")
    return total_bytes * DECODED_EXPANSION / world > worker_memory_bytes / 2


def table_shards(path: str, version: int, world: int) -> list[list[str]]:
    """The data files of ``path``@``version`` (URIs as deltalake lists them) in ``world`` shards
    balanced by bytes: largest file first, each to the lightest shard so far. A shard is empty when
    the version has fewer files than ``world``."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    return _plan(_Snapshot.open(path, version), world)


def _plan(snapshot: _Snapshot, world: int) -> list[list[str]]:
    order = sorted(snapshot.files, key=lambda f: (-f.size, f.uri))
    shards: list[list[_File]] = [[] for _ in range(world)]
    loads = [0] * world
    for data_file in order:
        lightest = min(range(world), key=lambda i: (loads[i], i))
        shards[lightest].append(data_file)
        loads[lightest] += data_file.size
    return [[f.uri for f in sorted(shard, key=lambda f: f.uri)] for shard in shards]


def read_shard(path: str, version: int, columns: list[str], rank: int, world: int,
               shards: list[list[str]] | None = None) -> pa.Table:
    """Rank ``rank``'s rows of ``path``@``version``, only ``columns`` (in that order).

    ``shards`` is :func:`table_shards`' plan (computed here when None; pass the driver's so every
    rank reads the same plan). With an empty shard anywhere (fewer files than ranks) each rank reads
    the whole version and keeps its contiguous ``1/world`` of the rows instead.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    snapshot = _Snapshot.open(path, version)
    snapshot.check_columns(columns)
    if shards is None:
        shards = _plan(snapshot, world)
    if len(shards) != world:
        raise ValueError(f"{len(shards)} shards for a world of {world}")
    if all(shards):
        return snapshot.read([snapshot.file(uri) for uri in shards[rank]], columns)
    everything = snapshot.read(sorted(snapshot.files, key=lambda f: f.uri), columns)
    per_rank = -(-everything.num_rows // world)
    return everything.slice(rank * per_rank, per_rank)


def iter_shard(path: str, version: int, columns: list[str], rank: int, world: int,
               shards: list[list[str]] | None = None) -> Iterator[pa.Table]:
    """The rows :func:`read_shard` returns, one data file at a time (the streamed ingest: a worker
    holds one file's rows, not its whole shard). With fewer files than ranks, the contiguous slice is
    read at once, as ``read_shard`` does."""
    snapshot = _Snapshot.open(path, version)
    snapshot.check_columns(columns)
    if shards is None:
        shards = _plan(snapshot, world)
    if len(shards) != world or not all(shards):
        yield read_shard(path, version, columns, rank, world, shards)
        return
    for uri in shards[rank]:
        yield snapshot.read([snapshot.file(uri)], columns)


def read_version(path: str, version: int, columns: list[str]) -> pa.Table:
    """Every row of ``path``@``version``, only ``columns`` (rank 0 of 1)."""
    return read_shard(path, version, columns, 0, 1)


@dataclass(frozen=True)
class _File:
    uri: str  # as DeltaTable.file_uris() gives it: the shard plan's currency
    relative: str  # the add action's path, as deltalake's storage handler takes it
    size: int
    partition_values: dict  # logical column name → typed value (None for a null partition)
    records: int | None  # rows in the file (deletion vectors not applied); None without stats


class _Snapshot:
    """One pinned version: its files, logical schema, physical names and deletion vectors."""

    def __init__(self, path: str, table) -> None:
        import pyarrow as pa

        self.path = path
        self.table = table
        self.schema = pa.schema(table.schema().to_arrow())
        self.partition_columns = list(table.metadata().partition_columns)
        config = table.metadata().configuration
        self.mapping_mode = config.get("delta.columnMapping.mode", "none")
        self.physical = {field.name: self._physical_name(field) for field in self.schema}
        reader_features = table.protocol().reader_features or []
        self.has_deletion_vectors = "deletionVectors" in reader_features
        self.files = self._list_files()
        self._by_uri = {f.uri: f for f in self.files}
        self._masks: dict[str, pa.BooleanArray] | None = None

    @classmethod
    def open(cls, path: str, version: int) -> _Snapshot:
        from lakeray.lakehouse.delta import _open

        return cls(path, _open(path, version))

    def _physical_name(self, field) -> str:
        if self.mapping_mode == "none":
            return field.name
        if self.mapping_mode != "name":
            raise ConfigError(f"{self.path}: column mapping mode {self.mapping_mode!r} is not supported by the "
                              "ingest reader", "use delta.columnMapping.mode = name (or none)")
        name = (field.metadata or {}).get(b"delta.columnMapping.physicalName")
        return name.decode() if name is not None else field.name

    def _list_files(self) -> list[_File]:
        import pyarrow as pa

        actions = pa.table(self.table.get_add_actions(flatten=True))
        uris = list(self.table.file_uris())
        relatives = actions.column("path").to_pylist()
        sizes = actions.column("size_bytes").to_pylist()
        records = actions.column("num_records").to_pylist() if "num_records" in actions.column_names \
            else [None] * len(sizes)
        parts = {name: actions.column(f"partition.{name}").to_pylist() for name in self.partition_columns
                 if f"partition.{name}" in actions.column_names}
        if len(parts) != len(self.partition_columns) or len(uris) != len(relatives):
            raise RuntimeError(f"{self.path}: deltalake's add actions do not match its file list")
        files = []
        for i, (uri, relative, size) in enumerate(zip(uris, relatives, sizes, strict=True)):
            if not _same_file(uri, relative):  # both lists come from one snapshot in one order
                raise RuntimeError(f"{self.path}: deltalake listed {uri} beside add action {relative}")
            files.append(_File(uri, relative, int(size), {name: values[i] for name, values in parts.items()},
                               None if records[i] is None else int(records[i])))
        return files

    def file(self, uri: str) -> _File:
        try:
            return self._by_uri[uri]
        except KeyError:
            raise ConfigError(f"{uri} is not a data file of {self.path}@{self.table.version()}",
                              "plan the shards with table_shards for the same path and version") from None

    def check_columns(self, columns: list[str]) -> None:
        missing = [c for c in columns if c not in self.physical]
        if missing:
            raise ConfigError(f"{self.path}@{self.table.version()} has no column(s) {missing}",
                              f"pick from {self.schema.names}")
        if self.mapping_mode != "none":
            nested = [c for c in columns if c not in self.partition_columns and _is_nested(self.schema.field(c).type)]
            if nested:
                raise ConfigError(f"{self.path}: nested column(s) {nested} under column mapping are not supported "
                                  "by the ingest reader", "select top-level columns, or flatten them in the feature job")

    def read(self, files: list[_File], columns: list[str]) -> pa.Table:
        """``columns`` of ``files``: rows in file order, deleted rows dropped, logical names."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        # Physical schema: column-mapped names; partition columns are materialised by pyarrow from each
        # fragment's partition expression (the log's values), as for a hive-partitioned dataset.
        schema = pa.schema([self.schema.field(c).with_name(self.physical[c]).remove_metadata() for c in columns])
        physical_columns = schema.names
        masks = self._deletion_masks() if self.has_deletion_vectors else {}
        filesystem, locate = self._filesystem()
        fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))

        def fragment(data_file: _File):
            return fmt.make_fragment(locate(data_file), filesystem=filesystem,
                                     partition_expression=self._partition_expression(data_file))

        def scan(batch: list[_File]) -> pa.Table:
            dataset = ds.FileSystemDataset([fragment(f) for f in batch], schema, fmt, filesystem)
            return dataset.to_table(columns=physical_columns)  # files in order, rows in file order

        file_masks = [masks.get(_normal(f.uri)) for f in files]
        counts = [f.records for f in files]
        if not files:
            table = schema.empty_table()
        elif all(m is None for m in file_masks):
            table = scan(files)
        elif None not in counts:
            # One parallel scan, then one filter by the files' masks laid end to end (the log's record
            # counts say where each file's rows start); checked against the rows actually read.
            table = scan(files)
            if table.num_rows != sum(counts):
                raise RuntimeError(f"{self.path}: the log counts {sum(counts)} rows, the files hold {table.num_rows}")
            keep = [_fit(m, n) if m is not None else pa.repeat(pa.scalar(True), n)
                    for m, n in zip(file_masks, counts, strict=True)]
            table = table.filter(pa.concat_arrays(keep))
        else:  # no record counts in the log to place the masks: file by file
            pieces = [scan([f]) for f in files]
            table = pa.concat_tables([p if m is None else p.filter(_fit(m, p.num_rows))
                                      for p, m in zip(pieces, file_masks, strict=True)])
        return table.rename_columns(columns)

    def _partition_expression(self, data_file: _File):
        import pyarrow as pa
        import pyarrow.dataset as ds

        expression = ds.scalar(True)
        for name, value in data_file.partition_values.items():
            field = ds.field(self.physical[name])
            expression = expression & (field.is_null() if value is None
                                       else field == pa.scalar(value).cast(self.schema.field(name).type))
        return expression

    def _deletion_masks(self) -> dict[str, pa.BooleanArray]:
        """File URI → keep mask, for the files of this version that carry a deletion vector."""
        import pyarrow as pa

        if self._masks is None:
            vectors = pa.table(self.table.deletion_vectors())
            keep = vectors.column("selection_vector").combine_chunks()
            self._masks = {_normal(uri): keep[i].values for i, uri in enumerate(vectors.column("filepath").to_pylist())}
        return self._masks

    def _filesystem(self):
        """A pyarrow filesystem for the data files and how to name a file in it: the local one for a
        local table (native, fastest), deltalake's object-store handler (the table's own URI scheme
        and the profile's storage options, :func:`lakeray.storage.delta_options`) for anything else."""
        import pyarrow.fs as pa_fs

        if _is_local(self.path):
            return pa_fs.LocalFileSystem(), lambda f: _normal(f.uri)
        from deltalake.fs import DeltaStorageHandler

        from lakeray import storage

        handler = DeltaStorageHandler(self.table.table_uri, storage.delta_options(self.path),
                                      {f.relative: f.size for f in self.files})
        return pa_fs.PyFileSystem(handler), lambda f: f.relative


def _fit(mask: pa.BooleanArray, rows: int) -> pa.BooleanArray:
    """A keep mask for ``rows`` rows: a deletion vector's selection vector may stop at the last
    deleted row; the rows past it are kept."""
    import pyarrow as pa

    if len(mask) >= rows:
        return mask.slice(0, rows)
    return pa.concat_arrays([mask, pa.repeat(pa.scalar(True), rows - len(mask))])


def _is_nested(arrow_type) -> bool:
    import pyarrow.types as pt

    return pt.is_struct(arrow_type) or pt.is_list(arrow_type) or pt.is_large_list(arrow_type) or pt.is_map(arrow_type)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _normal(uri: str) -> str:
    """A file URI without ``file://``, as the local filesystem and deltalake's file list name it."""
    return uri.removeprefix("file://")


def _same_file(uri: str, relative: str) -> bool:
    from urllib.parse import unquote

    return uri.endswith(relative) or uri.endswith(unquote(relative)) or unquote(uri).endswith(unquote(relative))
