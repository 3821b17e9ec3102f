"""Spark's row hashes over Arrow data, without a JVM: bit-identical to ``pit.row_hash`` and
``pit.content_hash`` evaluated by Spark on the same rows.

Spark's ``xxhash64(c1, c2, ...)`` (``XxHash64``, seed 42) starts a running hash at the seed and, per
column, hashes the row's value with the running hash as the seed (``XXH64.hashInt`` / ``hashLong`` /
``hashUnsafeBytes``); a null leaves the running hash as it was. The type decides which of the three:
boolean, byte, short, int and date go through ``hashInt`` (sign-extended to 32 bits); long, timestamp
(microseconds, with or without a time zone) and decimals of precision ≤ 18 (the unscaled long) through
``hashLong``; float and double through ``hashInt(floatToIntBits)`` / ``hashLong(doubleToLongBits)``, which
map every NaN to the canonical one, with -0.0 hashed as 0; strings and binaries through
``hashUnsafeBytes`` of their bytes. Everything else (nested types, wide decimals, intervals, unsigned
integers, which Spark does not have) raises ``DataQualityError`` so that the caller can hash with Spark.

Everything is numpy over whole columns in row chunks (uint64 arithmetic wraps like Java's long): the
value half of ``hashInt``/``hashLong`` does not depend on the seed, so it is computed once per column
and shared by the two hashes of the content hash. Variable-length values are hashed for all rows at
once, word by word: a row takes part in a word step while it still has words left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lakeray.errors import DataQualityError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy as np
    import pyarrow as pa

__all__ = ["content_hash", "hashable", "row_hash", "spark_xxhash64"]

SPARK_SEED = 42
# Rows hashed per numpy step: the working arrays (a few of 64k uint64) stay in the CPU cache, and a
# streamed content hash holds one chunk of each column at a time.
_CHUNK_ROWS = 1 << 16
_MASK_BITS = 62  # pit._null_masks: one long per 62 columns

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1


def spark_xxhash64(columns: list, seed: int = SPARK_SEED):
    """Spark's ``xxhash64(c1, c2, ...)`` of each row as an int64 array. ``columns``: Arrow arrays or
    chunked arrays of one length; a ``str`` among them is a string literal (the same on every row)."""
    import numpy as np
    import pyarrow as pa

    arrays = [c for c in columns if not isinstance(c, str)]
    if not arrays:
        raise ValueError("spark_xxhash64 needs at least one Arrow column (a literal alone has no row count)")
    rows = len(arrays[0])
    if any(len(a) != rows for a in arrays):
        raise ValueError(f"columns of different lengths: {[len(a) for a in arrays]}")
    labels = [f"column {i}" for i in range(len(columns))]
    for col, label in zip(columns, labels, strict=True):
        if not isinstance(col, str):
            _check_type(col.type, label)
    out = np.empty(rows, np.uint64)
    chunked = [c if isinstance(c, str) else (c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c]))
               for c in columns]
    for start in range(0, rows, _CHUNK_ROWS):
        length = min(_CHUNK_ROWS, rows - start)
        parts = [c if isinstance(c, str) else c.slice(start, length).combine_chunks() for c in chunked]
        prepared = [_prepare(p, label) for p, label in zip(parts, labels, strict=True)]
        out[start:start + length] = _run(prepared, seed, length)
    return out.view(np.int64)


def row_hash(table: pa.Table, names: list[str], hash_version: int = 2, seed: str | None = None):
    """``pit.row_hash(names, hash_version, seed)`` of each row of ``table`` as an int64 array."""
    import numpy as np

    _check_version(hash_version)
    for name in names:
        _check_type(table.schema.field(name).type, f"column {name!r}")
    salt = [_prepare(seed, "seed")] if seed is not None else []
    out = np.empty(table.num_rows, np.uint64)
    at = 0
    for batch in table.select(names).to_batches(max_chunksize=_CHUNK_ROWS):
        prepared = _prepare_row(batch, names, hash_version)
        out[at:at + batch.num_rows] = _run([*salt, *prepared], SPARK_SEED, batch.num_rows)
        at += batch.num_rows
    return out.view(np.int64)


def content_hash(data: pa.Table | Iterable[pa.RecordBatch], hash_version: int = 2) -> str:
    """``pit.content_hash(df)`` of a DataFrame with these rows and schema: ``<rows>-<hex>``. ``data``:
    a table, or record batches (streamed: one chunk of rows is held at a time)."""
    import pyarrow as pa

    from lakeray.lakehouse.pit import _digest

    _check_version(hash_version)
    batches = data.to_batches(max_chunksize=_CHUNK_ROWS) if isinstance(data, pa.Table) else data
    salt = _prepare("lakeray", "seed")
    sums = {"n": 0, "lo0": 0, "hi0": 0, "lo1": 0, "hi1": 0}
    names = None
    for batch in batches:
        if names is None:
            names = sorted(batch.schema.names)
            for name in names:
                _check_type(batch.schema.field(name).type, f"column {name!r}")
        for start in range(0, batch.num_rows, _CHUNK_ROWS):
            part = batch.slice(start, _CHUNK_ROWS)
            prepared = _prepare_row(part, names, hash_version)
            for i, salted in enumerate([[], [salt]]):
                hashed = _run([*salted, *prepared], SPARK_SEED, part.num_rows)
                # Exact in uint64: a chunk's 2^16 halves of < 2^32 each sum below 2^48.
                sums[f"lo{i}"] += int((hashed & 0xFFFFFFFF).sum())
                sums[f"hi{i}"] += int((hashed >> 32).sum())
            sums["n"] += part.num_rows
    return _digest(sums)


def _check_version(hash_version: int) -> None:
    if hash_version not in (1, 2):
        raise DataQualityError(f"unknown row-hash version {hash_version}", "upgrade lakeray to read this manifest")


def _prepare_row(batch, names: list[str], hash_version: int) -> list:
    """What ``pit.row_hash`` hashes after the salt: the null masks (version 2), then the columns."""
    import numpy as np

    import pyarrow as pa

    # Decoded first: a null in a dictionary's values is a null row that the indices do not count.
    columns = [col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
               for col in (batch.column(name) for name in names)]
    prepared = [_prepare(col, f"column {name!r}") for col, name in zip(columns, names, strict=True)]
    if hash_version == 1:
        return prepared
    masks = []
    for start in range(0, len(columns), _MASK_BITS):
        mask = np.zeros(batch.num_rows, np.uint64)
        for bit, col in enumerate(columns[start:start + _MASK_BITS]):
            if col.null_count:
                mask |= _is_null(col).astype(np.uint64) << np.uint64(bit)
        masks.append(("long", _long_lane(mask), None))
    return [*masks, *prepared]


def _is_null(arr):
    import pyarrow as pa

    if pa.types.is_null(arr.type):
        import numpy as np

        return np.ones(len(arr), bool)
    return arr.is_null().to_numpy(zero_copy_only=False)


def hashable(arrow_type) -> bool:
    """Whether this module reproduces Spark's hash of a column of ``arrow_type`` (else use Spark's)."""
    try:
        _check_type(arrow_type, "column")
    except DataQualityError:
        return False
    return True


def _check_type(arrow_type, label: str) -> None:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        _check_type(arrow_type.value_type, label)
        return
    supported = (pa.types.is_null(arrow_type) or pa.types.is_boolean(arrow_type)
                 or pa.types.is_signed_integer(arrow_type)
                 or (pa.types.is_floating(arrow_type) and not pa.types.is_float16(arrow_type))
                 or pa.types.is_date32(arrow_type) or pa.types.is_timestamp(arrow_type) or _is_bytes(arrow_type)
                 # Spark hashes wider decimals by their BigInteger bytes: left to Spark.
                 or (pa.types.is_decimal(arrow_type) and arrow_type.precision <= 18))
    if not supported:
        raise DataQualityError(
            f"{label} has type {arrow_type}, whose Spark xxhash64 the Arrow row hash does not reproduce",
            "hash these rows with Spark (the Spark engine), or cast the column to a supported type")


def _is_bytes(arrow_type) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
            or pa.types.is_string_view(arrow_type) or pa.types.is_binary_view(arrow_type))


def _values(arr, dtype):
    """The value buffer of a fixed-width Arrow array as numpy, zero-copy (null slots hold anything)."""
    import numpy as np

    return np.frombuffer(arr.buffers()[1], dtype)[arr.offset:arr.offset + len(arr)]


def _prepare(arr, label: str):
    """One column as (kind, seed-independent payload, valid mask or None), kind: int, long, bytes, none."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, str):
        data = arr.encode("utf-8")
        return "literal", (_words(np.frombuffer(data, np.uint8)), len(data)), None
    kind = arr.type
    if pa.types.is_dictionary(kind):
        return _prepare(arr.dictionary_decode(), label)
    if pa.types.is_null(kind) or arr.null_count == len(arr):
        return "none", None, None
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else None
    if pa.types.is_boolean(kind):
        bits = pc.fill_null(arr, False).to_numpy(zero_copy_only=False)
        return "int", _int_lane(bits.astype(np.uint64)), valid
    if pa.types.is_signed_integer(kind) and kind.bit_width <= 32 or pa.types.is_date32(kind):
        ints = _values(arr, f"<i{kind.bit_width // 8}").astype(np.int32)
        return "int", _int_lane(ints.view(np.uint32).astype(np.uint64)), valid
    if pa.types.is_int64(kind):
        return "long", _long_lane(_values(arr, "<u8")), valid
    if pa.types.is_float32(kind):
        floats = _values(arr, "<f4")
        bits = floats.view(np.uint32).astype(np.uint64)
        bits[np.isnan(floats)] = 0x7FC00000  # Float.floatToIntBits: one canonical NaN
        bits[floats == 0] = 0  # Spark hashes -0.0f as 0
        return "int", _int_lane(bits), valid
    if pa.types.is_float64(kind):
        doubles = _values(arr, "<f8")
        bits = doubles.view(np.uint64).copy()
        bits[np.isnan(doubles)] = 0x7FF8000000000000  # Double.doubleToLongBits
        bits[doubles == 0] = 0
        return "long", _long_lane(bits), valid
    if pa.types.is_timestamp(kind):
        return "long", _long_lane(_micros(_values(arr, "<i8"), kind.unit).view(np.uint64)), valid
    if pa.types.is_decimal(kind) and kind.precision <= 18:
        width = kind.bit_width // 8
        if width == 4:
            unscaled = _values(arr, "<i4").astype(np.int64)
        else:  # the value fits 64 bits: its low little-endian word is the unscaled long
            words = np.frombuffer(arr.buffers()[1], "<i8").reshape(-1, width // 8)
            unscaled = words[arr.offset:arr.offset + len(arr), 0]
        return "long", _long_lane(unscaled.view(np.uint64)), valid
    if _is_bytes(kind):
        return "bytes", _byte_rows(arr), valid
    _check_type(kind, label)
    raise DataQualityError(f"{label} has type {kind}, which the Arrow row hash does not reproduce",
                           "hash these rows with Spark (the Spark engine)")


def _micros(values, unit: str):
    import numpy as np

    if unit == "us":
        return values
    if unit == "ns":  # Spark truncates nanoseconds toward the earlier microsecond
        return np.floor_divide(values, 1000)
    return values * {"s": 1_000_000, "ms": 1000}[unit]


def _words(data):
    """Every 8-byte little-endian word of ``data`` (zero-padded at the end) by its start byte: a view
    with a 1-byte stride, so ``words[positions]`` gathers unaligned words in one step."""
    import numpy as np

    padded = np.zeros(len(data) + 8, np.uint8)
    padded[:len(data)] = data
    return np.ndarray((len(data) + 1,), dtype="<u8", buffer=padded, strides=(1,))


def _byte_rows(arr):
    """(words, start, length) of each row of a string or binary array."""
    import numpy as np
    import pyarrow as pa

    if pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
        arr = arr.cast(pa.large_binary())
    buffers = arr.buffers()
    width = "<i4" if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type) else "<i8"
    offsets = np.frombuffer(buffers[1], width)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    first, last = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(buffers[2], np.uint8)[first:last] if buffers[2] is not None else np.empty(0, np.uint8)
    return _words(data), offsets[:-1] - first, np.diff(offsets)


