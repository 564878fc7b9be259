"""Streaming readers and crash-safe, resumable writers of endokern.io, including a real ``kill -9`` of a writer."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from limits import HANG_S

import endokern.io as eio
from endokern.io import InputRow, RunWriter, errors_path_for, read_rows, write_rows

ROWS = [{"i": i, "text": f"row {i} é✓", "score": i / 3} for i in range(10)]
SPECIAL_FLOATS = [0.1, 1 / 3, -0.0, 5e-324, 1.7976931348623157e308, 123456789.123456789]


def _jsonl_bytes(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN, through dicts and lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------------------- reading


def _write_input(path: Path, rows) -> None:
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    elif name.endswith(".json") and "array" in name:
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    else:
        path.write_bytes(_jsonl_bytes(rows))


@pytest.mark.parametrize(
    "name", ["in.jsonl", "in.ndjson", "in.jsonl.gz", "in.ndjson.gz", "in.parquet", "array.json", "lines.json"]
)
def test_read_each_format(tmp_path, name):
    path = tmp_path / name
    _write_input(path, ROWS)
    got = list(read_rows(str(path)))
    assert got == [InputRow(i, r, None) for i, r in enumerate(ROWS)]


def test_read_json_array_gz_with_leading_space_and_non_objects(tmp_path):
    path = tmp_path / "data.json.gz"
    path.write_bytes(gzip.compress(b'  \n [{"a": 1}, 7, {"a": 2}, [1]]'))
    got = list(read_rows(str(path)))
    assert got == [
        InputRow(0, {"a": 1}, None),
        InputRow(1, None, "row is not a JSON object"),
        InputRow(2, {"a": 2}, None),
        InputRow(3, None, "row is not a JSON object"),
    ]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def test_read_benchmark_arrays():
    rm_bench = EXAMPLES / "rm-bench-sample.json"  # the samples shipped with the project: JSON arrays of objects
    llmbar = EXAMPLES / "LLMBar__Natural-sample.json"
    rows = list(read_rows(str(rm_bench)))
    assert len(rows) == len(json.loads(rm_bench.read_text(encoding="utf-8")))
    assert all(r.error is None and {"prompt", "chosen", "rejected"} <= r.row.keys() for r in rows)
    first = next(read_rows(str(llmbar)))
    assert first.index == 0 and {"input", "output_1", "output_2", "label"} <= first.row.keys()


def test_read_blank_lines_bad_rows_and_bom(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"a": 1}\n'  # BOM on the first line is dropped
        b"\n   \r\n"  # blank lines are not rows
        b"{not json\n"
        b"[1, 2]\n"
        b'"just a string"\n'
        b'{"s": "\xff\xfe"}\n'  # not UTF-8
        b'{"a": NaN}\r\n'
        b'{"last": true}'  # no final newline
    )
    got = list(read_rows(str(path)))
    assert [r.index for r in got] == list(range(7))
    assert got[0] == InputRow(0, {"a": 1}, None)
    assert got[1].row is None and got[1].error.startswith("bad JSON: ")
    assert got[2] == InputRow(2, None, "row is not a JSON object")
    assert got[3] == InputRow(3, None, "row is not a JSON object")
    assert got[4].row is None and got[4].error.startswith("bad UTF-8: ")
    assert got[5].error is None and math.isnan(got[5].row["a"])
    assert got[6] == InputRow(6, {"last": True}, None)


def test_read_stdin(monkeypatch):
    data = b'{"a": 1}\n\n{"b": "\xc3\xa9"}\n\xff\n{"c": 3}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    got = list(read_rows("-", num_shards=2, shard_index=0))
    assert got[0] == InputRow(0, {"a": 1}, None)
    assert got[1].index == 2 and got[1].row is None and got[1].error.startswith("bad UTF-8")
    sys.stdin.seek(0)
    assert list(read_rows("-", num_shards=2, shard_index=1)) == [
        InputRow(1, {"b": "é"}, None),
        InputRow(3, {"c": 3}, None),
    ]


def test_read_text_only_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"a": 1}\n7\n'))
    assert list(read_rows("-")) == [InputRow(0, {"a": 1}, None), InputRow(1, None, "row is not a JSON object")]


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz", "in.parquet", "array.json"])
def test_sharding_and_start(tmp_path, name):
    rows = [{"i": i} for i in range(23)]
    path = tmp_path / name
    _write_input(path, rows)
    for num_shards in (1, 2, 3, 5, 30):
        shards = [
            [r.index for r in read_rows(str(path), num_shards=num_shards, shard_index=k)] for k in range(num_shards)
        ]
        assert sorted(i for s in shards for i in s) == list(range(23))  # union is everything, shards are disjoint
        for k, shard in enumerate(shards):
            assert shard == [i for i in range(23) if i % num_shards == k]
            assert [r.index for r in read_rows(str(path), num_shards=num_shards, shard_index=k)] == shard
            for start in (0, 1, 3, len(shard), len(shard) + 4):
                got = list(read_rows(str(path), num_shards=num_shards, shard_index=k, start=start))
                assert [r.index for r in got] == shard[start:]
                assert all(r.row == {"i": r.index} for r in got)


def test_invalid_arguments(tmp_path):
    path = tmp_path / "in.jsonl"
    _write_input(path, ROWS)
    with pytest.raises(ValueError, match="num_shards"):
        read_rows(str(path), num_shards=0)
    with pytest.raises(ValueError, match="shard_index"):
        read_rows(str(path), num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="shard_index"):
        read_rows(str(path), shard_index=-1)
    with pytest.raises(ValueError, match="start"):
        read_rows(str(path), start=-1)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="extension"):
        read_rows(str(tmp_path / "in.csv"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{'single': 'quotes'}]")
    with pytest.raises(ValueError, match="bad.json: bad JSON"):
        list(read_rows(str(bad)))


# ----------------------------------------------------------------------------------------------------------- writing


def test_errors_path_for():
    assert errors_path_for("out.jsonl") == "out.errors.jsonl"
    assert errors_path_for("runs/out.jsonl.gz") == "runs/out.errors.jsonl"
    assert errors_path_for("out.parquet") == "out.errors.jsonl"
    assert errors_path_for("out.v2.ndjson") == "out.v2.errors.jsonl"
    assert errors_path_for("-") == "-"
    # one rule for every engine and file: extensions in any case; a folder (a Ray output) gets the suffix appended
    assert errors_path_for("out.JSONL") == "out.errors.jsonl" and errors_path_for("o.Parquet") == "o.errors.jsonl"
    assert errors_path_for("scores.v2") == "scores.v2.errors.jsonl"
    assert eio.beside("runs/out.jsonl.gz", ".summary.json") == "runs/out.summary.json"


WRITE_ROWS = [
    {"f": x, "nan": float("nan"), "inf": float("inf"), "none": None, "l": [x, -x], "n": {"a": [1, 2], "s": "é"}}
    for x in SPECIAL_FLOATS
]


@pytest.mark.parametrize("name", ["o.jsonl", "o.json", "o.jsonl.gz", "o.parquet"])
def test_write_rows_round_trip(tmp_path, name):
    path = tmp_path / "sub" / name
    write_rows(str(path), WRITE_ROWS)
    got = [r.row for r in read_rows(str(path))]
    assert len(got) == len(WRITE_ROWS) and all(_same(a, b) for a, b in zip(got, WRITE_ROWS))
    assert not (tmp_path / "sub" / (name + ".tmp")).exists()
    if not name.endswith(".parquet"):  # floats are written as repr, so the text itself round trips
        text = (gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()).decode()
        assert repr(1 / 3) in text and "NaN" in text and "Infinity" in text and "é" in text


def test_write_rows_stdout(capsys):
    write_rows("-", [{"a": 1.5, "s": "✓"}])
    assert capsys.readouterr().out == '{"a": 1.5, "s": "✓"}\n'


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz", "out.parquet"])
def test_run_writer_round_trip(tmp_path, name):
    path = tmp_path / name
    chunks = [WRITE_ROWS[:2], WRITE_ROWS[2:5], WRITE_ROWS[5:]]
    with RunWriter({"output": str(path)}, run_key={"model": "m"}) as w:
        for chunk in chunks:
            w.commit({"output": chunk}, rows_consumed=len(chunk))
        w.finish()
    from_file = [r.row for r in read_rows(str(path))]
    assert len(from_file) == len(WRITE_ROWS) and all(_same(a, b) for a, b in zip(from_file, WRITE_ROWS))
    ckpt = json.loads((tmp_path / (name + ".progress.json")).read_text())
    assert ckpt["complete"] is True and ckpt["rows_done"] == len(WRITE_ROWS) and ckpt["run_key"] == {"model": "m"}
    assert not (tmp_path / (name + ".parts")).exists()


def test_gz_stream_is_multi_member(tmp_path):
    path = tmp_path / "out.jsonl.gz"
    with RunWriter({"output": str(path)}, run_key={}) as w:
        for k in range(3):
            w.commit({"output": [{"k": k, "j": j} for j in range(4)]}, rows_consumed=4)
        w.finish()
    data = path.read_bytes()
    assert data.count(b"\x1f\x8b\x08") >= 3  # one gzip member per chunk
    expected = [{"k": k, "j": j} for k in range(3) for j in range(4)]
    assert gzip.decompress(data) == _jsonl_bytes(expected)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == expected
    assert [r.row for r in read_rows(str(path))] == expected


def test_parquet_merge_promotes_schema(tmp_path):
    path = tmp_path / "out.parquet"
    chunks = [
        [{"id": 1, "score": None, "tags": []}, {"id": 2, "score": None, "tags": []}],
        [{"id": 3, "score": 0.5, "tags": ["x"], "extra": {"k": 1}}],
        [{"id": 4.5, "score": 2, "tags": None, "extra": {"k": 2, "j": "y"}}],
    ]
    with RunWriter({"output": str(path)}, run_key={}) as w:
        for chunk in chunks:
            w.commit({"output": chunk}, rows_consumed=len(chunk))
        w.finish()
    after = [r.row for r in read_rows(str(path))]
    table = pq.read_table(path)
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("id").type == pa.float64()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.column_names == ["id", "score", "tags", "extra"]
    assert table.column("score").to_pylist() == [None, None, 0.5, 2.0]
    assert table.column("extra").to_pylist() == [None, None, {"k": 1, "j": None}, {"k": 2, "j": "y"}]
    assert after == table.to_pylist()


def test_parquet_type_clash_is_refused_at_commit(tmp_path):
    with RunWriter({"output": str(tmp_path / "out.parquet")}, run_key={}) as w:
        w.commit({"output": [{"a": 1}]}, rows_consumed=1)
        with pytest.raises(ValueError, match="clash"):
            w.commit({"output": [{"a": [1, 2]}]}, rows_consumed=1)
        with pytest.raises(ValueError, match="cannot be stored"):
            w.commit({"output": [{"a": 1}, {"a": [1]}]}, rows_consumed=2)
        w.commit({"output": [{"a": 2}]}, rows_consumed=1)  # the refused chunks left nothing behind
        assert w.rows_done == 2
        w.finish()
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [{"a": 1}, {"a": 2}]


def test_parquet_ids_mixing_strings_and_row_numbers_are_strings(tmp_path, gen):
    """An input whose ``id`` is a string in some rows and missing (the row number) in others: within a chunk and
    across chunks (numbers first, strings in a later chunk, and after a resume) the column becomes strings."""
    path = tmp_path / "out.parquet"
    draws = torch.randint(0, 10 ** 6, (12,), generator=gen).tolist()
    ids = [i if d % 2 else f"row-{d}" for i, d in enumerate(draws)]
    ids[0], ids[1], ids[2], ids[3] = 0, 1, "a", 3  # chunk 0: numbers only; chunk 1: a string among numbers
    with RunWriter({"output": str(path)}, run_key={}) as w:
        w.commit({"output": [{"id": i} for i in ids[:2]]}, rows_consumed=2)
    with RunWriter({"output": str(path)}, run_key={}) as w:  # resumed: the committed part holds int ids
        for k in range(2, 12, 5):
            w.commit({"output": [{"id": i} for i in ids[k:k + 5]]}, rows_consumed=5)
        w.finish()
    assert pq.read_table(path).schema.field("id").type == pa.string()
    assert pq.read_table(path).column("id").to_pylist() == [str(i) for i in ids]


def test_unencodable_row_leaves_files_untouched(tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    with RunWriter({"output": str(out), "errors": str(err)}, run_key={}) as w:
        w.commit({"output": [{"a": 1}]}, rows_consumed=1)
        with pytest.raises(TypeError):
            w.commit({"errors": [{"e": "x"}], "output": [{"a": object()}]}, rows_consumed=1)
        with pytest.raises(ValueError, match="unknown output stream"):
            w.commit({"rejected": [{"a": 1}]}, rows_consumed=1)
        assert out.read_bytes() == b'{"a": 1}\n' and err.read_bytes() == b""
        assert w.rows_done == 1


def test_stdout_and_stderr_streams(capsys, tmp_path):
    with RunWriter({"output": "-", "errors": "-"}, run_key={"a": 1}) as w:
        assert w.checkpoint_path is None and w.rows_done == 0
        w.commit({"output": [{"score": 0.25}], "errors": [{"index": 1, "error": "bad JSON: x"}]}, rows_consumed=2)
        w.commit({"output": [{"score": float("nan")}]}, rows_consumed=1)
        w.finish()
        assert w.complete and w.rows_done == 3
    captured = capsys.readouterr()
    assert captured.out == '{"score": 0.25}\n{"score": NaN}\n'
    assert captured.err == '{"index": 1, "error": "bad JSON: x"}\n'
    assert list(tmp_path.iterdir()) == []


def test_stdout_run_writes_no_checkpoint_and_removes_a_stale_one(tmp_path, capsys):
    err = tmp_path / "e.jsonl"
    with RunWriter({"errors": str(err), "output": "-"}, run_key={}) as w:
        w.commit({"errors": [{"e": 1}], "output": [{"o": 1}]}, rows_consumed=1)
    assert not (tmp_path / "e.jsonl.progress.json").exists()
    (tmp_path / "e.jsonl.progress.json").write_text("{}")
    with pytest.raises(FileExistsError):
        RunWriter({"errors": str(err), "output": "-"}, run_key={})
    with RunWriter({"errors": str(err), "output": "-"}, run_key={}, overwrite=True) as w:
        assert w.rows_done == 0 and err.read_bytes() == b""
    assert not (tmp_path / "e.jsonl.progress.json").exists()
    assert capsys.readouterr().out == '{"o": 1}\n'


# ------------------------------------------------------------------------------------------------------------ resume


def _streams(d: Path) -> dict[str, str]:
    return {
        "output": str(d / "out.jsonl"),
        "gz": str(d / "out.jsonl.gz"),
        "table": str(d / "out.parquet"),
        "errors": str(d / "out.errors.jsonl"),
    }


def _chunk(k: int) -> dict[str, list[dict]]:
    """Deterministic rows of chunk k for every stream; the Parquet 'maybe' column is null in even chunks."""
    rows = [{"i": 4 * k + j, "score": (4 * k + j) / 7, "vec": [j / 3, -j]} for j in range(4)]
    table = [{"i": r["i"], "maybe": None if k % 2 == 0 else r["score"]} for r in rows]
    return {"output": rows, "gz": rows, "table": table, "errors": [{"chunk": k}] if k % 3 == 0 else []}


def _run(d: Path, chunks: range, *, overwrite: bool = False, finish: bool = True) -> RunWriter:
    with RunWriter(_streams(d), run_key={"model": "m", "alpha": 1.0}, overwrite=overwrite) as w:
        assert w.rows_done % 4 == 0
        for k in chunks:
            if 4 * k >= w.rows_done:
                w.commit(_chunk(k), rows_consumed=4)
        if finish:
            w.finish()
    return w


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("out.jsonl", "out.jsonl.gz", "out.errors.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert pq.read_table(a / "out.parquet").to_pylist() == pq.read_table(b / "out.parquet").to_pylist()


def test_resume_cuts_off_uncommitted_writes(tmp_path):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    _run(ref, range(6))
    _run(crash, range(3), finish=False)
    # what a run killed inside its fourth commit leaves: a half line, a half gzip member, an uncommitted part
    with open(crash / "out.jsonl", "ab") as f:
        f.write(b'{"i": 12, "sco')
    with open(crash / "out.jsonl.gz", "ab") as f:
        f.write(gzip.compress(b'{"i": 12}\n')[:9])
    with open(crash / "out.errors.jsonl", "ab") as f:
        f.write(b'{"chunk": 3}\n')
    parts = crash / "out.parquet.parts"
    shutil.copy(parts / "part-000000.parquet", parts / "part-000003.parquet")
    (parts / "part-000004.parquet.tmp").write_bytes(b"PAR1 partial")
    w = RunWriter(_streams(crash), run_key={"alpha": 1.0, "model": "m"})
    assert w.rows_done == 12 and not w.complete
    assert (crash / "out.jsonl").read_bytes() == _jsonl_bytes(row for k in range(3) for row in _chunk(k)["output"])
    assert sorted(os.listdir(parts)) == [f"part-{k:06d}.parquet" for k in range(3)]
    w.close()
    w = _run(crash, range(6))
    assert w.complete and w.rows_done == 24
    _assert_same_outputs(ref, crash)
    with RunWriter(_streams(crash), run_key={"model": "m", "alpha": 1.0}) as again:
        assert again.complete and again.rows_done == 24
        assert [r.row["i"] for r in read_rows(str(crash / "out.parquet"))] == list(range(24))
        gz = [r.row for r in read_rows(str(crash / "out.jsonl.gz"))]
        assert gz == [row for k in range(6) for row in _chunk(k)["gz"]]
        with pytest.raises(RuntimeError, match="complete"):
            again.commit(_chunk(6), rows_consumed=4)


def test_resume_after_kill_inside_finish(tmp_path):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    _run(ref, range(5))
    _run(crash, range(5), finish=False)
    (crash / "out.parquet").write_bytes(b"a merged file from a finish() killed midway")
    w = _run(crash, range(5))
    assert w.complete
    _assert_same_outputs(ref, crash)
    # a kill after the checkpoint said complete but before the parts were removed
    (crash / "out.parquet.parts").mkdir()
    with RunWriter(_streams(crash), run_key={"model": "m", "alpha": 1.0}) as again:
        assert again.complete
    assert not (crash / "out.parquet.parts").exists()


def test_refusals_and_overwrite(tmp_path):
    _run(tmp_path, range(2), finish=False)
    with pytest.raises(ValueError, match=r"alpha \(1.0 -> 0.5\).*--overwrite"):
        RunWriter(_streams(tmp_path), run_key={"model": "m", "alpha": 0.5})
    with pytest.raises(ValueError, match="seed"):
        RunWriter(_streams(tmp_path), run_key={"model": "m", "alpha": 1.0, "seed": 3})
    other = dict(_streams(tmp_path), errors=str(tmp_path / "elsewhere.jsonl"))
    with pytest.raises(ValueError, match="other output streams"):
        RunWriter(other, run_key={"model": "m", "alpha": 1.0})
    (tmp_path / "out.jsonl").write_bytes(b"")  # shorter than committed: changed behind the run's back
    with pytest.raises(ValueError, match="changed outside"):
        RunWriter(_streams(tmp_path), run_key={"model": "m", "alpha": 1.0})

    mine = tmp_path / "mine.jsonl"
    mine.write_text("someone's data\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        RunWriter({"output": str(mine)}, run_key={})
    assert mine.read_text() == "someone's data\n"
    with RunWriter({"output": str(mine)}, run_key={}, overwrite=True) as w:
        assert w.rows_done == 0 and mine.read_bytes() == b""
        w.commit({"output": [{"a": 1}]}, rows_consumed=1)
    assert mine.read_bytes() == b'{"a": 1}\n'

    w = _run(tmp_path, range(3), overwrite=True)  # overwrite also discards a checkpoint of another run
    assert w.complete and w.rows_done == 12
    assert pq.read_table(tmp_path / "out.parquet").column("i").to_pylist() == list(range(12))
    with pytest.raises(ValueError, match="two output streams"):
        RunWriter({"a": str(mine), "b": str(mine)}, run_key={})


# ---------------------------------------------------------------------------------------------- a real kill -9

_CHILD = """
import importlib.util, itertools, sys, time
import types
# endokern.io loaded on its own: importing the endokern package would import torch, too slow for a test
package = types.ModuleType("endokern")
package.__path__ = [sys.argv[1]]
sys.modules["endokern"] = package
import endokern.io as eio
src, out, delay = sys.argv[2], sys.argv[3], float(sys.argv[4])
streams = {"output": out + "/out.jsonl", "gz": out + "/out.jsonl.gz", "table": out + "/out.parquet",
           "errors": out + "/out.errors.jsonl"}
