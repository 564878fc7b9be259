"""Streaming readers and crash-safe, resumable writers for the ``score``, ``compare``, ``rank`` and ``filter`` runs.

Reading: :func:`read_rows` streams the rows of JSON Lines (plain or gzip), Parquet, JSON-array files or stdin,
one shard of them, from a given shard row on, with bad rows reported as error rows instead of exceptions.
:func:`read_inputs` numbers the rows of several inputs one after another (the one row numbering: blank lines are
not rows, :func:`numbered_lines`); :func:`plan_inputs` cuts them into chunks by the same numbering for an engine
that reads chunks out of order.

Naming: :func:`beside` is the one rule for the files next to an output (errors, summary, rejected rows).

Writing: :func:`atomic_write`, :func:`read_state` and :func:`check_run_key` are shared by the two resumable writers,
:class:`RunWriter` here (one file per stream, a checkpoint) for a run that commits chunks in order, and
:class:`endokern.parts.PartsWriter` (a folder of Parquet parts per stream, a journal) for one whose chunks finish in
any order.

:class:`RunWriter` appends each chunk's results to one or more output streams and records how far it
got in a checkpoint sidecar (``<first stream path>.progress.json``). The order of operations makes a run killed at
any moment (``kill -9``) and restarted with the same arguments end with exactly the output of a run never killed:

1. a chunk's rows are appended to every stream, flushed and fsynced (Parquet: one part file per chunk, written
   to a temporary name and renamed);
2. only then is the checkpoint replaced atomically (temporary file, fsync, ``os.replace``) with the new byte
   lengths / part counts and the number of input rows consumed;
3. on restart, everything beyond the checkpoint (a half-written line, an uncommitted gzip member or Parquet
   part) is cut off, and the caller resumes reading at ``rows_done``.

Streams written to stdout or stderr (path ``'-'``) cannot be cut back, so a run with one has no checkpoint and
always starts over.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["InputRow", "OUTPUT_EXTENSIONS", "RunWriter", "beside", "errors_path_for", "read_inputs", "read_rows",
           "write_rows"]

CHECKPOINT_VERSION = 1
_BOM = b"\xef\xbb\xbf"
_GZ_SUFFIXES = (".jsonl.gz", ".ndjson.gz", ".json.gz")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
OUTPUT_EXTENSIONS = (".parquet", ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl", ".ndjson", ".json")
_SUPPORTED = "'-', .jsonl, .ndjson, .json, .jsonl.gz, .ndjson.gz, .json.gz or .parquet"
_READ_BATCH_ROWS = 1024  # Parquet rows decoded at a time when reading
_MERGE_ROW_GROUP_ROWS = 65536  # chunks are gathered into row groups of about this many rows when merging parts
_BLOCK_BYTES = 1 << 20  # read size for peeking into files and reading spools


def format_of(path: str) -> str:
    """The format of a path by its extension: 'stdio' ('-'), 'jsonl', 'gz' or 'parquet'."""
    if path == "-":
        return "stdio"
    lower = path.lower()
    if lower.endswith(_GZ_SUFFIXES):
        return "gz"
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path!r} from its extension: use {_SUPPORTED}")


# ----------------------------------------------------------------------------------------------------------- reading


@dataclass
class InputRow:
    """One input row: its place in the whole input, and the parsed object or why it could not be parsed."""

    index: int  # 0-based row number in the whole input (before sharding); blank lines are not rows
    row: Optional[dict]  # the parsed object, or None when it could not be parsed
    error: Optional[str]  # why it could not be parsed ("bad JSON: <msg>", "row is not a JSON object"), else None
    damaged: bool = False  # the file is damaged here: reading stopped, and no row after this one could be read


def read_rows(path: str, *, num_shards: int = 1, shard_index: int = 0, start: int = 0) -> Iterator[InputRow]:
    """Stream the rows of one shard of an input file.

    ``path`` ``'-'`` is JSON Lines from stdin. Otherwise the format comes from the extension: ``.jsonl`` /
    ``.ndjson`` (JSON Lines), ``.jsonl.gz`` / ``.ndjson.gz`` (gzip JSON Lines), ``.parquet`` (read in record
    batches), ``.json`` / ``.json.gz`` (a JSON array of objects, loaded whole, when its first non-space character
    is ``[``; JSON Lines otherwise). Row ``i`` belongs to shard ``i % num_shards``; ``start`` skips the first
    ``start`` rows of this shard (to resume). Lines are decoded as UTF-8; a line that is not UTF-8, not JSON, or
    not a JSON object becomes an :class:`InputRow` with ``error`` set. Memory stays flat in the input size for
    every format but JSON arrays.

    Arguments are checked at the call, not at the first ``next()``: a bad shard argument raises ``ValueError``,
    a missing file ``FileNotFoundError``, an unknown extension ``ValueError``. A ``.json`` array that is not valid
    JSON as a whole raises ``ValueError`` when read, since its rows cannot be told apart.
    """
    _check_shard_args(num_shards, shard_index, start)
    fmt = format_of(path)
    if fmt != "stdio" and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "input file not found", path)
    first = shard_index + start * num_shards  # global index of the first row to yield

    def keep(index: int) -> bool:
        return index >= first and index % num_shards == shard_index

    if fmt == "stdio":
        return _jsonl_rows(_stdin_lines(), keep)
    if fmt == "parquet":
        return _parquet_rows(path, first, keep)
    if path.lower().endswith((".json", ".json.gz")) and is_json_array(path, fmt):
        return _json_array_rows(path, fmt, keep)
    return _file_jsonl_rows(path, fmt, keep)


def _check_shard_args(num_shards: int, shard_index: int, start: int) -> None:
    """Raise ValueError saying which shard argument is wrong."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be an integer in [0, num_shards={num_shards}), got {shard_index!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an integer >= 0, got {start!r}")


