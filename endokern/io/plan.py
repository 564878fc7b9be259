"""Chunk planning for an engine that reads chunks out of order (the Ray engine): one scan of the inputs cuts them
into chunks that never span two files, numbered as :func:`endokern.io.read_inputs` numbers the rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq

from .paths import file_stem, format_of
from .readers import (DamagedInput, InputRow, _whole_lines, is_json_array, numbered_lines, open_binary, parse_line,
                      read_rows)


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
