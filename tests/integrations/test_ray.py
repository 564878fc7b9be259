"""``--engine ray`` end to end on a local two-CPU Ray cluster with the stories260K fixture: the same rows, ids, values
and errors as one process, resume, refusals, filter, and the Scorer class in a user's own Ray Data pipeline.

Exact float equality: a chunk is scored as one unit in both engines, so the batches are the same; what can still
change the last bits on CPU is the number of BLAS threads (a Ray actor with one CPU runs one thread). The
single-process reference runs therefore use one torch thread too (``one_thread``), and then the results are equal
bit for bit. Chunks never span two input files in a Ray run, so multi-file inputs here have a first file whose row
count is a multiple of ``--chunk-rows`` (then the chunks are the same as one process's).
"""

from __future__ import annotations

import contextlib
import json
import os
import random

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from model_utils import FIXTURE

try:
    import ray
    import ray.data
except ImportError:
    if os.environ.get("ENDOKERN_REQUIRE_RAY") == "1":
        raise  # CI installs endokern[ray]: a missing Ray must fail the run, not skip it
    pytest.skip("ray is not installed (pip install 'endokern[ray]')", allow_module_level=True)

from test_cli import read_jsonl, sentence, write_jsonl  # noqa: E402

from endokern import EndoRM  # noqa: E402
from endokern.cli import main  # noqa: E402
from endokern.integrations.ray import Scorer  # noqa: E402
from endokern.parts import JOURNAL, STATE_DIR, part_files  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=True)
    yield
    ray.shutdown()


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def run_cli(*args):
    assert main([*map(str, args), "--model", FIXTURE, "--no-progress"]) == 0


def run_ray(*args, workers=1):
    run_cli(*args, "--engine", "ray", "--num-workers", workers)