def open_binary(path: str, fmt: str) -> IO[bytes]:
    """Open a (possibly gzip) file for binary reading."""
    return gzip.open(path, "rb") if fmt == "gz" else open(path, "rb")


def _stdin_lines() -> Iterator[bytes]:
    """The lines of stdin as bytes, so that undecodable lines become error rows instead of crashes."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        yield from buffer
        return
    # a text-only stdin (e.g. StringIO): surrogatepass keeps lone surrogates as invalid UTF-8, flagged per row
    for line in sys.stdin:
        yield line.encode("utf-8", "surrogatepass")


class DamagedInput(Exception):
    """A file that cannot be read to its end (a truncated or corrupt gzip stream); ``complete`` holds the lines read
    before the damage, ``reason`` what went wrong."""


def _file_jsonl_rows(path: str, fmt: str, keep: Callable[[int], bool]) -> Iterator[InputRow]:
    """The rows of a (possibly gzip) JSON Lines file; the file stays open only while the generator runs. A gzip file
    that ends early or is corrupt gives every complete line before the damage, then one damaged row saying where
    and why reading stopped (it is never dropped: every later row is unreadable)."""
    with open_binary(path, fmt) as f:
        lines = _whole_lines(f, path) if fmt == "gz" else f
        index = -1
        try:
            for index, _, line in numbered_lines(lines):
                if keep(index):
                    yield parse_line(index, line)
        except DamagedInput as err:
            yield InputRow(index + 1, None, f"damaged input: {path}: reading stopped at row {index + 1}: {err}; "
                           "the rows before it were read", damaged=True)


def _whole_lines(f: IO[bytes], path: str) -> Iterator[bytes]:
    """The lines of a decompressing reader, only those ended by a newline (or by the true end of the stream):
    a line cut by damage raises :class:`DamagedInput` instead of being returned as a row."""
    import zlib

    tail = b""
    while True:
        try:
            block = f.read1(_BLOCK_BYTES)  # one decompressed piece: read() would drop what it holds on damage
        except EOFError:
            raise DamagedInput("the compressed stream ends early (a truncated file)") from None
        except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise DamagedInput(f"the compressed data is corrupt ({err})") from None
        if not block:
            if tail:
                yield tail
            return
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n"


def _jsonl_rows(lines: Iterable[bytes], keep: Callable[[int], bool]) -> Iterator[InputRow]:
    """Number the non-blank lines and parse those ``keep`` wants (the others are only counted, never parsed)."""
    for index, _, line in numbered_lines(lines):
        if keep(index):
            yield parse_line(index, line)


def numbered_lines(lines: Iterable[bytes], first_index: int = 0, at_start: bool = True) -> Iterator[tuple]:
    """``(row index, byte offset, line)`` of the rows of JSON Lines: a UTF-8 BOM on the first line of a file
    (``at_start``) is dropped and blank lines are not rows. The one numbering rule of every reader and planner."""
    index, pos = first_index, 0
    for n, line in enumerate(lines):
        start = pos
        pos += len(line)
        if n == 0 and at_start:
            line = line.removeprefix(_BOM)
        if not line.strip():
            continue
        yield index, start, line
        index += 1


def parse_line(index: int, line: bytes) -> InputRow:
    """Parse one JSON Lines line into an InputRow, or an error row saying why it cannot be parsed."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return InputRow(index, None, f"bad UTF-8: {e}")
    try:
        obj = json.loads(text)
    except ValueError as e:
        return InputRow(index, None, f"bad JSON: {e}")
    except RecursionError:
        return InputRow(index, None, "bad JSON: nested too deeply")
    if not isinstance(obj, dict):
        return InputRow(index, None, "row is not a JSON object")
    return InputRow(index, obj, None)


