"""Writing files whole or not at all, and the state of a resumable run: atomic writes, rows to JSON Lines / gzip /
Parquet (:func:`write_rows`), tables of rows with mixed types, and the state file and run key that both resumable
writers (:class:`endokern.io.RunWriter`, :class:`endokern.parts.PartsWriter`) share."""

from __future__ import annotations

import gzip
import json
import os
import sys
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .paths import format_of
from .readers import _READ_BATCH_ROWS


def _encode_line(row: dict) -> bytes:
    """One JSON Lines line; floats as repr (exact round trip), NaN/Infinity as the tokens Python's json reads back."""
    return (json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")


def _column(values: list) -> pa.Array:
    """A column of values; scalars of mixed kinds (an ``id`` that is a string in some rows and a row number in others)
    become strings, as JSON Lines would show them, instead of failing."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if not all(v is None or isinstance(v, (str, int, float)) for v in values):
            raise
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        pa.string())


def table_from_rows(rows: list[dict]) -> pa.Table:
    """A table with a column for every key of any row (in order of first appearance), None where a row lacks it."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


def unify_schemas(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """One schema for tables of several chunks: types promoted (null -> float, int -> float); a column that is a
    string in one chunk and a number in another (mixed ids) becomes a string column."""
    try:
        return pa.unify_schemas(list(schemas), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    types: dict[str, list] = {}
    for schema in schemas:
        for f in schema:
            types.setdefault(f.name, []).append(f.type)
    out = []
    for name, kinds in types.items():
        try:
            out.append(pa.unify_schemas([pa.schema([(name, t)]) for t in kinds], promote_options="permissive")[0])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if not all(pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
                       or pa.types.is_null(t) for t in kinds):
                raise
            out.append(pa.field(name, pa.string()))
    return pa.schema(out)


def _promote(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table conformed to a wider schema: columns in its order, missing ones as nulls, types promoted (numbers
    to strings where the schema says string)."""
    casts = {f.name: f.type for f in schema if f.name in table.column_names and pa.types.is_string(f.type)
             and not pa.types.is_string(table.schema.field(f.name).type)}
    for name, type_ in casts.items():
        i = table.column_names.index(name)
        table = table.set_column(i, name, table.column(i).cast(type_))
    return pa.concat_tables([schema.empty_table(), table], promote_options="permissive")


def _parquet_dicts(path: str, schema: Optional[pa.Schema] = None) -> Iterator[dict]:
    """The rows of a Parquet file as dicts, a record batch at a time, conformed to ``schema`` when given."""
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            yield from (_promote(table, schema) if schema is not None else table).to_pylist()


def _fsync_dir(path: str) -> None:
    """Make a rename inside a directory durable (POSIX only; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp: str, path: str) -> None:
    """Move a fully written, fsynced temporary file over ``path`` atomically and durably."""
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file whole or not at all: ``write(f)`` fills ``<path>.tmp``, which is fsynced and moved over ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    replace_file(tmp, path)


def read_state(path: str, version: int, what: str = "") -> dict:
    """A run's state file (a checkpoint, a parts folder's run file); ValueError when it cannot be read or was written
    by another version."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{what}{path} is unreadable ({e}); pass --overwrite to start over") from e
    if state.get("version") != version:
        raise ValueError(f"{what}{path} has version {state.get('version')!r}, this endokern writes version {version}; "
                         "pass --overwrite to start over")
    return state


def check_run_key(old: dict, new: dict, where: str) -> None:
    """ValueError naming every argument whose value differs between a run's recorded key and this run's."""
    differ = [
        f"{k} ({json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))})"
        for k in sorted(set(old) | set(new))
        if json.dumps(old.get(k, "<unset>"), sort_keys=True) != json.dumps(new.get(k, "<unset>"), sort_keys=True)
    ]
    if differ:
        raise ValueError(f"{where} belongs to a run with other arguments: {', '.join(differ)}; rerun with the same "
                         "arguments to resume it, or pass --overwrite to start over")


def _write_std(out: IO[str], data: bytes) -> None:
    """Write UTF-8 bytes to stdout/stderr whatever its text encoding, and flush them."""
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        out.write(data.decode("utf-8"))
        out.flush()
        return
    out.flush()  # text already buffered in the wrapper goes first
    buffer.write(data)
    buffer.flush()


def _std_for(name: str) -> IO[str]:
    """Stream '-' is stderr for the stream named 'errors', stdout for any other (looked up at write time)."""
    return sys.stderr if name == "errors" else sys.stdout


def write_rows(path: str, rows: Iterable[dict]) -> None:
    """Write rows in one go to ``path`` by its extension (JSON Lines, gzip JSON Lines, Parquet, ``'-'`` = stdout).

    A file is written under a temporary name and moved into place, so it appears whole or not at all. Parquet
    holds all rows in memory; the other formats stream them. Meant for small outputs such as summaries.
    """
    fmt = format_of(path)
    if fmt == "stdio":
        _write_std(sys.stdout, b"".join(_encode_line(row) for row in rows))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(raw: IO[bytes]) -> None:
        if fmt == "parquet":
            pq.write_table(table_from_rows(list(rows)), raw)
        elif fmt == "gz":
            # mtime=0 and no file name in the header: the same rows always give the same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                for row in rows:
                    gz.write(_encode_line(row))
        else:
            for row in rows:
                raw.write(_encode_line(row))

    atomic_write(path, write)