with eio.RunWriter(streams, run_key={"src": src, "chunk": 16}) as w:
    if w.complete:
        sys.exit(0)
    rows = eio.read_rows(src, num_shards=2, shard_index=1, start=w.rows_done)
    while True:
        chunk = list(itertools.islice(rows, 16))
        if not chunk:
            break
        good = [{"index": r.index, "score": r.index / 7, "text": r.row["t"]} for r in chunk if r.error is None]
        table = [{"index": g["index"], "maybe": g["score"] if g["index"] % 3 else None} for g in good]
        errors = [{"index": r.index, "error": r.error} for r in chunk if r.error is not None]
        w.commit({"output": good, "gz": good, "table": table, "errors": errors}, rows_consumed=len(chunk))
        time.sleep(delay)
    w.finish()
"""


def _start_child(script: Path, src: Path, out: Path, delay: float) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    package = os.path.dirname(os.path.dirname(eio.__file__))  # endokern/, whose io package the child imports alone
    return subprocess.Popen([sys.executable, str(script), package, str(src), str(out), str(delay)])


def _rows_done(ckpt: Path) -> int:
    try:
        return json.loads(ckpt.read_text())["rows_done"]
    except (FileNotFoundError, ValueError):
        return -1  # not written yet


def test_sigkill_and_restart_gives_identical_output(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"t": f"text {i} ✓"}) if i % 37 else "{broken" for i in range(1200)]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _start_child(script, src, ref, 0.0).wait(timeout=HANG_S) == 0

    ckpt = killed / "out.jsonl.progress.json"
    kills = 0
    for threshold in (100, 250, 400):
        child = _start_child(script, src, killed, 0.01)
        deadline = time.monotonic() + 30
        while _rows_done(ckpt) < threshold and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait(timeout=HANG_S)
    assert kills >= 2  # the child ran long enough to be killed mid-run
    assert not json.loads(ckpt.read_text())["complete"]
    assert _start_child(script, src, killed, 0.0).wait(timeout=HANG_S) == 0

    assert json.loads(ckpt.read_text())["complete"]
    assert json.loads(ckpt.read_text())["rows_done"] == 600
    _assert_same_outputs(ref, killed)
    indices = [json.loads(line)["index"] for line in (killed / "out.jsonl").read_text().splitlines()]
    assert indices == [i for i in range(1, 1200, 2) if i % 37]  # no duplicate, no lost row
    assert not (killed / "out.parquet.parts").exists()


# ------------------------------------------------------------------------------------------------- several inputs


def _random_inputs(tmp_path, gen):
    """Two or three inputs of random sizes in random formats, with blank lines, a BOM and a bad line."""
    paths = []
    for k in range(int(torch.randint(2, 4, (1,), generator=gen))):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        rows = [{"k": k, "i": i} for i in range(n)]
        kind = ["jsonl", "jsonl.gz", "parquet", "json"][int(torch.randint(0, 4, (1,), generator=gen))]
        path = str(tmp_path / f"in{k}.{kind}")
        if kind == "parquet":
            write_rows(path, rows)
        elif kind == "json":
            Path(path).write_text(json.dumps(rows))
        else:
            lines = [json.dumps(r) for r in rows]
            lines.insert(int(torch.randint(0, n, (1,), generator=gen)), "")  # a blank line is not a row
            lines[-1] = "{bad json"
            data = ("\ufeff" + "\n".join(lines) + "\n").encode()
            with (gzip.open if kind.endswith("gz") else open)(path, "wb") as f:
                f.write(data)
        paths.append(path)
    return paths


def test_plan_numbers_chunks_as_the_streaming_reader_numbers_rows(tmp_path, gen):
    paths = _random_inputs(tmp_path, gen)
    streamed = list(eio.read_inputs(paths))
    assert [item.index for item, _ in streamed] == list(range(len(streamed)))
    chunk_rows = int(torch.randint(1, 12, (1,), generator=gen))
    limit = None if bool(torch.rand((), generator=gen) < 0.5) else int(torch.randint(1, len(streamed) + 5, (1,), generator=gen))
    files, chunks = eio.plan_inputs(paths, chunk_rows, limit)
    expected = streamed[:limit] if limit is not None else streamed
    assert sum(c.rows for c in chunks) == len(expected)
    for c in chunks:
        plan = files[c.file]
        local = c.first - plan.offset
        if plan.kind == "jsonl":
            got = list(eio.jsonl_rows_from(plan.path, plan.seeks[local // chunk_rows], local))[: c.rows]
        else:
            got = list(eio.read_rows(plan.path, start=local))[: c.rows]
        for item, (want, subset) in zip(got, expected[c.first : c.first + c.rows]):
            assert plan.offset + item.index == want.index and item.row == want.row and item.error == want.error
            assert plan.subset == subset
