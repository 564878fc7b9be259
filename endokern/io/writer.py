"""The resumable writer of a run that commits its chunks in order: one file per output stream and a checkpoint.

:class:`RunWriter` appends each chunk's results to one or more output streams and records how far it got in a
checkpoint sidecar (``<first stream path>.progress.json``). The order of operations makes a run killed at any moment
(``kill -9``) and restarted with the same arguments end with exactly the output of a run never killed:

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
from dataclasses import dataclass
from typing import IO, Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .files import (_encode_line, _promote, _std_for, _write_std, atomic_write, check_run_key, read_state,
                    table_from_rows, unify_schemas)
from .paths import format_of

CHECKPOINT_VERSION = 1
_MERGE_ROW_GROUP_ROWS = 65536  # chunks are gathered into row groups of about this many rows when merging parts


@dataclass
class _Stream:
    """One output stream of a RunWriter and its committed extent."""

    name: str
    path: str
    fmt: str  # 'jsonl', 'gz', 'parquet' or 'stdio'
    committed: int = 0  # committed bytes (jsonl, gz) or parts (parquet); unused for stdio
    file: Optional[IO[bytes]] = None  # jsonl/gz: the append handle
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
    ``rows_done == 0``.

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
            return  # standard streams are written as they go; there is nothing to cut back
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
