"""The names of a run's files: the format of a path by its extension, and the one rule for the files that sit
beside an output (errors, summary, rejected rows, checkpoint, lock)."""

from __future__ import annotations

import os

_GZ_SUFFIXES = (".jsonl.gz", ".ndjson.gz", ".json.gz")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
OUTPUT_EXTENSIONS = (".parquet", ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl", ".ndjson", ".json")
_SUPPORTED = "'-', .jsonl, .ndjson, .json, .jsonl.gz, .ndjson.gz, .json.gz or .parquet"


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


def file_stem(path: str) -> str:
    """A data file's name without its data extensions (``a/b.jsonl.gz`` -> ``b``)."""
    name = os.path.basename(path)
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same inode (hard links too) or the same resolved path (symbolic
    links, ``..``), whether or not it exists yet."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def attributes_path(document: str, name: str) -> str:
    """Dolma's layout: the attribute file of ``DATASET/documents/REL`` is ``DATASET/attributes/<name>/REL`` (the
    last ``documents`` folder of the path). ValueError for a path under no ``documents`` folder."""
    parts = os.path.normpath(os.path.abspath(document)).split(os.sep)
    folders = [i for i, part in enumerate(parts[:-1]) if part == "documents"]
    if not folders:
        raise ValueError(f"{document} is not under a documents/ folder")
    i = folders[-1]
    return os.sep.join(parts[:i] + ["attributes", name] + parts[i + 1:])
