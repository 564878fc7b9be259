"""Scale out with Ray Data: the single-process engine on many workers (GPUs, nodes), same results.

Two ways in:

- :class:`Scorer`, a callable class for ``ray.data.Dataset.map_batches``: each actor loads the model once and turns
  batches of input rows into output rows with the command's :class:`endokern.pipeline.Task`, the same tokenization
  and the same per-row error handling as ``endokern score | compare | rank | filter`` (through
  :func:`endokern.pipeline.process_chunk`)::

      ds = ray.data.read_parquet("rows/")
      scored = ds.map_batches(Scorer, fn_constructor_kwargs={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                              compute=ray.data.ActorPoolStrategy(size=4),  # or concurrency=4 (Ray < 2.51)
                              num_gpus=1, batch_size=256, batch_format="pyarrow")

- :func:`run` (behind ``endokern ... --engine ray``): a resumable run from input files to a folder of Parquet
  files, one per chunk of ``chunk_rows`` input rows, with the same ids, values and errors file as one process.

How a run works
---------------

Row numbers. Ray Data does not number rows, and ids (``formats.row_id``) and error rows need each row's global index
exactly as :func:`endokern.pipeline.iter_inputs` counts it (across several files, blank lines not counted). So the
driver first scans the inputs once: Parquet row counts come from the file footers (free); a JSON Lines file is read
line by line (no JSON parsing) to count its rows and note the byte offset where each chunk starts; a gzip file is
decompressed to count; a JSON array is parsed (it is loaded whole anyway, as in one process). At a billion rows this
scan is one extra sequential read of the input on the driver (minutes for plain JSON Lines, longer for gzip) and
keeps one integer per chunk of a plain JSON Lines file (about 2 million offsets at 512 rows per chunk). The driver
also holds one small record per chunk (the plan, and the journal's entries with their error rows): a few hundred MB
at a billion rows of 512; a larger ``--chunk-rows`` divides that. With ``--limit`` the scan stops at the limit.
Chunks never span two files: chunk ``c`` of a file holds its rows ``[c * chunk_rows, (c + 1) * chunk_rows)``, named
by the global index of its first row (so with several inputs the chunks differ from one process's, which run across
file boundaries, unless each file's row count is a multiple of ``chunk_rows``).

Reading. A custom Ray Data datasource reads the pending chunks with :mod:`endokern.io`'s own parsing rules (a bad
line becomes an error row, exactly as in one process), one block per chunk: a read task per chunk (seeking to the
chunk's byte offset in plain JSON Lines, skipping whole row groups in Parquet) until there are more than 4096
chunks to read, then runs of consecutive chunks under 32 MiB per task; gzip files and JSON arrays are read by one
task per file (Ray then merges their chunks into blocks of up to its target block size: fewer, later commits).
Reads run on the driver's node, so the inputs need not be visible to the other nodes; the scoring actors get the
rows through Ray's object store.

Scoring. :class:`Scorer` actors (a fixed pool of ``num_workers``, ``num_gpus`` each) score each chunk as one
unit with :func:`endokern.pipeline.process_chunk`, as a single process does with the same ``chunk_rows``: the same
chunk gives the same batches, hence the same floats.

Writing. Only the driver writes. As each chunk's results come back it writes ``<output>/part-<first row>.parquet``
(and ``<rejected>/part-<first row>.parquet`` for filter), each under a temporary name then renamed, and only then
appends the chunk to a journal (``<output>/_endokern/progress.jsonl``, fsynced) with its row count and error rows.
At the end the errors file (JSON Lines beside the output, as in one process) is written from the journal in input
order. Folders whose names start with ``_`` are skipped by Parquet dataset readers (pyarrow, pandas, Ray, Spark), so
``<output>`` reads as one dataset.

Resume. The run's arguments are kept in ``<output>/_endokern/run.json``; a later run with other arguments is
refused unless ``overwrite``. A later run with the same arguments keeps every chunk that the journal records and
whose part files exist, deletes part files of chunks it does not keep (a run killed after writing a part but
before its journal line, or a part deleted by hand is scored again), and scores only the other chunks. The number
of workers is not part of the arguments: a run can resume with more or fewer workers, or on another cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

try:
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ImportError as _err:  # pragma: no cover - exercised only without ray
    raise ImportError("endokern's Ray integration needs Ray Data: pip install 'endokern[ray]'") from _err

from .. import formats
from .. import io as eio
from ..pipeline import RunStats, make_task, process_chunk

__all__ = ["Scorer", "run", "plan_inputs", "read_output", "cli_main"]

STATE_DIR = "_endokern"  # inside the output folder; '_' makes Parquet dataset readers skip it
RUN_FILE = "run.json"
JOURNAL = "progress.jsonl"
STATE_VERSION = 1
_PART = re.compile(r"^part-(\d{12})\.parquet$")
_ENVELOPE = ("_chunk", "_row", "_subset", "_payload")  # what the reader hands the Scorer in a run
_BOM = b"\xef\xbb\xbf"
_SCORER_OPTIONS = (
    "device", "dtype", "alpha", "gamma", "terminal", "reduce", "backend", "batch_tokens", "packing", "template",
    "system", "append_eos", "max_length", "per_token", "min_reward", "keep_scored", "torch_threads", "index_column",
)


def part_name(chunk: int) -> str:
    """The file name of a chunk's part: its first row's global index, zero-padded so that names sort by row."""
    return f"part-{chunk:012d}.parquet"


# ---------------------------------------------------------------------------------------------------------- the scorer


class Scorer:
    """A callable class for ``Dataset.map_batches``: loads the model once per actor, then scores batches.

    ``model`` and the reward settings are those of :meth:`endokern.EndoRM.from_pretrained`; ``command`` is ``score``,
    ``compare``, ``rank`` or ``filter``; ``template``, ``system``, ``append_eos`` and ``max_length`` are the
    command-line options of the same names; ``per_token`` (score) adds token rewards; ``min_reward`` (filter) is the
    threshold; ``torch_threads`` sets the actor's CPU threads (Ray gives an actor one thread per reserved CPU).

    A batch of plain rows (a ``pyarrow.Table``, a pandas ``DataFrame`` or a dict of NumPy arrays, with the columns the
    command reads, e.g. ``prompt`` and ``response``) is scored as one chunk and comes back as a ``pyarrow.Table`` with
    the rows of every stream, each with a ``stream`` column (``output``; ``rejected`` for filter; ``errors`` for rows
    that cannot be scored, with ``row`` and ``reason``), each stream in input order. Rows without an ``id`` are
    numbered by ``index_column`` when given, else by their place in the batch (which Ray does not make global).

    In a run (:func:`run`) the batches are chunks made by the run's reader, and the results go back to the driver
    whole (pickled), so that the files hold exactly what a single process writes.
    """

    def __init__(
        self,
        model: str,
        command: str = "score",
        *,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        alpha: float = 1.0,
        gamma: float = 1.0,
        terminal: str = "zero",
        reduce: str = "sum",
        backend: str = "auto",
        batch_tokens: Optional[int] = None,
        packing: Any = "auto",
        template: str = "auto",
        system: Optional[str] = None,
        append_eos: bool = False,
        max_length: Optional[int] = None,
        per_token: bool = False,
        min_reward: Optional[float] = None,
        keep_scored: bool = False,
        torch_threads: Optional[int] = None,
        index_column: Optional[str] = None,
    ):
        import torch

        from ..model import EndoRM
        from ..tokenization import resolve_template

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        packing = {"on": True, "off": False}.get(packing, packing) if isinstance(packing, str) else packing
        self.rm = EndoRM.from_pretrained(
            model, device=device, dtype=dtype, alpha=alpha, gamma=gamma, terminal=terminal, reduce=reduce,
            backend=backend, batch_tokens=batch_tokens, packing=packing,
        )
        # compare needs the resolved template (HH-RLHF transcripts become messages with a chat template)
        task_template = resolve_template(self.rm.tokenizer, template) if command == "compare" else template
        self.task = make_task(command, template=task_template, per_token=per_token, min_reward=min_reward,
                              keep_scored=keep_scored)
        self.encoder = self.rm.encoder(template, system=system, append_eos=append_eos)
        self.max_length = max_length
        self.index_column = index_column

    def __call__(self, batch: Any) -> pa.Table:
        table = _as_table(batch)
        if all(name in table.column_names for name in _ENVELOPE):
            return self._score_chunks(table)
        return self._score_rows(table)

    def _score_rows(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        if self.index_column is not None and self.index_column in table.column_names:
            indexes = [int(i) for i in table.column(self.index_column).to_pylist()]
        else:
            indexes = list(range(len(rows)))
        chunk = [(eio.InputRow(i, row, None), None) for i, row in zip(indexes, rows)]
        streams = process_chunk(self.rm, self.task, self.encoder, chunk, self.max_length)
        out = [dict(r, stream=name) for name in ("output", "rejected", "errors") for r in streams.get(name, [])]
        if not out:
            return pa.table({"stream": pa.array([], pa.string())})
        return eio._table_from_rows(out)

    def _score_chunks(self, table: pa.Table) -> pa.Table:
        """Envelope rows of a run (one chunk or more, possibly a piece of one) -> one result row per chunk piece."""
        chunks = table.column("_chunk").to_pylist()
        rows = table.column("_row").to_pylist()
        subsets = table.column("_subset").to_pylist()
        payloads = table.column("_payload").to_pylist()
        groups: Dict[int, List[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault(c, []).append(i)
        out = {"_chunk": [], "_first": [], "_rows": [], "_payload": []}
        for c, positions in groups.items():
            positions.sort(key=lambda i: rows[i])
            items = []
            for i in positions:
                row, error = pickle.loads(payloads[i])
                items.append((eio.InputRow(rows[i], row, error), subsets[i]))
            stats = RunStats()
            streams = process_chunk(self.rm, self.task, self.encoder, items, self.max_length, stats=stats)
            result = {"streams": streams, "examples": stats.examples, "tokens": stats.tokens}
            out["_chunk"].append(c)
            out["_first"].append(rows[positions[0]])
            out["_rows"].append(len(items))
            out["_payload"].append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return pa.table({
            "_chunk": pa.array(out["_chunk"], pa.int64()), "_first": pa.array(out["_first"], pa.int64()),
            "_rows": pa.array(out["_rows"], pa.int64()), "_payload": pa.array(out["_payload"], pa.binary()),
        })


def _as_table(batch: Any) -> pa.Table:
    """A batch in any of Ray Data's formats as a pyarrow Table of plain Python values."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        names = list(batch)
        columns = [_native(list(batch[n])) for n in names]
        return pa.Table.from_pylist([dict(zip(names, values)) for values in zip(*columns)]) if names else pa.table({})
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - ray[data] brings pandas
        pd = None
    if pd is not None and isinstance(batch, pd.DataFrame):
        return pa.Table.from_pylist([_native(r) for r in batch.to_dict(orient="records")])
    raise TypeError(f"a batch must be a pyarrow.Table, a pandas DataFrame or a dict of arrays, got {type(batch)}")


