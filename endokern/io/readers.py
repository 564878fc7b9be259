"""Streaming readers of a run's inputs: JSON Lines (plain or gzip), Parquet, JSON arrays and standard input, one
shard at a time, numbered across several inputs by one rule (:func:`numbered_lines`: blank lines are not rows), with
every row that cannot be read given as an error row instead of an exception."""

from __future__ import annotations

import errno
import gzip
import json
import os
import sys
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from .paths import file_stem, format_of

_BOM = b"\xef\xbb\xbf"
_READ_BATCH_ROWS = 1024  # Parquet rows decoded at a time when reading
_BLOCK_BYTES = 1 << 20  # read size for peeking into files and reading spools


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
