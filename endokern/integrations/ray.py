"""The Ray engine: the same run as one process, on many workers (GPUs, nodes), same results.

Two ways in:

- ``endokern.run(Settings(..., engine="ray"))`` (``endokern score | compare | rank | filter --engine ray``):
  :func:`execute` scores the rows of :func:`endokern.runs.run` on a Ray cluster into a folder of Parquet parts, one per
  chunk of ``chunk_rows`` input rows, resumable, with the same ids, values and errors file as one process.
- :class:`Scorer`, a callable class for ``ray.data.Dataset.map_batches`` in a user's own pipeline: each actor loads
  the model once and turns batches of input rows into output rows through the command's task, with the same
  tokenization and per-row errors (:class:`endokern.pipeline.RowScorer`)::

      ds = ray.data.read_parquet("rows/")
      scored = ds.map_batches(Scorer, fn_constructor_kwargs={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                              compute=ray.data.ActorPoolStrategy(size=4),  # or concurrency=4 (Ray < 2.51)
                              num_gpus=1, batch_size=256, batch_format="pyarrow")

This module holds only what needs Ray; the files are :mod:`endokern.io`'s (the plan of chunks) and
:mod:`endokern.parts`' (the parts writer).

Row numbers. Ray Data does not number rows, and ids and error rows need each row's global index as one process counts
it, so the driver first plans the inputs with :func:`endokern.io.plan_inputs` (one scan: Parquet footers, a line count
of JSON Lines with each chunk's byte offset, gzip decompressed, JSON arrays parsed; it stops at ``--limit``). Chunks
never span two files (with several inputs they differ from one process's, which run across file boundaries, unless
each file's row count is a multiple of ``chunk_rows``).

Reading. A custom datasource reads the pending chunks with :mod:`endokern.io`'s parsing rules (a bad line becomes an
error row), one block per chunk: a read task per chunk (seeking to the chunk's byte offset in plain JSON Lines,
skipping whole row groups in Parquet) until there are more than 4096 chunks to read, then runs of consecutive chunks
under 32 MiB per task; gzip files and JSON arrays are read by one task per file. Reads run on the driver's node, so the
inputs need not be visible to the other nodes; the actors get the rows through Ray's object store.

Scoring. :class:`Scorer` actors (a fixed pool of ``num_workers``, ``num_gpus`` each) score each chunk as one unit
with :class:`endokern.pipeline.RowScorer`, as a single process does with the same ``chunk_rows``: the same chunk
gives the same batches, hence the same floats.

Writing. Only the driver writes, through :class:`endokern.parts.PartsWriter`: as each chunk's results come back it
writes ``<output>/part-<first row>.parquet`` (and ``<rejected>/part-...`` for filter) and only then journals the chunk;
the errors file is written from the journal at the end. A later run with the same settings keeps every journalled
chunk whose parts exist and scores only the others; the number of workers is not part of the run key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pickle
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pyarrow as pa

try:
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ImportError as _err:  # pragma: no cover - exercised only without ray
    raise ImportError("endokern's Ray integration needs Ray Data: pip install 'endokern[ray]'") from _err

from .. import io as eio
from ..io import Chunk, FilePlan, InputRow, plan_inputs
from ..model import EndoRM, progress_bar
from ..parts import STATE_DIR, PartsWriter
from ..pipeline import RowScorer, RunStats, make_task
from ..settings import Settings, SettingsError

__all__ = ["Scorer", "connect", "execute"]

_ENVELOPE = ("_chunk", "_row", "_subset", "_payload")  # what the reader hands the Scorer in a run


# ---------------------------------------------------------------------------------------------------------- the scorer


class Scorer:
    """A callable class for ``Dataset.map_batches``: loads the model once per actor, then scores batches.

    ``model``, ``command`` and ``options`` are :class:`endokern.settings.Settings` fields (``alpha``, ``template``,
    ``max_length``, ``per_token``, ``min_reward``...), or pass ``settings`` whole. ``keep_scored`` (filter) sends every
    scored row to ``output``; ``torch_threads`` sets the actor's CPU threads (Ray gives an actor one thread per
    reserved CPU).

    A batch of plain rows (a ``pyarrow.Table``, a pandas ``DataFrame`` or a dict of NumPy arrays, with the columns the
    command reads, e.g. ``prompt`` and ``response``) is scored as one chunk and comes back as a ``pyarrow.Table`` with
    the rows of every stream, each with a ``stream`` column (``output``; ``rejected`` for filter; ``errors`` for rows
    that cannot be scored, with ``row`` and ``reason``), each stream in input order. Rows without an ``id`` are
    numbered by ``index_column`` when given, else by their place in the batch (which Ray does not make global).

    In a run (:func:`execute`) the batches are chunks made by the run's reader, and the results go back to the
    driver whole (pickled), so that the files hold exactly what a single process writes.
    """

    def __init__(self, model: Optional[str] = None, command: str = "score", *, settings: Optional[Settings] = None,
                 keep_scored: bool = False, torch_threads: Optional[int] = None, index_column: Optional[str] = None,
                 **options: Any):
        import torch

        if settings is None:
            if isinstance(options.get("packing"), bool):  # EndoRM's spelling of the command line's on / off
                options["packing"] = "on" if options["packing"] else "off"
            settings = Settings(command=command, **({"model": model} if model is not None else {}), **options)
        if torch_threads and settings.threads is None:  # the actor's CPUs, not what the machine as a whole has free
            settings = settings.replace(threads=str(int(torch_threads)))
        settings.validate()
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.rm = EndoRM.from_settings(settings)
        self.scorer = RowScorer.for_settings(self.rm, settings, make_task(settings, self.rm, keep_scored=keep_scored))
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
        chunk = [(InputRow(i, row, None), None) for i, row in zip(indexes, rows)]
        streams = self.scorer.score_chunk(chunk).streams()
        out = [dict(r, stream=name) for name in ("output", "rejected", "errors") for r in streams.get(name, [])]
        if not out:
            return pa.table({"stream": pa.array([], pa.string())})
        return eio.table_from_rows(out)

    def _score_chunks(self, table: pa.Table) -> pa.Table:
        """Envelope rows of a run (one chunk or more, possibly a piece of one) -> one result row per chunk piece."""
        chunks = table.column("_chunk").to_pylist()
        rows = table.column("_row").to_pylist()
        subsets = table.column("_subset").to_pylist()
        payloads = table.column("_payload").to_pylist()
        groups: Dict[int, List[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault(c, []).append(i)
        out: Dict[str, list] = {"_chunk": [], "_first": [], "_rows": [], "_payload": []}
        for c, positions in groups.items():
            positions.sort(key=lambda i: rows[i])
            items = []
            for i in positions:
                row, error = pickle.loads(payloads[i])
                items.append((InputRow(rows[i], row, error), subsets[i]))
            stats = RunStats()
            streams = self.scorer.score_chunk(items, stats=stats).streams()
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


def _read_blocks(plan: FilePlan, chunks: List[Tuple[int, int]], chunk_rows: int, pos: int = 0) -> Iterator[pa.Table]:
    """A read task: one envelope block per wanted chunk (``(first, rows)`` pairs of one file, in order); a plain JSON
    Lines file is read from byte ``pos``, where the first wanted chunk starts."""
    wanted = dict(chunks)
    first_local = chunks[0][0] - plan.offset
    if plan.kind == "jsonl":
        items: Iterable[InputRow] = eio.jsonl_rows_from(plan.path, pos, first_local)
    else:  # Parquet skips whole row groups before the start; gzip and arrays are read from their beginning
        items = eio.read_rows(plan.path, start=first_local)
    buffer: List[InputRow] = []
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


def _envelope(plan: FilePlan, chunk: int, items: List[InputRow]) -> pa.Table:
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


def execute(settings: Settings, files: Dict[str, str], *, keep_scored: bool = False,
            log: Callable[[str], None] = lambda line: None) -> RunStats:
    """Score ``settings.input`` on a Ray cluster into the folders of ``files`` (:func:`endokern.runs.paths`),
    resuming an earlier run of them; the errors file is written at the end. Called by :func:`endokern.runs.run`,
    which finishes the command (summaries, filter's top fraction).

    Filter's rejected rows go to the folder ``files["rejected"]``; with ``keep_scored`` every scored row goes to
    ``files["scored"]`` instead (a later pass splits them). ``num_gpus_per_worker`` defaults to 1 when the cluster has
    GPUs, else 0. When Ray is not initialized and there are rows to score, the run connects to ``settings.address``
    (see :func:`connect`) and shuts Ray down at its end. Returns the run's :class:`RunStats`: ``rows`` scored now,
    ``resumed_from`` rows found done, and in ``extra`` the workers, the chunks and ``first_chunk_s`` (startup: from
    the call to the first chunk written).
    """
    started = time.perf_counter()
    output = files["output"]
    streams = {"output": files["scored"] if keep_scored else output}
    folders = [output]
    if settings.command == "filter":
        folders.append(files["rejected"])
        if not keep_scored:
            streams["rejected"] = files["rejected"]
    chunk_plan, chunks = plan_inputs(settings.input, settings.chunk_rows, settings.limit)
    try:  # checked before anything is written, as the local engine checks its checkpoint: a usage error (exit 2)
        writer = PartsWriter(os.path.join(output, STATE_DIR), streams, files["errors"], settings.run_key(),
                             settings.overwrite, folders)
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # other arguments, a folder it did not write
        raise SettingsError(f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.strerror
                            else str(err)) from None
    done = writer.settle(chunks)
    pending = [c for c in chunks if c.first not in done]
    stats = RunStats(resumed_from=sum(c.rows for c in chunks if c.first in done))
    stats.extra.update(workers=settings.num_workers, chunks=len(chunks), chunks_scored=len(pending))
    ray_started = bool(pending) and connect(settings.address)
    try:
        if pending:
            num_gpus = settings.num_gpus_per_worker
            if num_gpus is None:
                num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            model = os.path.abspath(settings.model) if os.path.exists(settings.model) else settings.model
            scorer = dict(settings=settings.replace(model=model), keep_scored=keep_scored,  # actors run elsewhere
                          torch_threads=max(1, int(settings.num_cpus_per_worker)))
            _execute(chunk_plan, pending, settings.chunk_rows, scorer, writer, done, stats,
                     num_workers=settings.num_workers, num_gpus=num_gpus, num_cpus=settings.num_cpus_per_worker,
                     progress=settings.progress, desc=settings.command, started=started)
    finally:
        if ray_started:
            ray.shutdown()
    stats.errors = sum(len(done[c.first]["errors"]) for c in pending if c.first in done)
    # A damaged gzip input: its complete rows were planned and scored; where reading stopped is an error row, and
    # the run then fails (runs.check_outcome), as the local engine does.
    damage = [{"row": p.offset + p.rows, "reason": p.damage, "damaged": True} for p in chunk_plan if p.damage]
    writer.write_errors(done, damage)
    if damage:
        stats.extra["damaged"] = damage[0]["reason"]
    stats.seconds = time.perf_counter() - started
    stats.extra["errors_total"] = sum(len(e["errors"]) for e in done.values())
    if stats.resumed_from and stats.rows:
        log(f"endokern: resumed: {stats.resumed_from} rows were done, {stats.rows} scored now")
    elif stats.resumed_from:
        log(f"endokern: {output} is already complete (use --overwrite to redo it)")
    return stats


def _execute(files, pending, chunk_rows, scorer_kwargs, writer, done, stats, *, num_workers, num_gpus, num_cpus,
             progress, desc, started) -> None:
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
    bar = progress_bar(sum(sizes.values()), desc, disable=not progress)  # rows, and the tokens the model ran per second
    bar.bar.unit = "row"
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
                done[c] = writer.commit(c, sizes[c], streams, examples, tokens)
                if "first_chunk_s" not in stats.extra:
                    stats.extra["first_chunk_s"] = round(time.perf_counter() - started, 3)
                stats.rows += sizes[c]
                stats.examples += examples
                stats.tokens += tokens
                bar.report(sizes[c], tokens)
    finally:
        bar.close()
    if pieces:
        raise RuntimeError(f"the run ended with {len(pieces)} chunk(s) incomplete; rerun to resume")