def _native(value: Any) -> Any:
    """NumPy scalars and arrays (as Ray's NumPy batches hold them) as Python values and lists."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, np.ndarray):
        return [_native(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_native(v) for v in value]
    if isinstance(value, dict):
        return {k: _native(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------- the inputs


@dataclass
class FilePlan:
    """One input file of a run: how to read it, where its rows start in the global numbering, its chunks."""

    path: str
    kind: str  # 'jsonl' (plain JSON Lines: seekable), 'gz' (gzip JSON Lines), 'parquet', 'array' (a JSON array)
    subset: Optional[str]  # the file's stem when there are several inputs (rows without 'subset' get it)
    offset: int  # global index of the file's first row
    rows: int  # rows of the file (before --limit)
    seeks: Optional[List[int]] = None  # plain JSON Lines: byte offset where each chunk of the file starts
    bytes_per_row: Optional[float] = None  # plain JSON Lines and Parquet (uncompressed): to size the read tasks


@dataclass(frozen=True)
class Chunk:
    first: int  # global index of its first row (the chunk's name)
    rows: int
    file: int  # index into the plan's files


def plan_inputs(
    paths: Sequence[str], chunk_rows: int, limit: Optional[int] = None
) -> Tuple[List[FilePlan], List[Chunk]]:
    """Scan the inputs once (see the module doc for the cost) and cut them into chunks that never span two files.

    Errors are those of one process: a missing file or an unknown extension raises; a JSON array that is not
    valid JSON raises ``ValueError``. ``limit`` keeps the first ``limit`` rows of all inputs together.
    """
    from ..pipeline import file_stem

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    files: List[FilePlan] = []
    chunks: List[Chunk] = []
    offset = 0
    for path in paths:
        if path == "-":
            raise ValueError("a Ray run reads files, not standard input")
        if limit is not None and offset >= limit:
            break  # one process never reads past --limit either
        kind, rows, seeks, size = _scan(path, chunk_rows, None if limit is None else limit - offset)
        plan = FilePlan(path, kind, file_stem(path) if len(paths) > 1 else None, offset, rows, seeks,
                        size / rows if size is not None and rows else None)
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


def _scan(path: str, chunk_rows: int, max_rows: Optional[int] = None) -> Tuple[str, int, Optional[List[int]], Any]:
    """(kind, rows, chunk byte offsets, bytes of those rows) of one input, counting rows exactly as
    :func:`endokern.io.read_rows` (JSON Lines: at most ``max_rows``, which is all a run with ``--limit`` needs)."""
    eio.read_rows(path)  # raises now for a missing file or an unknown extension, with one process's message
    fmt = eio._format_of(path)
    if fmt == "parquet":
        with pq.ParquetFile(path) as pf:
            meta = pf.metadata
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            return "parquet", meta.num_rows, None, size
    if path.lower().endswith((".json", ".json.gz")) and eio._starts_with_bracket(path, fmt):
        return "array", sum(1 for _ in eio.read_rows(path)), None, None
    rows, pos, seeks = 0, 0, []
    with eio._open_binary(path, fmt) as f:
        for n, line in enumerate(f):
            start = pos
            pos += len(line)
            if n == 0:
                line = line.removeprefix(_BOM)
            if not line.strip():  # blank lines are not rows (as io._jsonl_rows counts them)
                continue
            if max_rows is not None and rows >= max_rows:
                break
            if rows % chunk_rows == 0:
                seeks.append(start)
            rows += 1
    return fmt, rows, (seeks if fmt == "jsonl" else None), (pos if fmt == "jsonl" else None)


def _jsonl_from(path: str, pos: int, first_local: int) -> Iterator[eio.InputRow]:
    """The rows of a plain JSON Lines file from byte ``pos`` (the start of local row ``first_local``)."""
    with open(path, "rb") as f:
        f.seek(pos)
        index = first_local
        for n, line in enumerate(f):
            if pos == 0 and n == 0:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            yield eio._parse_line(index, line)
            index += 1


def _read_blocks(plan: FilePlan, chunks: List[Tuple[int, int]], chunk_rows: int, pos: int = 0) -> Iterator[pa.Table]:
    """A read task: one envelope block per wanted chunk (``(first, rows)`` pairs of one file, in order); a plain JSON
    Lines file is read from byte ``pos``, where the first wanted chunk starts."""
    wanted = dict(chunks)
    first_local = chunks[0][0] - plan.offset
    if plan.kind == "jsonl":
        items: Iterable[eio.InputRow] = _jsonl_from(plan.path, pos, first_local)
    else:  # Parquet skips whole row groups before the start; gzip and arrays are read from their beginning
        items = eio.read_rows(plan.path, start=first_local)
    buffer: List[eio.InputRow] = []
    current = None
    left = len(wanted)
    for item in items:
        chunk = plan.offset + item.index - item.index % chunk_rows
        n = wanted.get(chunk)
        if n is None or item.index - (chunk - plan.offset) >= n:
            continue  # a chunk done earlier, or rows past --limit
        if chunk != current:
            buffer, current = [], chunk
        buffer.append(item)
        if len(buffer) == n:
            yield _envelope(plan, chunk, buffer)
            left -= 1
            buffer = []
            if left == 0:
                return
    if left:
        raise RuntimeError(f"{plan.path} has fewer rows than when the run was planned: was it changed?")


def _envelope(plan: FilePlan, chunk: int, items: List[eio.InputRow]) -> pa.Table:
    n = len(items)
    return pa.table({
        "_chunk": pa.array([chunk] * n, pa.int64()),
        "_row": pa.array([plan.offset + it.index for it in items], pa.int64()),
        "_subset": pa.array([plan.subset] * n, pa.string()),
        "_payload": pa.array([pickle.dumps((it.row, it.error), protocol=pickle.HIGHEST_PROTOCOL) for it in items],
                             pa.binary()),
    })


def _metadata(rows: int, path: str) -> BlockMetadata:
    """BlockMetadata across Ray versions (older ones also take a schema)."""
    try:
        return BlockMetadata(num_rows=rows, size_bytes=None, input_files=[path], exec_stats=None)
    except TypeError:  # pragma: no cover - Ray < 2.44
        return BlockMetadata(num_rows=rows, size_bytes=None, schema=None, input_files=[path], exec_stats=None)


class _InputSource(Datasource):
    """The pending chunks of a run's inputs, read on the driver's node with endokern's own readers.

    Ray Data makes one block of what a read task yields (it merges small tables up to its target block size), and an
    actor scores one block per call, whose results reach the driver together. So a read task covers one chunk
    (a chunk is then one block: results come back, and are committed, chunk by chunk, and the actors share the
    work evenly) until there are more than ``max_tasks`` chunks to read; then consecutive chunks of a plain JSON
    Lines or Parquet file share a task, as long as the task stays under ``max_task_bytes`` of input. A gzip file or a
    JSON array is one task (it cannot be entered midway). The run asks Ray for exactly as many blocks as there are
    tasks: Ray splits the blocks of a read that yields fewer than it wants, and a chunk split in pieces is scored in
    pieces, in other batches than one process uses (the same rows; the last bits of the floats may differ).
    """

    def __init__(self, files: List[FilePlan], chunks: List[Chunk], chunk_rows: int, max_tasks: int = 4096,
                 max_task_bytes: int = 32 << 20):
        super().__init__()
        self.files, self.chunk_rows = files, chunk_rows
        wanted = max(1, math.ceil(len(chunks) / max_tasks))
        self.runs: List[List[Chunk]] = []
        for chunk in chunks:
            plan = files[chunk.file]
            chunk_bytes = max(1, int((plan.bytes_per_row or 0) * chunk_rows))
            per_task = max(1, min(wanted, max_task_bytes // chunk_bytes))
            last = self.runs[-1][-1] if self.runs else None
            seekable = plan.kind in ("jsonl", "parquet")
            same_file = last is not None and last.file == chunk.file
            contiguous = same_file and last.first + last.rows == chunk.first
            if same_file and (not seekable or (contiguous and len(self.runs[-1]) < per_task)):
                self.runs[-1].append(chunk)
            else:
                self.runs.append([chunk])

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # the inputs are the driver's files: read them on its node

    def get_name(self) -> str:
        return "EndokernInput"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> List[ReadTask]:
        tasks = []
        for run_chunks in self.runs:
            plan = self.files[run_chunks[0].file]
            pairs = [(c.first, c.rows) for c in run_chunks]
            pos = plan.seeks[(pairs[0][0] - plan.offset) // self.chunk_rows] if plan.kind == "jsonl" else 0
            # each task carries its byte offset, not the file's list of them (2 million at a billion rows)
            slim = dataclasses.replace(plan, seeks=None)
            read = functools.partial(_read_blocks, slim, pairs, self.chunk_rows, pos)
            tasks.append(ReadTask(read, _metadata(sum(c.rows for c in run_chunks), plan.path)))
        return tasks


# ---------------------------------------------------------------------------------------------------------- the output


class _Folder:
    """The output folder(s) of a run, its journal and its resume logic (see the module doc)."""

    def __init__(self, state_dir: str, streams: Dict[str, str], errors: str, run_key: dict, overwrite: bool,
                 folders: Sequence[str] = ()):
        self.state_dir = state_dir
        self.streams = streams  # stream name -> folder of its part files ('errors' is not among them)
        # every folder the run writes parts to (filter --top-fraction writes the final ones after scoring)
        self.folders = sorted(set(streams.values()) | set(folders))
        self.errors = errors
        self.run_key = json.loads(json.dumps(run_key, allow_nan=True))
        self.run_file = os.path.join(state_dir, RUN_FILE)
        self.journal = os.path.join(state_dir, JOURNAL)
        self.entries: List[dict] = []
        if overwrite:
            self._clear()
        if os.path.exists(self.run_file):
            self._check_same_run()
            self.entries = self._read_journal()
        else:
            self._start()

    # -- opening

    def _clear(self) -> None:
        for folder in self.folders:
            for name in _listdir(folder):
                if _PART.match(name) or name.endswith(".parquet.tmp"):
                    os.remove(os.path.join(folder, name))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if os.path.exists(self.errors):
            os.remove(self.errors)

    def _start(self) -> None:
        for folder in self.folders:
            present = [n for n in _listdir(folder) if n != STATE_DIR]
            foreign = sorted(n for n in present if not _PART.match(n))
            if foreign:
                raise FileExistsError(
                    f"{folder} holds other files than endokern's ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}) and no endokern run: pick another folder")
            if present:
                raise FileExistsError(f"{folder} holds part files but no endokern run; --overwrite replaces them")
        if os.path.exists(self.errors):
            raise FileExistsError(f"{self.errors} exists and no run of this output was found; pass --overwrite")
        os.makedirs(self.state_dir, exist_ok=True)
        for folder in self.folders:
            os.makedirs(folder, exist_ok=True)
        open(self.journal, "wb").close()
        state = {"version": STATE_VERSION, "run_key": self.run_key,
                 "streams": {name: os.path.abspath(p) for name, p in self.streams.items()},
                 "errors": os.path.abspath(self.errors)}
        _atomic_write(self.run_file, (json.dumps(state, indent=1, allow_nan=True) + "\n").encode())

    def _check_same_run(self) -> None:
        try:
            with open(self.run_file, encoding="utf-8") as f:
                state = json.load(f)
        except ValueError as e:
            raise ValueError(f"{self.run_file} is unreadable ({e}); pass --overwrite to start over") from e
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.run_file} has version {state.get('version')!r}, this endokern writes "
                             f"{STATE_VERSION}; pass --overwrite to start over")
        old, new = state.get("run_key") or {}, self.run_key
        differ = [
            f"{k} ({json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))})"
            for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k, "<unset>"), sort_keys=True) != json.dumps(new.get(k, "<unset>"), sort_keys=True)
        ]
        if differ:
            raise ValueError(f"{self.run_file} belongs to a run with other arguments: {', '.join(differ)}; rerun "
                             "with the same arguments to resume it, or pass --overwrite to start over")
        streams = {name: os.path.abspath(p) for name, p in self.streams.items()}
        if state.get("streams") != streams or state.get("errors") != os.path.abspath(self.errors):
            raise ValueError(f"{self.run_file} belongs to a run with other outputs ({state.get('streams')}, errors "
                             f"{state.get('errors')}); rerun with the same outputs or pass --overwrite")

    def _read_journal(self) -> List[dict]:
        """The journal's entries; a last line without its newline (cut by a kill) was not committed: cut off."""
        with open(self.journal, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1
        entries = []
        for k, line in enumerate(data[:good].splitlines()):
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{self.journal} line {k + 1} is unreadable; pass --overwrite to start over") from None
        if good != len(data):
            with open(self.journal, "r+b") as f:
                f.truncate(good)
        return entries

    def settle(self, chunks: List[Chunk]) -> Dict[int, dict]:
        """The committed chunks still whole on disk (by first row); every other part file is removed."""
        planned = {c.first: c.rows for c in chunks}
        present = {name: set(_listdir(folder)) for name, folder in self.streams.items()}
        done: Dict[int, dict] = {}
        for entry in self.entries:
            c = entry.get("chunk")
            whole = planned.get(c) == entry.get("rows") and all(
                part_name(c) in present.get(name, ()) for name, count in entry.get("parts", {}).items() if count)
            if whole and c not in done:
                done[c] = entry
        for name, folder in self.streams.items():
            for f in present[name]:
                m = _PART.match(f)
                keep = m is not None and done.get(int(m.group(1)), {}).get("parts", {}).get(name, 0) > 0
                if not keep and (m is not None or f.endswith(".parquet.tmp")):
                    os.remove(os.path.join(folder, f))
        if len(done) != len(self.entries):
            self.entries = [done[c] for c in sorted(done)]
            _atomic_write(self.journal, b"".join(_journal_line(e) for e in self.entries))
        return done

    # -- writing

    def commit(self, chunk: int, rows: int, streams: Dict[str, List[dict]], examples: int, tokens: int) -> dict:
        parts: Dict[str, int] = {}
        for name, folder in self.streams.items():
            out = streams.get(name) or []
            if not out:
                continue
            try:
                table = eio._table_from_rows(out)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ValueError(f"stream {name!r}: these rows cannot be stored in Parquet: {e}") from None
            path = os.path.join(folder, part_name(chunk))
            with open(path + ".tmp", "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            eio._replace(path + ".tmp", path)
            parts[name] = len(out)
        entry = {"chunk": chunk, "rows": rows, "parts": parts, "errors": streams.get("errors", []),
                 "examples": examples, "tokens": tokens}
        line = _journal_line(entry)  # raises before anything is appended when an error row is not JSON-able
        with open(self.journal, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
        return entry

    def write_errors(self, done: Dict[int, dict]) -> int:
        """The errors file from the journal, in input order (byte for byte what one process writes)."""
        rows = [e for c in sorted(done) for e in done[c]["errors"]]
        eio.write_rows(self.errors, rows)
        return len(rows)


def _journal_line(entry: dict) -> bytes:
    return (json.dumps(entry, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _atomic_write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    eio._replace(path + ".tmp", path)


def part_files(folder: str) -> List[str]:
    """The part files of an output folder, in input order."""
    return [os.path.join(folder, n) for n in sorted(_listdir(folder)) if _PART.match(n)]


def read_output(folder: str, columns: Optional[List[str]] = None) -> Iterator[dict]:
    """The rows of an output folder, in input order, as dicts (keys a part lacks are left out, as in JSON Lines)."""
    for path in part_files(folder):
        for row in pq.read_table(path, columns=columns).to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


# ------------------------------------------------------------------------------------------------------------- the run


def connect(address: Optional[str] = None, **init_kwargs: Any) -> bool:
    """Connect to a Ray cluster (``address``: ``host:port``, ``auto``, or None for ``RAY_ADDRESS``, a cluster started
    on this machine with ``ray start``, else a new local one); True when this call started Ray (shut it down later)."""
    if ray.is_initialized():
        return False
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("logging_level", logging.WARNING)
    init_kwargs.setdefault("configure_logging", True)
    ray.init(address=address, **init_kwargs)
    return True


def run(
    inputs: Sequence[str],
    output: str,
    *,
    model: str,
    command: str = "score",
    errors: Optional[str] = None,
    rejected: Optional[str] = None,
    address: Optional[str] = None,
    num_workers: int = 1,
    num_gpus_per_worker: Optional[float] = None,
    num_cpus_per_worker: float = 1,
    chunk_rows: int = 512,
    limit: Optional[int] = None,
    overwrite: bool = False,
    run_key: Optional[dict] = None,
    progress: bool = True,
    **scorer_options: Any,
) -> RunStats:
    """Score ``inputs`` on a Ray cluster into the folder ``output`` (Parquet parts), resuming an earlier run of it.

    ``scorer_options`` are :class:`Scorer`'s (``alpha``, ``template``, ``max_length``, ``per_token``, ``min_reward``,
    ``keep_scored``...). Filter's rejected rows go to the folder ``rejected`` (default ``<output>.rejected``); with
    ``keep_scored`` every scored row goes to ``<output>/_endokern/scored`` instead (a later pass splits them). The
    errors go to ``errors`` (default: beside the output, ``.errors.jsonl``). ``num_gpus_per_worker`` defaults to 1
    when the cluster has GPUs, else 0. ``run_key`` (default: the options above that decide the output) is compared
    with the folder's: a run with another is refused unless ``overwrite``. When Ray is not initialized and there are
    rows to score, the run connects to ``address`` (see :func:`connect`) and shuts Ray down at its end.

    Returns the run's :class:`RunStats`: ``rows`` scored now, ``resumed_from`` rows found done, and in ``extra`` the
    workers, the chunks and ``first_chunk_s`` (startup: from the call to the first chunk written).
    """
    unknown = sorted(set(scorer_options) - set(_SCORER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; Scorer takes {list(_SCORER_OPTIONS)}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    started = time.perf_counter()
    output = output.rstrip("/\\") or output
    errors = errors or eio.errors_path_for(output)
    state_dir = os.path.join(output, STATE_DIR)
    streams = {"output": os.path.join(state_dir, "scored") if scorer_options.get("keep_scored") else output}
    folders = [output]
    if command == "filter":
        folders.append((rejected or output + ".rejected").rstrip("/\\"))
        if not scorer_options.get("keep_scored"):
            streams["rejected"] = folders[-1]
    if run_key is None:
        run_key = dict(scorer_options, command=command, model=model, chunk_rows=chunk_rows, limit=limit,
                       input=[os.path.abspath(p) for p in inputs])
    files, chunks = plan_inputs(inputs, chunk_rows, limit)
    folder = _Folder(state_dir, streams, errors, run_key, overwrite, folders)
    done = folder.settle(chunks)
    pending = [c for c in chunks if c.first not in done]
    stats = RunStats(resumed_from=sum(c.rows for c in chunks if c.first in done))
    stats.extra.update(workers=num_workers, chunks=len(chunks), chunks_scored=len(pending))
    ray_started = bool(pending) and connect(address)
    try:
        if pending:
            _score(files, pending, chunk_rows, folder, done, stats, model=model, command=command,
                   num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
                   num_cpus_per_worker=num_cpus_per_worker, progress=progress, started=started,
                   scorer_options=scorer_options)
    finally:
        if ray_started:
            ray.shutdown()
    stats.errors = sum(len(done[c.first]["errors"]) for c in pending if c.first in done)
    folder.write_errors(done)
    stats.seconds = time.perf_counter() - started
    stats.extra["errors_total"] = sum(len(e["errors"]) for e in done.values())
    return stats


def _score(files, pending, chunk_rows, folder, done, stats, *, model, command, num_workers, num_gpus_per_worker,
           num_cpus_per_worker, progress, started, scorer_options) -> None:
    """The Scorer options for the actors, then :func:`_execute`."""
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    options = dict(scorer_options)
    if os.path.exists(model):
        model = os.path.abspath(model)  # the actors may run in another directory
    options.setdefault("torch_threads", max(1, int(num_cpus_per_worker)))
    _execute(files, pending, chunk_rows, dict(options, model=model, command=command), folder, done, stats,
             num_workers=num_workers, num_gpus=num_gpus_per_worker, num_cpus=num_cpus_per_worker,
             progress=progress, desc=command, started=started)


def _execute(files, pending, chunk_rows, scorer_kwargs, folder, done, stats, *, num_workers, num_gpus, num_cpus,
             progress, desc, started) -> None:
    from tqdm.auto import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run's own bar counts committed rows
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not the executor's INFO lines
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    sizes = {c.first: c.rows for c in pending}
    remote = {"num_cpus": num_cpus}
    if num_gpus:
        remote["num_gpus"] = num_gpus
    # Reads reserve no CPU: with the actors holding every CPU (one worker per core) a read that waits for one would
    # never run. They are light (JSON parsing), run on the driver's node, and Ray Data's backpressure bounds them.
    source = _InputSource(files, pending, chunk_rows)
    # At most two reads at a time: each concurrent read task is a Python worker process of its own (it imports torch
    # through endokern), and unbounded zero-CPU reads made Ray start one per chunk: measured 66 s before the first
    # chunk of 32 on two cores, against 10 s for one chunk.
    ds = ray.data.read_datasource(source, num_cpus=0, concurrency=2, override_num_blocks=len(source.runs))
    # a fixed pool, one model per actor, loaded once; no more actors than chunks to score
    pool = ray.data.ActorPoolStrategy(size=min(num_workers, len(pending)))
    ds = ds.map_batches(Scorer, fn_constructor_kwargs=scorer_kwargs, compute=pool, batch_size=None,
                        batch_format="pyarrow", **remote)
    pieces: Dict[int, List[Tuple[int, int, dict]]] = {}
    bar = tqdm(total=sum(sizes.values()), desc=desc, unit="row", dynamic_ncols=True, disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for c, first, n, payload in zip(*(batch.column(k).to_pylist() for k in ("_chunk", "_first", "_rows",
                                                                                  "_payload"))):
                got = pieces.setdefault(c, [])
                got.append((first, n, pickle.loads(payload)))
                if sum(p[1] for p in got) < sizes[c]:
                    continue  # Ray split the chunk's block: wait for the rest
                del pieces[c]
                got.sort(key=lambda p: p[0])
                streams: Dict[str, List[dict]] = {}
                for _, _, result in got:
                    for name, rows in result["streams"].items():
                        streams.setdefault(name, []).extend(rows)
                if len(got) > 1:  # each piece lists its errors in order; the pieces' outputs follow piece order
                    streams["errors"].sort(key=lambda e: e["row"])
                examples = sum(p[2]["examples"] for p in got)
                tokens = sum(p[2]["tokens"] for p in got)
                done[c] = folder.commit(c, sizes[c], streams, examples, tokens)
                if "first_chunk_s" not in stats.extra:
                    stats.extra["first_chunk_s"] = round(time.perf_counter() - started, 3)
                stats.rows += sizes[c]
                stats.examples += examples
                stats.tokens += tokens
                bar.update(sizes[c])
    finally:
        bar.close()
    if pieces:
        raise RuntimeError(f"the run ended with {len(pieces)} chunk(s) incomplete; rerun to resume")


# ----------------------------------------------------------------------------------------------- filter --top-fraction


def split_top_fraction(scored: str, output: str, rejected: str, top_fraction: float,
                       min_reward: Optional[float]) -> Tuple[List[float], List[float], float, int]:
    """Keep the top ``top_fraction`` of the scored rows (and at least ``min_reward``), chunk by chunk, as one process
    does; returns the kept and the rejected rewards, the threshold and the number of scored rows."""
    import numpy as np

    parts = part_files(scored)
    rewards = [pq.read_table(p, columns=["reward"]).column("reward").to_numpy(zero_copy_only=False) for p in parts]
    values = np.concatenate(rewards).astype(np.float64) if rewards else np.zeros(0)
    n = len(values)
    if n:
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top-fraction must be in (0, 1], got {top_fraction}")
        keep = max(1, int(round(top_fraction * n)))
        threshold = float(np.partition(values, n - keep)[n - keep])  # = sorted(rewards, reverse=True)[keep - 1]
    else:
        threshold = float("inf")
    for folder in (output, rejected):
        os.makedirs(folder, exist_ok=True)
        for name in _listdir(folder):
            if _PART.match(name):
                os.remove(os.path.join(folder, name))
    kept_rewards: List[float] = []
    dropped_rewards: List[float] = []
    for path in parts:
        table = pq.read_table(path)
        keep_mask, reasons = [], []
        for r in table.column("reward").to_pylist():
            if r < threshold:
                reasons.append(f"reward {r:.6g} below the top-fraction threshold {threshold:.6g}")
            elif min_reward is not None and r < min_reward:
                reasons.append(f"reward {r:.6g} < min-reward {min_reward:g}")
            else:
                reasons.append(None)
            keep_mask.append(reasons[-1] is None)
            (kept_rewards if keep_mask[-1] else dropped_rewards).append(r)
        mask = pa.array(keep_mask, pa.bool_())
        kept = table.filter(mask)
        dropped = table.filter(pc.invert(mask))
        dropped = dropped.append_column("reason", pa.array([x for x in reasons if x is not None], pa.string()))
        for folder, part in ((output, kept), (rejected, dropped)):
            if part.num_rows:
                target = os.path.join(folder, os.path.basename(path))
                with open(target + ".tmp", "wb") as f:
                    pq.write_table(part, f)
                eio._replace(target + ".tmp", target)
    return kept_rewards, dropped_rewards, threshold, n


# ---------------------------------------------------------------------------------------------------- the command line


def cli_main(args: Any) -> int:
    """``endokern score | compare | rank | filter --engine ray``: :func:`run` with the command's options."""
    from .. import cli

    command = args.command
    out = args.output.rstrip("/\\") or args.output
    if out == "-":
        raise SystemExit(f"endokern {command}: --engine ray writes a folder of Parquet files; give --output DIR")
    if out.lower().endswith(tuple(e for e in cli.OUTPUT_EXTENSIONS if e != ".parquet")):
        raise SystemExit(f"endokern {command}: --engine ray writes a folder of Parquet files, not {out}; "
                         "give --output DIR")
    if "-" in args.input:
        raise SystemExit(f"endokern {command}: --engine ray reads files, not standard input")
    if args.num_shards != 1 or args.shard_index != 0:
        raise SystemExit(f"endokern {command}: --engine ray spreads the rows over its workers itself; "
                         "leave out --num-shards and --shard-index")
    if args.num_workers < 1:
        raise SystemExit(f"endokern {command}: --num-workers must be >= 1")
    extra: Dict[str, Any] = {}
    options: Dict[str, Any] = dict(
        device=args.device, dtype=args.dtype, alpha=args.alpha, gamma=args.gamma, terminal=args.terminal,
        reduce=args.reduce, backend=args.backend, batch_tokens=args.batch_tokens, packing=args.packing,
        template=args.template, system=args.system, append_eos=args.append_eos, max_length=args.max_length,
    )
    top_fraction = None
    if command == "score":
        options["per_token"] = extra["per_token"] = args.per_token
    if command == "filter":
        if args.min_reward is None and args.top_fraction is None:
            raise SystemExit("endokern filter: give --min-reward, --top-fraction, or both")
        if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
            raise SystemExit(f"endokern filter: --top-fraction must be in (0, 1], got {args.top_fraction}")
        extra.update(min_reward=args.min_reward, top_fraction=args.top_fraction)
        top_fraction = args.top_fraction
        if top_fraction is None:
            options["min_reward"] = args.min_reward
        else:
            options["keep_scored"] = True
    errors = args.errors or cli._beside(out, ".errors.jsonl")
    rejected = (getattr(args, "rejected", None) or cli._beside(out, ".rejected")).rstrip("/\\")
    key = cli._run_key(args, engine="ray", **extra)
    stats = run(
        args.input, out, model=args.model, command=command, errors=errors, rejected=rejected, address=args.address,
        num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
        num_cpus_per_worker=args.num_cpus_per_worker, chunk_rows=args.chunk_rows, limit=args.limit,
        overwrite=args.overwrite, run_key=key, progress=not args.no_progress, **options,
    )
    if stats.resumed_from and stats.rows:
        print(f"endokern: resumed: {stats.resumed_from} rows were done, {stats.rows} scored now", file=sys.stderr)
    elif stats.resumed_from:
        print(f"endokern: {out} is already complete (use --overwrite to redo it)", file=sys.stderr)
    cli._report(stats, {"errors": errors})
    print(f"endokern: output in {out}/ (Parquet, one part per chunk of {args.chunk_rows} rows)", file=sys.stderr)
    if command == "compare":
        rows = list(read_output(out))
        summary = formats.summarize_preferences(rows)
        summary["errors"] = sum(1 for _ in eio.read_rows(errors)) if os.path.exists(errors) else 0
        summary["run"] = stats.as_dict()
        summary_path = args.summary or cli._beside(out, ".summary.json")
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(cli.format_summary(summary), file=sys.stderr)
        print(f"endokern: summary in {summary_path}", file=sys.stderr)
    if command == "filter":
        if top_fraction is not None:
            kept, dropped, threshold, n = split_top_fraction(os.path.join(out, STATE_DIR, "scored"), out, rejected,
                                                             top_fraction, args.min_reward)
            print(f"endokern: kept {len(kept)} of {n} scored rows (threshold {threshold:.6g}); rejected rows in "
                  f"{rejected}/", file=sys.stderr)
            thresholds = {"top-fraction threshold": threshold, "min-reward": args.min_reward}
        elif args.plot:
            kept = [r["reward"] for r in read_output(out, ["reward"])]
            dropped = [r["reward"] for r in read_output(rejected, ["reward"])]
            thresholds = {"min-reward": args.min_reward}
        if args.plot:
            cli._filter_plot(args, kept, dropped, thresholds)
    return 0