def is_json_array(path: str, fmt: str) -> bool:
    """Whether the first non-space character of a file (after a UTF-8 BOM) is '[', i.e. it holds a JSON array."""
    with open_binary(path, fmt) as f:
        block = f.read(_BLOCK_BYTES).removeprefix(_BOM)
        while block:
            rest = block.lstrip()
            if rest:
                return rest.startswith(b"[")
            block = f.read(_BLOCK_BYTES)
    return False


def _json_array_rows(path: str, fmt: str, keep: Callable[[int], bool]) -> Iterator[InputRow]:
    """The elements of a JSON array file (loaded whole); elements that are not objects become error rows."""
    with open_binary(path, fmt) as f:
        data = f.read().removeprefix(_BOM)
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: bad JSON: {e}") from None
    del data  # the parsed list is all that is needed from here on
    for index, item in enumerate(items):
        if keep(index):
            if isinstance(item, dict):
                yield InputRow(index, item, None)
            else:
                yield InputRow(index, None, "row is not a JSON object")


def _parquet_rows(path: str, first: int, keep: Callable[[int], bool]) -> Iterator[InputRow]:
    """The rows of a Parquet file, a record batch at a time; row groups wholly before ``first`` are not read."""
    with pq.ParquetFile(path) as pf:
        meta = pf.metadata
        groups = list(range(meta.num_row_groups))
        offset = 0
        while groups and offset + meta.row_group(groups[0]).num_rows <= first:
            offset += meta.row_group(groups.pop(0)).num_rows
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS, row_groups=groups):
            wanted = [i for i in range(batch.num_rows) if keep(offset + i)]
            if wanted:
                for i, row in zip(wanted, batch.take(pa.array(wanted)).to_pylist()):
                    yield InputRow(offset + i, row, None)
            offset += batch.num_rows


# ----------------------------------------------------------------------------------------------------------- writing


def beside(output: str, suffix: str) -> str:
    """The one naming rule of files that sit beside an output: ``out.jsonl`` (any data extension, in any case) ->
    ``out<suffix>``; a folder or other name gets the suffix appended; standard output ``'-'`` stays ``'-'``."""
    if output == "-":
        return "-"
    lower = output.lower()
    for ext in OUTPUT_EXTENSIONS:
        if lower.endswith(ext):
            return output[: -len(ext)] + suffix
    return output + suffix


def errors_path_for(output: str) -> str:
    """Where the errors of a run go by default: ``beside(output, ".errors.jsonl")``; ``'-'`` means standard error."""
    return beside(output, ".errors.jsonl")


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


@dataclass
class _Stream:
    """One output stream of a RunWriter and its committed extent."""

    name: str
    path: str
    fmt: str  # 'jsonl', 'gz', 'parquet' or 'stdio'
    committed: int = 0  # committed bytes (jsonl, gz) or parts (parquet); unused for stdio
    file: Optional[IO[bytes]] = None  # jsonl/gz: append handle; stdio: spool copy of what went out
    schema: Optional[pa.Schema] = None  # parquet: the promoted schema of all committed parts

    @property
    def parts_dir(self) -> str:
        return self.path + ".parts"

    def part_path(self, k: int) -> str:
        return os.path.join(self.parts_dir, f"part-{k:06d}.parquet")