# The value half of hashInt / hashLong: what is xor-ed into (seed + PRIME64_5 + width).
def _int_lane(ints):
    import numpy as np

    ints *= np.uint64(_P1)
    return ints


def _long_lane(longs):
    import numpy as np

    lane = longs * np.uint64(_P2)
    return _rotl(lane, 31) * np.uint64(_P1)


def _rotl(x, r: int):
    import numpy as np

    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(h):
    import numpy as np

    h ^= h >> np.uint64(33)
    h *= np.uint64(_P2)
    h ^= h >> np.uint64(29)
    h *= np.uint64(_P3)
    h ^= h >> np.uint64(32)
    return h


def _run(prepared: list, seed: int, rows: int):
    """The running hash over the prepared columns, from ``seed``, for ``rows`` rows (uint64)."""
    import numpy as np

    h = np.uint64(seed & _M64)  # stays a scalar while every row has the same running hash
    with np.errstate(over="ignore"):
        for kind, payload, valid in prepared:
            if kind == "none":
                continue
            if kind == "int":
                new = _rotl(np.bitwise_xor(h + np.uint64((_P5 + 4) & _M64), payload), 23)
                new *= np.uint64(_P2)
                new += np.uint64(_P3)
                new = _fmix(new)
            elif kind == "long":
                new = _rotl(np.bitwise_xor(h + np.uint64((_P5 + 8) & _M64), payload), 27)
                new *= np.uint64(_P1)
                new += np.uint64(_P4)
                new = _fmix(new)
            elif kind == "literal":
                words, length = payload
                if np.ndim(h) == 0:
                    new = _hash_bytes(words, np.zeros(1, np.int64), np.full(1, length), np.full(1, h))[0]
                else:
                    new = _hash_bytes(words, np.zeros(rows, np.int64), np.full(rows, length), h)
            else:
                words, starts, lengths = payload
                new = _hash_bytes(words, starts, lengths, np.broadcast_to(h, rows))
            h = new if valid is None else np.where(valid, new, h)
        return np.broadcast_to(h, rows) if np.ndim(h) == 0 else h


