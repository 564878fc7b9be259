"""Folders of Parquet parts: the output of a run whose chunks finish in any order (the Ray engine).

``<folder>/part-<first row>.parquet`` per chunk (names sort in input order; Parquet dataset readers read the folder
as one table and skip ``_endokern/``), and :class:`PartsWriter`, the resumable writer that journals each chunk after
its parts are on disk. It shares the atomic writes, the state file and the run-key check with
:class:`endokern.io.RunWriter`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .io import Chunk, atomic_write, check_run_key, read_state, table_from_rows, write_rows

__all__ = ["JOURNAL", "PartsWriter", "RUN_FILE", "STATE_DIR", "VERSION", "clear_parts", "part_files", "part_name",
           "read_parts", "split_parts", "write_part"]

STATE_DIR = "_endokern"  # inside the output folder; '_' makes Parquet dataset readers skip it
RUN_FILE = "run.json"
JOURNAL = "progress.jsonl"
VERSION = 1
_PART = re.compile(r"^part-(\d{12})\.parquet$")


def part_name(chunk: int) -> str:
    """The file name of a chunk's part: its first row's global index, zero-padded so that names sort by row."""
    return f"part-{chunk:012d}.parquet"


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def part_files(folder: str) -> List[str]:
    """The part files of an output folder, in input order."""
    return [os.path.join(folder, n) for n in sorted(_listdir(folder)) if _PART.match(n)]


def read_parts(folder: str, columns: Optional[List[str]] = None) -> Iterator[dict]:
    """The rows of a parts folder, in input order, as dicts (keys a part lacks are left out, as in JSON Lines)."""
    for path in part_files(folder):
        for row in pq.read_table(path, columns=columns).to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


def clear_parts(folder: str) -> None:
    """Remove the part files of a folder (and their temporaries), creating the folder when missing."""
    os.makedirs(folder, exist_ok=True)
    for name in _listdir(folder):
        if _PART.match(name) or name.endswith(".parquet.tmp"):
            os.remove(os.path.join(folder, name))


def write_part(folder: str, chunk: int, table: pa.Table) -> None:
    """A chunk's part file, whole or not at all."""
    atomic_write(os.path.join(folder, part_name(chunk)), lambda f: pq.write_table(table, f))


def _journal_line(entry: dict) -> bytes:
    return (json.dumps(entry, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")


class PartsWriter:
    """The resumable writer of a run whose chunks finish in any order: one folder of Parquet parts per stream,
    ``part-<first row>.parquet`` per chunk, and a journal.

    Each chunk's parts are written (temporary name, then renamed) before its line is appended to the journal
    (``<state_dir>/progress.jsonl``, fsynced) with its row count and error rows; the errors file is written from the
    journal at the end, in input order. The run key is kept in ``<state_dir>/run.json``: a later run with another key
    is refused unless ``overwrite``. :meth:`settle` keeps every journalled chunk whose parts exist and removes every
    other part (a run killed between a part and its journal line scores that chunk again).
    """

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

    def _clear(self) -> None:
        for folder in self.folders:
            for name in _listdir(folder):
                if _PART.match(name) or name.endswith(".parquet.tmp"):
                    os.remove(os.path.join(folder, name))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if os.path.exists(self.errors):
            os.remove(self.errors)

    def _start(self) -> None:
        state_name = os.path.basename(self.state_dir)
        for folder in self.folders:
            present = [n for n in _listdir(folder) if n != state_name]
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
        state = {"version": VERSION, "run_key": self.run_key,
                 "streams": {name: os.path.abspath(p) for name, p in self.streams.items()},
                 "errors": os.path.abspath(self.errors)}
        data = (json.dumps(state, indent=1, allow_nan=True) + "\n").encode()
        atomic_write(self.run_file, lambda f: f.write(data))

    def _check_same_run(self) -> None:
        state = read_state(self.run_file, VERSION)
        check_run_key(state.get("run_key") or {}, self.run_key, self.run_file)
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
            data = b"".join(_journal_line(e) for e in self.entries)
            atomic_write(self.journal, lambda f: f.write(data))
        return done

    def commit(self, chunk: int, rows: int, streams: Dict[str, List[dict]], examples: int, tokens: int) -> dict:
        parts: Dict[str, int] = {}
        for name, folder in self.streams.items():
            out = streams.get(name) or []
            if not out:
                continue
            try:
                table = table_from_rows(out)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ValueError(f"stream {name!r}: these rows cannot be stored in Parquet: {e}") from None
            write_part(folder, chunk, table)
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

    def write_errors(self, done: Dict[int, dict], extra: Sequence[dict] = ()) -> int:
        """The errors file from the journal, in input order (byte for byte what a streaming run writes); ``extra``
        rows (where reading a damaged input stopped) go in at their row numbers."""
        rows = sorted([e for c in sorted(done) for e in done[c]["errors"]] + list(extra), key=lambda e: e["row"])
        write_rows(self.errors, rows)
        return len(rows)


def split_parts(scored: str, output: str, rejected: str, reason_of: Callable[[float], Optional[str]]) -> None:
    """Split the part files of ``scored`` by their rows' ``reward``: a row ``reason_of`` keeps (None) goes to the
    part of the same name in ``output``, the others to ``rejected`` with a ``reason`` column; earlier parts there are
    removed first. One part in memory at a time."""
    for folder in (output, rejected):
        clear_parts(folder)
    for path in part_files(scored):
        table = pq.read_table(path)
        reasons = [reason_of(r) for r in table.column("reward").to_pylist()]
        mask = pa.array([reason is None for reason in reasons], pa.bool_())
        kept = table.filter(mask)
        dropped = table.filter(pc.invert(mask))
        dropped = dropped.append_column("reason", pa.array([x for x in reasons if x is not None], pa.string()))
        chunk = int(_PART.match(os.path.basename(path)).group(1))
        for folder, part in ((output, kept), (rejected, dropped)):
            if part.num_rows:
                write_part(folder, chunk, part)