class RunWriter:
    """Resumable writer for one run with several named output streams.

    ``streams`` maps names to paths, e.g. ``{"output": "out.jsonl", "errors": "out.errors.jsonl"}``. A stream's
    format comes from its path: ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON Lines), ``.jsonl.gz`` (gzip JSON
    Lines, one gzip member per chunk), ``.parquet`` (one part file per chunk in ``<path>.parts/``, merged into
    ``<path>`` by :meth:`finish`), or ``'-'`` (JSON Lines to stdout; to stderr for the stream named ``"errors"``).
    ``run_key`` is a JSON-able dict of the arguments that determine the output; a checkpoint written under a
    different one is refused.

    Opening: with no checkpoint (or ``overwrite=True``) the run starts fresh, refusing with ``FileExistsError``
    to clobber stream files it did not write unless ``overwrite``; with a checkpoint of the same run it resumes:
    every stream is cut back to its committed extent and :attr:`rows_done` says how many rows of this shard to
    skip (``read_rows(..., start=writer.rows_done)``); a checkpoint marked complete gives :attr:`complete` True
    and the caller has nothing left to do.

    A run with any ``'-'`` stream has no checkpoint (stdout cannot be cut back): it always starts fresh with
    ``rows_done == 0``. What goes to ``'-'`` is also spooled to an anonymous temporary file so that
    :meth:`read_stream` works for it too.

    Not thread-safe; one process per set of output files.
    """

    def __init__(self, streams: dict[str, str], *, run_key: dict, overwrite: bool = False,
                 open_now: bool = True) -> None:
        if not streams:
            raise ValueError("RunWriter needs at least one output stream")
        self._streams = {name: _Stream(name, path, format_of(path)) for name, path in streams.items()}
        files = [s.path for s in self._streams.values() if s.fmt != "stdio"]
        if len({os.path.abspath(p) for p in files}) != len(files):
            raise ValueError(f"two output streams write the same file: {streams}")
        # a JSON round trip makes the key compare equal to the checkpoint's copy of it (tuples become lists...)
        self._run_key = json.loads(json.dumps(run_key, allow_nan=True))
        self._resumable = len(files) == len(self._streams)
        self._checkpoint = files[0] + ".progress.json" if files else None
        self._rows_done = 0
        self._complete = False
        self._failed = False
        self._closed = False
        self._fresh = not (self._resumable and not overwrite and os.path.exists(self._checkpoint))
        self._overwrite = overwrite
        self._opened = False
        if self._fresh:
            self._check_fresh(overwrite)
        else:
            self._check_resume(self._load_checkpoint())
        if open_now:
            self.open()

    def open(self) -> "RunWriter":
        """Create, cut back or open the stream files (done by the constructor unless ``open_now=False``, which
        only checks that the run may start or resume and touches nothing)."""
        if self._opened:
            return self
        self._opened = True
        if self._fresh:
            self._start_fresh()
        elif self._complete:
            for s in self._streams.values():
                if s.fmt == "parquet":
                    shutil.rmtree(s.parts_dir, ignore_errors=True)  # a kill in finish() can leave them behind
        else:
            for s in self._streams.values():
                self._open(s)
        return self

    # -------------------------------------------------------------------------------------------------- public

    @property
    def rows_done(self) -> int:
        """Input rows of this shard whose results are fully committed."""
        return self._rows_done

    @property
    def complete(self) -> bool:
        """Whether :meth:`finish` has completed (possibly in an earlier process)."""
        return self._complete

    @property
    def checkpoint_path(self) -> Optional[str]:
        """The checkpoint sidecar file, or None for a run with a ``'-'`` stream."""
        return self._checkpoint if self._resumable else None

    def commit(self, rows_by_stream: dict[str, list[dict]], rows_consumed: int) -> None:
        """Append each stream's rows, flush and fsync them, then advance the checkpoint by ``rows_consumed``.

        A stream missing from ``rows_by_stream`` gets nothing this chunk. All rows are encoded before anything
        is written, so a row that cannot be stored (not JSON-able, clashing Parquet types) raises ``ValueError``
        or ``TypeError`` with the files untouched. If writing fails midway the writer refuses further commits;
        open a new one to resume from the last checkpoint.
        """
        self._check_writable()
        self.open()
        unknown = sorted(set(rows_by_stream) - set(self._streams))
        if unknown:
            raise ValueError(f"unknown output stream(s) {unknown}; this run has {sorted(self._streams)}")
        if isinstance(rows_consumed, bool) or not isinstance(rows_consumed, int) or rows_consumed < 0:
            raise ValueError(f"rows_consumed must be an integer >= 0, got {rows_consumed!r}")
        payloads = {name: self._encode(self._streams[name], rows) for name, rows in rows_by_stream.items() if rows}
        try:
            for name, payload in payloads.items():
                self._append(self._streams[name], payload)
            self._rows_done += rows_consumed
            self._write_checkpoint()
        except BaseException:
            self._failed = True
            raise

    def finish(self) -> None:
        """Merge each Parquet stream's parts into its final file and mark the run complete.

        The merged file is written under a temporary name and moved into place; columns whose type differs
        between chunks (null in one, float in the next; int and float) are promoted to a common type. The parts
        are removed only after the checkpoint says complete, so a kill at any point here is recoverable.
        Calling it on a complete run does nothing.
        """
        if self._complete:
            return
        self._check_writable()
        self.open()
        try:
            for s in self._streams.values():
                if s.fmt == "parquet":
                    self._merge_parts(s)
            self._complete = True
            self._write_checkpoint()
        except BaseException:
            self._failed = True
            raise
        for s in self._streams.values():
            if s.fmt == "parquet":
                shutil.rmtree(s.parts_dir, ignore_errors=True)
            elif s.fmt == "stdio":
                _std_for(s.name).flush()

    def read_stream(self, name: str) -> Iterator[dict]:
        """Every committed row of a stream, including rows written before a resume, read back from disk.

        Parquet rows are conformed to the schema merged over all chunks (so the rows are the same before and
        after :meth:`finish`). Rows committed while the iterator runs may or may not be included.
        """
        if name not in self._streams:
            raise ValueError(f"unknown output stream {name!r}; this run has {sorted(self._streams)}")
        s = self._streams[name]
        if s.fmt == "stdio":
            if s.file is None or s.file.closed:
                raise ValueError(
                    f"stream {name!r} went to {'stderr' if name == 'errors' else 'stdout'} and "
                    "its copy is gone once the writer is closed"
                )
            return _spool_rows(s.file)
        if s.fmt == "parquet":
            if self._complete:
                return _parquet_dicts(s.path)
            return (row for k in range(s.committed) for row in _parquet_dicts(s.part_path(k), s.schema))
        return _file_dicts(s.path, s.fmt)

    def close(self) -> None:
        """Close the stream files (without finishing the run: a later writer resumes it)."""
        if self._closed:
            return
        self._closed = True
        for s in self._streams.values():
            if s.file is not None:
                s.file.close()
            if s.fmt == "stdio":
                _std_for(s.name).flush()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ opening

    def _check_fresh(self, overwrite: bool) -> None:
        """FileExistsError when a fresh start would replace files this run did not write (without ``overwrite``)."""
        if not overwrite:
            for s in (s for s in self._streams.values() if s.fmt != "stdio"):
                for p in (s.path, s.parts_dir) if s.fmt == "parquet" else (s.path,):
                    if os.path.lexists(p):
                        raise FileExistsError(
                            errno.EEXIST,
                            "output exists and no checkpoint of an interrupted run with it was found; "
                            "pass --overwrite to replace it",
                            p,
                        )

    def _start_fresh(self) -> None:
        """Start the run over: remove what earlier runs left, write an empty checkpoint, open the streams."""
        file_streams = [s for s in self._streams.values() if s.fmt != "stdio"]
        for s in file_streams:
            os.makedirs(os.path.dirname(s.path) or ".", exist_ok=True)
        if self._resumable:
            # the checkpoint comes first, so a kill while _open cuts the old files to nothing resumes from zero
            self._write_checkpoint()
        elif self._checkpoint is not None and os.path.exists(self._checkpoint):
            os.remove(self._checkpoint)  # a stale checkpoint would describe files this run rewrites
        for s in self._streams.values():
            self._open(s)

    def _load_checkpoint(self) -> dict:
        """The checkpoint's content; ValueError when it cannot be read."""
        return read_state(self._checkpoint, CHECKPOINT_VERSION, "checkpoint ")

    def _check_resume(self, ckpt: dict) -> None:
        """Take up the run of a checkpoint (same arguments required); :meth:`open` cuts off what is uncommitted."""
        self._check_same_run(ckpt)
        self._rows_done = int(ckpt["rows_done"])
        self._complete = bool(ckpt["complete"])
        for s in self._streams.values():
            entry = ckpt["streams"][s.name]
            s.committed = int(entry["parts"] if s.fmt == "parquet" else entry["bytes"])
        if self._complete:
            for s in self._streams.values():
                if not os.path.exists(s.path):
                    raise FileNotFoundError(
                        errno.ENOENT,
                        f"checkpoint {self._checkpoint} says the run is complete but its output is gone; "
                        "pass --overwrite to redo it",
                        s.path,
                    )

    def _check_same_run(self, ckpt: dict) -> None:
        """ValueError when the checkpoint was written for other arguments or other output streams."""
        check_run_key(ckpt.get("run_key") or {}, self._run_key, f"checkpoint {self._checkpoint}")
        old_streams = {name: os.path.normpath(v.get("path", "")) for name, v in ckpt.get("streams", {}).items()}
        new_streams = {name: os.path.normpath(s.path) for name, s in self._streams.items()}
        if old_streams != new_streams:
            raise ValueError(
                f"checkpoint {self._checkpoint} belongs to a run with other output streams ({old_streams} vs "
                f"{new_streams}); rerun with the same outputs to resume it, or pass --overwrite to start over"
            )

    def _open(self, s: _Stream) -> None:
        """Open a stream for appending, after cutting off whatever lies beyond its committed extent."""
        if s.fmt == "stdio":
            s.file = tempfile.TemporaryFile()
            return
        if s.fmt == "parquet":
            self._open_parts(s)
            return
        size = os.path.getsize(s.path) if os.path.exists(s.path) else 0
        if size < s.committed:
            raise ValueError(
                f"{s.path} holds {size} bytes but checkpoint {self._checkpoint} recorded {s.committed}: it was "
                "changed outside this run; pass --overwrite to start over"
            )
        s.file = open(s.path, "ab")
        s.file.truncate(s.committed)

    def _open_parts(self, s: _Stream) -> None:
        """Keep the committed Parquet parts, drop later ones and temporaries, rebuild the merged schema."""
        if os.path.exists(s.path):
            os.remove(s.path)  # a merged file of an unfinished run is from a finish() killed midway
        os.makedirs(s.parts_dir, exist_ok=True)
        keep = {os.path.basename(s.part_path(k)) for k in range(s.committed)}
        for entry in os.listdir(s.parts_dir):
            if entry not in keep:
                os.remove(os.path.join(s.parts_dir, entry))
        missing = sorted(keep - set(os.listdir(s.parts_dir)))
        if missing:
            raise ValueError(
                f"{s.parts_dir} lacks committed part(s) {missing}: it was changed outside this run; "
                "pass --overwrite to start over"
            )
        schemas = [pq.read_schema(s.part_path(k)) for k in range(s.committed)]
        s.schema = unify_schemas(schemas) if schemas else None

    # ------------------------------------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        """RuntimeError when the writer may not write any more."""
        if self._closed:
            raise RuntimeError("the RunWriter is closed")
        if self._complete:
            raise RuntimeError("the run is complete; nothing more can be committed")
        if self._failed:
            raise RuntimeError("an earlier write failed; open a new RunWriter to resume from the last checkpoint")

    def _encode(self, s: _Stream, rows: list[dict]) -> Any:
        """A chunk's rows in the stream's on-disk form: bytes, or (table, merged schema) for Parquet."""
        if s.fmt != "parquet":
            data = b"".join(_encode_line(row) for row in rows)
            # one gzip member per chunk; mtime=0 so that a resumed run writes the same bytes as an unbroken one
            return gzip.compress(data, compresslevel=6, mtime=0) if s.fmt == "gz" else data
        try:
            table = table_from_rows(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"stream {s.name!r}: these rows cannot be stored in Parquet: {e}") from None
        if s.schema is None:
            return table, table.schema
        try:
            return table, unify_schemas([s.schema, table.schema])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"stream {s.name!r}: this chunk's column types clash with earlier chunks': {e}") from None

    def _append(self, s: _Stream, payload: Any) -> None:
        """Write one encoded chunk durably and extend the stream's committed extent (in memory)."""
        if s.fmt == "stdio":
            _write_std(_std_for(s.name), payload)
            s.file.seek(0, os.SEEK_END)  # read_stream moves the spool's position
            s.file.write(payload)
            s.file.flush()
        elif s.fmt == "parquet":
            table, schema = payload
            atomic_write(s.part_path(s.committed), lambda f: pq.write_table(table, f))
            s.committed += 1
            s.schema = schema
        else:
            s.file.write(payload)
            s.file.flush()
            os.fsync(s.file.fileno())
            s.committed += len(payload)

    def _write_checkpoint(self) -> None:
        """Replace the checkpoint atomically with the current progress (no-op for a run with a '-' stream)."""
        if not self._resumable:
            return
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "run_key": self._run_key,
            "rows_done": self._rows_done,
            "complete": self._complete,
            "streams": {
                s.name: {"path": s.path, "format": s.fmt, ("parts" if s.fmt == "parquet" else "bytes"): s.committed}
                for s in self._streams.values()
            },
        }
        data = json.dumps(ckpt, indent=1, allow_nan=True).encode("utf-8")
        atomic_write(self._checkpoint, lambda f: f.write(data))

    def _merge_parts(self, s: _Stream) -> None:
        """Merge a Parquet stream's committed parts, in order, into its final file (temporary name, then rename)."""
        schema = s.schema if s.schema is not None else pa.schema([])

        def write(f: IO[bytes]) -> None:
            with pq.ParquetWriter(f, schema) as writer:
                pending: list[pa.Table] = []
                pending_rows = 0
                for k in range(s.committed):
                    pending.append(_promote(pq.read_table(s.part_path(k)), schema))
                    pending_rows += pending[-1].num_rows
                    # small chunks are gathered into larger row groups; memory stays bounded by one group
                    if pending_rows >= _MERGE_ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(pending))
                        pending, pending_rows = [], 0
                if pending:
                    writer.write_table(pa.concat_tables(pending))

        atomic_write(s.path, write)


