"""Folders of Parquet parts: the journaled writer resumes what is whole on disk and refuses other runs."""

from __future__ import annotations

import os

import pytest
import torch

from endokern import parts
from endokern.io import Chunk


def test_parts_writer_resumes_what_is_whole_and_refuses_other_runs(tmp_path, gen):
    out, state = tmp_path / "out", tmp_path / "out" / parts.STATE_DIR
    chunks = [Chunk(0, 3, 0), Chunk(3, 3, 0), Chunk(6, 2, 0)]
    key = {"alpha": float(torch.rand((), generator=gen))}
    writer = parts.PartsWriter(str(state), {"output": str(out)}, str(tmp_path / "out.errors.jsonl"), key, False)
    assert writer.settle(chunks) == {}
    for c in chunks[:2]:
        writer.commit(c.first, c.rows, {"output": [{"id": c.first + i} for i in range(c.rows)],
                                        "errors": [{"row": c.first, "reason": "x"}]}, c.rows, 10)
    os.remove(out / parts.part_name(3))  # a part lost after its journal line
    (out / parts.part_name(6)).write_bytes(b"half")  # a part written before a kill, not journaled
    with open(state / parts.JOURNAL, "ab") as f:
        f.write(b'{"chunk": 6, "ro')  # half a journal line
    again = parts.PartsWriter(str(state), {"output": str(out)}, str(tmp_path / "out.errors.jsonl"), key, False)
    done = again.settle(chunks)
    assert sorted(done) == [0] and [os.path.basename(p) for p in parts.part_files(str(out))] == [parts.part_name(0)]
    assert again.write_errors(done) == 1
    with pytest.raises(ValueError, match="alpha"):
        parts.PartsWriter(str(state), {"output": str(out)}, str(tmp_path / "out.errors.jsonl"), {"alpha": -1}, False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        parts.PartsWriter(str(tmp_path / "foreign" / "_endokern"), {"output": str(tmp_path / "foreign")},
                        str(tmp_path / "f.errors.jsonl"), key, False)