@contextlib.contextmanager
def one_thread():
    """One torch thread, as each Ray actor with one CPU has (see the module doc): EndoRM sets its thread count before
    each batch, so the reference runs are told with ENDOKERN_THREADS."""
    before, env = torch.get_num_threads(), os.environ.get("ENDOKERN_THREADS")
    torch.set_num_threads(1)
    os.environ["ENDOKERN_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("ENDOKERN_THREADS", None)
        else:
            os.environ["ENDOKERN_THREADS"] = env


def folder_rows(path):
    """The rows of a Ray output folder, in file order (part names sort by row)."""
    return pads.dataset(str(path), format="parquet").to_table().to_pylist()


def test_score_is_the_single_process_output_with_ids_across_files_and_the_same_errors(tmp_path, rng):
    good = lambda: {"prompt": sentence(rng, 2, 6), "response": " " + sentence(rng, 2, 6)}  # noqa: E731
    first = [good() for _ in range(21)]
    first[3] = {"prompt": "x"}  # no response
    first[9] = {"prompt": "the " * 80, "response": " cat"}  # longer than --max-length
    # 21 rows + 3 bad lines = 24 rows (8 chunks of 3); the blank line is not a row
    a = write_jsonl(tmp_path / "a.jsonl", first, raw_lines=["{not json", "", "[1, 2]", json.dumps(good())])
    b = write_jsonl(tmp_path / "b.jsonl", [good() for _ in range(10)], raw_lines=['{"prompt": "p", "response": ""}'])
    args = ("score", "--input", a, b, "--chunk-rows", 3, "--max-length", 60, "--per-token")
    with one_thread():
        run_cli(*args, "--output", tmp_path / "local.parquet")
    run_ray(*args, "--output", tmp_path / "ray", workers=2)
    local, got = pq.read_table(tmp_path / "local.parquet").to_pylist(), folder_rows(tmp_path / "ray")
    assert [r["id"] for r in got] == [r["id"] for r in local] and len(got) == 35 - 5
    assert got[-1]["id"] == 33 and 24 in [r["id"] for r in got]  # rows of b.jsonl numbered after a.jsonl's
    assert got == local  # every field, floats bit for bit
    errors = (tmp_path / "ray.errors.jsonl").read_bytes()
    assert errors == (tmp_path / "local.errors.jsonl").read_bytes()
    assert [e["row"] for e in read_jsonl(tmp_path / "ray.errors.jsonl")] == [3, 9, 21, 22, 34]
    assert [os.path.basename(p) for p in part_files(tmp_path / "ray")][:2] == ["part-000000000000.parquet",
                                                                              "part-000000000003.parquet"]


def test_compare_rows_subsets_and_summary(tmp_path, rng):
    def resp():
        return " " + sentence(rng)

    def pair():
        return {"prompt": sentence(rng), "chosen": resp(), "rejected": resp()}

    llmbar = [{"input": sentence(rng), "output_1": resp(), "output_2": resp(), "label": 1 + i % 2} for i in range(6)]
    head = f"\n\nHuman: {sentence(rng)}\n\nAssistant: {sentence(rng)}\n\nHuman: {sentence(rng)}\n\nAssistant:"
    hh = {"chosen": head + resp(), "rejected": head + resp()}
    x = write_jsonl(tmp_path / "x.jsonl", [pair() for _ in range(5)] + [hh])
    y = write_jsonl(tmp_path / "y.jsonl", llmbar + [{"chosen": "a", "rejected": "b"}])
    args = ("compare", "--input", x, y, "--chunk-rows", 3)
    with one_thread():
        run_cli(*args, "--output", tmp_path / "local.jsonl")
    run_ray(*args, "--output", tmp_path / "ray")
    local, got = read_jsonl(tmp_path / "local.jsonl"), folder_rows(tmp_path / "ray")
    assert got == local and {r["subset"] for r in got} == {"x", "y"}
    assert read_jsonl(tmp_path / "ray.errors.jsonl") == read_jsonl(tmp_path / "local.errors.jsonl")
    summary = json.loads((tmp_path / "ray.summary.json").read_text())
    expected = json.loads((tmp_path / "local.summary.json").read_text())
    for key in ("rows", "accuracy", "ties", "errors", "subsets"):
        assert summary[key] == expected[key]
    assert summary["run"]["rows"] == 13


def test_resume_scores_only_the_missing_chunks_and_refuses_other_arguments(tmp_path, rng, capsys):
    rows = [{"id": f"r{i}", "prompt": sentence(rng), "response": " " + sentence(rng)} for i in range(40)]
    rows[17] = {"id": "bad", "prompt": "no response"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    run_ray("score", "--input", src, "--output", out, "--chunk-rows", 8)
    full, errors = folder_rows(out), (tmp_path / "out.errors.jsonl").read_bytes()
    assert len(full) == 39 and len(part_files(out)) == 5
    capsys.readouterr()
    # a lost part (chunk 16-23, with the error row), an uncommitted part and half a journal line, as a kill leaves
    os.remove(out / "part-000000000016.parquet")
    (out / "part-000000000024.parquet.tmp").write_bytes(b"partial")
    with open(out / STATE_DIR / JOURNAL, "a") as f:
        f.write('{"chunk": 99, "ro')
    run_ray("score", "--input", src, "--output", out, "--chunk-rows", 8)
    assert "32 rows were done, 8 scored now" in capsys.readouterr().err
    assert folder_rows(out) == full  # the same rows, once each, the same floats (the same chunks)
    assert (tmp_path / "out.errors.jsonl").read_bytes() == errors
    assert sorted(os.listdir(out)) == sorted([os.path.basename(p) for p in part_files(out)] + [STATE_DIR])
    run_ray("score", "--input", src, "--output", out, "--chunk-rows", 8)
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="alpha") as refused:  # one line, a usage error as on the local engine
        run_ray("score", "--input", src, "--output", out, "--chunk-rows", 8, "--alpha", "2")
    assert refused.value.code == 2
    assert folder_rows(out) == full  # refused before touching anything (--overwrite: see the filter test)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not mine")
    with pytest.raises(SystemExit, match="other files than endokern") as refused:
        run_ray("score", "--input", src, "--output", foreign)
    assert refused.value.code == 2
    for bad in (("--output", tmp_path / "o.jsonl"), ("--output", "-"), ("--num-shards", 2)):
        with pytest.raises(SystemExit):
            run_ray("score", "--input", src, "--output", tmp_path / "o2", *bad)


@pytest.mark.parametrize("stopped", ["interrupted", "finished"])
def test_a_resume_with_another_fields_mapping_is_refused_and_touches_nothing(tmp_path, rng, capsys, stopped):
    rows = [{"q": sentence(rng), "good": " " + sentence(rng), "bad": " " + sentence(rng)} for _ in range(12)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ("score", "--input", src, "--output", out, "--chunk-rows", 4)
    run_ray(*args, "--fields", "prompt=q,response=good")
    if stopped == "interrupted":
        os.remove(out / "part-000000000004.parquet")  # a chunk not yet written, as a kill leaves it

    def files():
        return {os.path.join(d, n): open(os.path.join(d, n), "rb").read() for d, _, names in os.walk(tmp_path)
                for n in names}

    before = files()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="fields") as refused:
        run_ray(*args, "--fields", "prompt=q,response=bad")
    assert refused.value.code == 2 and files() == before
    run_ray(*args, "--fields", "prompt=q,response=good")
    assert len(folder_rows(out)) == 12


def test_filter_by_min_reward_and_top_fraction(tmp_path, rng):
    rows = [{"id": i, "prompt": sentence(rng), "response": " " + sentence(rng), "meta": i * 2} for i in range(20)]
    src = write_jsonl(tmp_path / "in.jsonl", rows + [{"id": 99, "prompt": "a"}])
    rm = EndoRM.from_pretrained(FIXTURE, device="cpu")
    rewards = sorted(r.reward for r in rm.score([r["prompt"] for r in rows], [r["response"] for r in rows]))
    cut = (rewards[9] + rewards[10]) / 2
    for how in (("--min-reward", cut), ("--top-fraction", 0.25, "--min-reward", (rewards[-2] + rewards[-3]) / 2)):
        with one_thread():
            run_cli("filter", "--input", src, "--output", tmp_path / "local.jsonl", "--chunk-rows", 6, *how,
                    "--overwrite")
        run_ray("filter", "--input", src, "--output", tmp_path / "kept", "--chunk-rows", 6, *how, "--overwrite")
        kept, rejected = folder_rows(tmp_path / "kept"), folder_rows(tmp_path / "kept.rejected")
        assert kept == read_jsonl(tmp_path / "local.jsonl")
        assert rejected == read_jsonl(tmp_path / "local.rejected.jsonl")
        assert read_jsonl(tmp_path / "kept.errors.jsonl") == read_jsonl(tmp_path / "local.errors.jsonl")
        assert len(kept) + len(rejected) == 20 and all(r["meta"] == r["id"] * 2 for r in kept + rejected)
    assert len(kept) == 2 and any("top-fraction" in r["reason"] for r in rejected)
    assert any("min-reward" in r["reason"] for r in rejected)


def test_scorer_in_a_users_pipeline(rng):
    rows = [{"id": i, "prompt": sentence(rng), "response": " " + sentence(rng)} for i in range(12)]
    rows[5] = {"id": 5, "prompt": "no response", "response": None}
    ds = ray.data.from_items(rows)
    out = ds.map_batches(Scorer, fn_constructor_kwargs={"model": FIXTURE, "device": "cpu"},
                         compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, batch_format="pyarrow").take_all()
    assert len(out) == 12 and sum(r["stream"] == "output" for r in out) == 11
    errors = [r for r in out if r["stream"] == "errors"]
    assert len(errors) == 1 and "response" in errors[0]["reason"] and errors[0]["id"] == 5
    rm = EndoRM.from_pretrained(FIXTURE, device="cpu")
    good = [r for r in rows if r["response"]]
    expected = {r["id"]: res.reward for r, res in zip(good, rm.score([r["prompt"] for r in good],
                                                                      [r["response"] for r in good]))}
    got = {r["id"]: r["reward"] for r in out if r["stream"] == "output"}
    assert sorted(got) == sorted(expected)
    # each reward on its own row (other batches than the library's: equal to float32 rounding, not bit for bit)
    for i in expected:
        assert got[i] == pytest.approx(expected[i], rel=1e-5, abs=1e-5), i
    assert len(set(expected.values())) == len(expected)  # distinct rewards: a swap of two rows cannot pass


def test_a_truncated_gzip_input_scores_its_complete_rows_and_fails_as_the_local_engine_does(tmp_path, rng):
    import gzip

    rows = [{"prompt": sentence(rng, 2, 6), "response": " " + sentence(rng, 2, 6), "pad": "x" * rng.randint(0, 300)}
            for _ in range(120)]
    data = gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in rows))
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(data[: rng.randint(len(data) // 4, len(data) * 3 // 4)])
    with pytest.raises(SystemExit, match="damaged input") as local:
        run_cli("score", "--input", src, "--output", tmp_path / "local.jsonl", "--chunk-rows", 16)
    with one_thread(), pytest.raises(SystemExit, match="damaged input") as distributed:
        run_ray("score", "--input", src, "--output", tmp_path / "ray", "--chunk-rows", 16)
    assert local.value.code == distributed.value.code == 1
    complete = read_jsonl(tmp_path / "local.jsonl")
    assert 0 < len(complete) < len(rows)
    got = folder_rows(tmp_path / "ray")
    assert [r["id"] for r in got] == [r["id"] for r in complete] == list(range(len(complete)))
    for a, b in zip(got, complete):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-5, abs=1e-5)  # batch composition (padding) apart
    assert read_jsonl(tmp_path / "ray.errors.jsonl") == read_jsonl(tmp_path / "local.errors.jsonl")
    assert read_jsonl(tmp_path / "ray.errors.jsonl")[-1]["damaged"] is True