def _file_dicts(path: str, fmt: str) -> Iterator[dict]:
    """The rows of a (possibly gzip) JSON Lines file written by this module."""
    with open_binary(path, fmt) as f:
        for line in f:
            yield json.loads(line)


def _spool_rows(spool: IO[bytes]) -> Iterator[dict]:
    """The rows of a spool file, read at an own offset so that appends between reads are not disturbed."""
    pos, tail = 0, b""
    while True:
        spool.seek(pos)
        block = spool.read(_BLOCK_BYTES)
        if not block:
            return
        pos += len(block)
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield json.loads(line)


# ----------------------------------------------------------------------------------------------------------- locking


class LockedError(RuntimeError):
    """Another process holds the lock of a run's output."""


class RunLock:
    """An exclusive, non-blocking lock on a run's files: ``fcntl.flock`` on ``path`` (``<output>.lock``), whose
    content names the holder (pid, host, command). The kernel releases a flock when its process ends in any way,
    ``kill -9`` included, so a stale lock file never blocks a resume; a clean exit also removes the file. A second
    run on the same output raises :class:`LockedError` naming the holder."""

    def __init__(self, path: str, holder: str = "") -> None:
        self.path = path
        self.holder = holder
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    held_by = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                finally:
                    os.close(fd)
                raise LockedError(f"{self.path} is locked by a run still going ({held_by}); wait for it to end, or "
                                  "give this run another --output") from None
            try:  # the holder before us may have removed the file after we opened it: lock the file now there
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}{': ' + self.holder if self.holder else ''}\n"
                 .encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it, so no one can be locking this inode as a live lock
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same inode (hard links too) or the same resolved path (symbolic
    links, ``..``), whether or not it exists yet."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