def _hash_bytes(words, starts, lengths, seed):
    """XXH64.hashUnsafeBytes of every row: row i is the ``lengths[i]`` bytes at ``starts[i]``."""
    import numpy as np

    u = np.uint64
    stripes = lengths // 32
    h = seed + u(_P5)
    big = np.flatnonzero(stripes)
    if big.size:  # 32-byte stripes over four accumulators
        s = seed[big]
        acc = [s + u((_P1 + _P2) & _M64), s + u(_P2), s.copy(), s - u(_P1)]
        first, count = starts[big], stripes[big]
        for stripe in range(int(count.max())):
            rows = np.flatnonzero(count > stripe)
            at = first[rows] + 32 * stripe
            for lane, v in enumerate(acc):
                v[rows] = _rotl(v[rows] + words[at + 8 * lane] * u(_P2), 31) * u(_P1)
        merged = _rotl(acc[0], 1) + _rotl(acc[1], 7) + _rotl(acc[2], 12) + _rotl(acc[3], 18)
        for v in acc:
            merged ^= _rotl(v * u(_P2), 31) * u(_P1)
            merged = merged * u(_P1) + u(_P4)
        h[big] = merged
    h += lengths.astype(np.uint64)
    at = starts + 32 * stripes
    left = lengths - 32 * stripes
    for word in range(int((left // 8).max(initial=0))):
        rows = np.flatnonzero(left >= 8 * (word + 1))
        k = words[at[rows] + 8 * word]
        h[rows] = _rotl(h[rows] ^ _rotl(k * u(_P2), 31) * u(_P1), 27) * u(_P1) + u(_P4)
    at = starts + (lengths & ~7)
    left = lengths & 7
    rows = np.flatnonzero(left >= 4)
    if rows.size:
        k = words[at[rows]] & u(0xFFFFFFFF)
        h[rows] = _rotl(h[rows] ^ k * u(_P1), 23) * u(_P2) + u(_P3)
        at[rows] += 4
        left[rows] -= 4
    for byte in range(3):
        rows = np.flatnonzero(left > byte)
        if rows.size:
            k = words[at[rows] + byte] & u(0xFF)
            h[rows] = _rotl(h[rows] ^ k * u(_P5), 11) * u(_P1)
    return _fmix(h)
