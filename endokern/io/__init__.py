"""Reading a run's inputs and writing its outputs, crash-safe and resumable, one file per job:

- :mod:`.readers`: the rows of JSON Lines (plain or gzip), Parquet, JSON arrays and stdin, one shard at a time, bad
  rows as error rows (:func:`read_rows`, :func:`read_inputs`);
- :mod:`.plan`: chunks of the inputs for an engine that reads them out of order (:func:`plan_inputs`);
- :mod:`.paths`: formats by extension and the one naming rule of the files beside an output (:func:`beside`);
- :mod:`.files`: whole-or-nothing writes, rows to files (:func:`write_rows`), run state and run keys;
- :mod:`.writer`: :class:`RunWriter`, the resumable writer of a run that commits chunks in order;
- :mod:`.lock`: :class:`RunLock`, the exclusive lock on a run's output.
"""

from .files import atomic_write, check_run_key, read_state, replace_file, table_from_rows, unify_schemas, write_rows
from .lock import LockedError, RunLock
from .paths import OUTPUT_EXTENSIONS, attributes_path, beside, errors_path_for, file_stem, format_of, same_file
from .plan import Chunk, FilePlan, jsonl_rows_from, plan_inputs
from .readers import (DamagedInput, InputRow, is_json_array, numbered_lines, open_binary, parse_line, read_inputs,
                      read_rows)
from .writer import CHECKPOINT_VERSION, RunWriter

__all__ = ["CHECKPOINT_VERSION", "Chunk", "DamagedInput", "FilePlan", "InputRow", "LockedError", "OUTPUT_EXTENSIONS",
           "RunLock", "RunWriter", "atomic_write", "attributes_path", "beside", "check_run_key", "errors_path_for",
           "file_stem", "format_of", "is_json_array", "jsonl_rows_from", "numbered_lines", "open_binary", "parse_line",
           "plan_inputs", "read_inputs", "read_rows", "read_state", "replace_file", "same_file", "table_from_rows",
           "unify_schemas", "write_rows"]