# ------------------------------------------------------------------------------------------------- several inputs


def file_stem(path: str) -> str:
    """A data file's name without its data extensions (``a/b.jsonl.gz`` -> ``b``)."""
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def read_inputs(paths: Sequence[str], num_shards: int = 1, shard_index: int = 0,
                start: int = 0) -> Iterator[Tuple[InputRow, Optional[str]]]:
    """Rows of one or more inputs, numbered across them; row i belongs to shard i % num_shards; the first
    ``start`` rows of the shard are skipped. With several inputs a row without ``subset`` gets its file's name
    (the second item of each pair; None for one input)."""
    _check_shard_args(num_shards, shard_index, start)
    offset, seen = 0, 0
    for path in paths:
        subset = file_stem(path) if len(paths) > 1 else None
        last = -1
        for item in read_rows(path):
            last = item.index
            index = offset + item.index
            if index % num_shards != shard_index and not item.damaged:  # every shard records the damage
                continue
            seen += 1
            if seen <= start:
                continue
            yield InputRow(index, item.row, item.error, item.damaged), subset
        offset += last + 1


@dataclass
class FilePlan:
    """One input file of a planned run: how to read it, where its rows start in the global numbering, its chunks."""

    path: str
    kind: str  # 'jsonl' (plain JSON Lines: seekable), 'gz' (gzip JSON Lines), 'parquet', 'array' (a JSON array)
    subset: Optional[str]  # the file's stem when there are several inputs (rows without 'subset' get it)
    offset: int  # global index of the file's first row
    rows: int  # rows of the file (before --limit)
    seeks: Optional[List[int]] = None  # plain JSON Lines: byte offset where each chunk of the file starts
    bytes_per_row: Optional[float] = None  # plain JSON Lines and Parquet (uncompressed): to size read tasks
    damage: Optional[str] = None  # a damaged gzip file: why reading stopped after its ``rows`` complete rows


@dataclass(frozen=True)
class Chunk:
    first: int  # global index of its first row (the chunk's name)
    rows: int
    file: int  # index into the plan's files


def plan_inputs(paths: Sequence[str], chunk_rows: int,
                limit: Optional[int] = None) -> Tuple[List[FilePlan], List[Chunk]]:
    """Scan the inputs once and cut them into chunks of ``chunk_rows`` rows that never span two files, numbered as
    :func:`read_inputs` numbers them (for engines that read chunks out of order).

    Parquet row counts come from the footers; a plain JSON Lines file is read line by line (no JSON parsing), noting
    the byte offset where each chunk starts; gzip is decompressed to count; a JSON array is parsed. A missing file
    or an unknown extension raises as :func:`read_rows` does. ``limit`` keeps the first ``limit`` rows of all inputs.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    files: List[FilePlan] = []
    chunks: List[Chunk] = []
    offset = 0
    for path in paths:
        if path == "-":
            raise ValueError("a planned run reads files, not standard input")
        if limit is not None and offset >= limit:
            break  # a streaming run never reads past --limit either
        kind, rows, seeks, size, damage = _scan(path, chunk_rows, None if limit is None else limit - offset)
        plan = FilePlan(path, kind, file_stem(path) if len(paths) > 1 else None, offset, rows, seeks,
                        size / rows if size is not None and rows else None, damage)
        files.append(plan)
        for local in range(0, rows, chunk_rows):
            first = offset + local
            n = min(chunk_rows, rows - local)
            if limit is not None:
                n = min(n, limit - first)
            if n <= 0:
                break
            chunks.append(Chunk(first, n, len(files) - 1))
        offset += rows
    return files, chunks


def _scan(path: str, chunk_rows: int, max_rows: Optional[int] = None) -> Tuple[str, int, Optional[List[int]], Any,
                                                                         Optional[str]]:
    """(kind, rows, chunk byte offsets, bytes of those rows, damage) of one input (JSON Lines: at most ``max_rows``).
    A damaged gzip file counts its complete rows and says, as :func:`read_rows` does, where and why reading stopped."""
    read_rows(path)  # raises now for a missing file or an unknown extension
    fmt = format_of(path)
    if fmt == "parquet":
        with pq.ParquetFile(path) as pf:
            meta = pf.metadata
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            return "parquet", meta.num_rows, None, size, None
    if path.lower().endswith((".json", ".json.gz")) and is_json_array(path, fmt):
        return "array", sum(1 for _ in read_rows(path)), None, None, None
    rows, end, seeks, damage = 0, 0, [], None
    with open_binary(path, fmt) as f:
        lines = _whole_lines(f, path) if fmt == "gz" else f
        try:
            for index, start, line in numbered_lines(lines):
                if max_rows is not None and rows >= max_rows:
                    break
                if rows % chunk_rows == 0:
                    seeks.append(start)
                rows += 1
                end = start + len(line)
        except DamagedInput as err:
            damage = f"damaged input: {path}: reading stopped at row {rows}: {err}; the rows before it were read"
    return fmt, rows, (seeks if fmt == "jsonl" else None), (end if fmt == "jsonl" else None), damage


def jsonl_rows_from(path: str, pos: int, first_local: int) -> Iterator[InputRow]:
    """The rows of a plain JSON Lines file from byte ``pos`` (the start of the file's row ``first_local``)."""
    with open(path, "rb") as f:
        f.seek(pos)
        for index, _, line in numbered_lines(f, first_local, at_start=pos == 0):
            yield parse_line(index, line)
