"""Safe runs: a run on an output another run holds is refused, no run writes over its input, damaged input is
recorded, a huge field is refused before tokenizing, and every configuration mistake is one line before any file."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from limits import HANG_S
from model_utils import FIXTURE

from endokern.cli import main

WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was".split()


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def sentence(rng, low=2, high=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def cli(*args, model=FIXTURE):
    """(exit status, standard error) of one command; 0 when it returns."""
    return main([*map(str, args), "--model", model, "--no-progress"])


def refused(capsys, *args, model=FIXTURE):
    with pytest.raises(SystemExit) as exit_info:
        cli(*args, model=model)
    err = capsys.readouterr().err
    return exit_info.value.code, err


# ------------------------------------------------------------------------------------------------ 1: one run at a time


def _wait_for(predicate, proc, seconds=HANG_S):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.02)


def test_a_second_run_on_the_same_output_is_refused_and_a_killed_run_never_blocks(tmp_path, rng, capsys):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng, 20, 50)} for _ in range(1200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    lock = tmp_path / "out.lock"
    cmd = [sys.executable, "-m", "endokern", "score", "--model", FIXTURE, "--input", src, "--output", str(out),
           "--chunk-rows", "40", "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.exists(str(out) + ".progress.json"), first)
        assert first.poll() is None, "the first run ended before the second could start; give it more rows"
        code, err = refused(capsys, "score", "--input", src, "--output", out, "--chunk-rows", "40")
        assert code == 1 and "locked by a run still going" in err and f"pid {first.pid}" in err
        assert len(err.strip().splitlines()) == 1
        os.kill(first.pid, signal.SIGKILL)  # the lock dies with its process; the file it leaves is stale
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert lock.exists()
    assert cli("score", "--input", src, "--output", out, "--chunk-rows", "40") == 0
    got = read_jsonl(out)
    assert [r["id"] for r in got] == list(range(len(rows)))  # every row once: no duplicates, none lost
    assert not lock.exists()  # a run that ends cleanly removes its lock file


# ------------------------------------------------------------------------------------------- 2: never over the input


@pytest.mark.parametrize("role", ["output", "errors", "rejected", "checkpoint"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_no_run_writes_over_its_input(tmp_path, rng, capsys, role, how):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(5)]
    name = {"output": "data.jsonl", "errors": "data.errors.jsonl", "rejected": "data.rejected.jsonl",
            "checkpoint": "data.jsonl.progress.json"}[role]
    src = write_jsonl(tmp_path / name, rows)
    before = open(src, "rb").read()
    target = src
    if how != "same":  # the run names the input through a link
        target = str(tmp_path / ("link-" + name))
        (os.symlink if how == "symlink" else os.link)(src, target)
    output = target if role == "output" else str(tmp_path / "data.jsonl")
    extra = {"errors": ["--errors", target], "rejected": ["--rejected", target]}.get(role, [])
    command = "filter" if role == "rejected" else "score"
    if command == "filter":
        extra += ["--min-reward", "0"]
    for overwrite in ([], ["--overwrite"]):
        inputs = [target] if role == "checkpoint" else [src]
        if role == "checkpoint":  # the checkpoint of output data.jsonl is data.jsonl.progress.json, the input
            inputs, output = [src], str(tmp_path / "data.jsonl")
        code, err = refused(capsys, command, "--input", *inputs, "--output", output, *extra, *overwrite)
        assert code == 2 and "never writes over its input" in err and len(err.strip().splitlines()) == 1
        assert open(src, "rb").read() == before
        assert sorted(os.listdir(tmp_path)) == sorted({name, os.path.basename(target)})


# --------------------------------------------------------------------------------------------- 3: damaged gzip input


def test_a_truncated_gzip_input_scores_every_complete_row_and_records_where_reading_stopped(tmp_path, rng, capsys):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng), "pad": "x" * rng.randint(0, 400)}
            for _ in range(400)]
    data = gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in rows))
    cut = rng.randint(len(data) // 4, len(data) * 3 // 4)
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(data[:cut])
    with gzip.open(src, "rb") as f:  # what can be read before the damage: whole lines only
        readable = b""
        try:
            while True:
                piece = f.read1(1 << 16)
                if not piece:
                    break
                readable += piece
        except EOFError:
            pass
    complete = readable.count(b"\n")
    assert 0 < complete < len(rows)
    out = tmp_path / "out.jsonl"
    code, err = refused(capsys, "score", "--input", src, "--output", out, "--chunk-rows", "512")
    assert code == 1 and len(err.strip().splitlines()) == 1 or err.count("endokern: damaged input") == 1
    assert "endokern: damaged input" in err and f"reading stopped at row {complete}" in err
    assert [r["id"] for r in read_jsonl(out)] == list(range(complete))  # none lost in the unfinished chunk
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert errors == [{"row": complete, "reason": errors[0]["reason"], "damaged": True}]
    assert "ends early" in errors[0]["reason"]
    code, err = refused(capsys, "score", "--input", src, "--output", out)  # a rerun still says it failed
    assert code == 1 and "damaged input" in err


# -------------------------------------------------------------------------------------- 4: huge fields, bounded memory


def test_a_huge_field_is_refused_before_it_is_tokenized(tmp_path, rng, monkeypatch):
    from endokern.tokenization import Encoder

    huge = " ".join(rng.choice(WORDS) for _ in range(400_000))  # about 1.7 M characters
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(3)]
    rows.insert(1, {"prompt": sentence(rng), "response": huge})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    longest = []
    tokenize = Encoder._tokenize

    def spy(self, texts, special):
        longest.append(max((len(t) for t in texts), default=0))
        return tokenize(self, texts, special)

    monkeypatch.setattr(Encoder, "_tokenize", spy)
    assert cli("score", "--input", src, "--output", tmp_path / "out.jsonl", "--max-length", "64") == 0
    assert max(longest) < 10_000  # the huge text never reached the tokenizer
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["row"] for e in errors] == [1] and "characters" in errors[0]["reason"]
    assert "--max-length" in errors[0]["reason"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0, 2, 3]


# ---------------------------------------------------------------------- 5: one line, exit 2, before the model or files


def _no_chat_fixture(tmp_path):
    return FIXTURE


def _folder_without_tokenizer(tmp_path):
    folder = tmp_path / "model-no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(os.path.join(FIXTURE, name), folder / name)
    return str(folder)


CASES = [
    (["--alpha", "0"], "--alpha"), (["--alpha", "-1"], "--alpha"), (["--alpha", "nan"], "--alpha"),
    (["--gamma", "1.5"], "--gamma"), (["--gamma", "-0.1"], "--gamma"), (["--max-length", "0"], "--max-length"),
    (["--limit", "-1"], "--limit"), (["--num-shards", "2", "--shard-index", "2"], "shard-index"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--device", "toaster"], "--device"), (["--backend", "triton", "--device", "cpu"], "--backend triton"),
    (["--template", "chat"], "chat template"), (["--output", "{tmp}/out.txt"], "format"),
    (["--output", "{tmp}/out.json"], "JSON Lines"), (["--input", "{tmp}/missing.jsonl"], "no such file"),
    (["--input", "{tmp}"], "is a folder"), (["--fields", "answer=a"], "--fields"),
    (["--max-error-fraction", "2"], "--max-error-fraction"),
]


@pytest.mark.parametrize("args, says", CASES)
def test_every_configuration_mistake_is_one_line_exit_2_and_creates_nothing(tmp_path, rng, capsys, args, says,
                                                                            monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    src = write_jsonl(data / "in.jsonl", [{"prompt": sentence(rng), "response": " " + sentence(rng)}])
    work = tmp_path / "work"
    work.mkdir()
    args = [a.replace("{tmp}", str(work)) for a in args]
    import endokern.model
    import endokern.ops.registry as registry

    if "triton" in args and registry.unavailable_reason("triton", "cpu") is None:  # the interpreter is on in tests
        real = registry.unavailable_reason
        monkeypatch.setattr(registry, "unavailable_reason", lambda name, device=None: "triton runs CUDA tensors"
                            if name == "triton" else real(name, device))
    monkeypatch.setattr(endokern.model.EndoRM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    argv = ["score", "--input", src, "--output", work / "out.jsonl", *args]
    code, err = refused(capsys, *argv)
    assert code == 2, err
    assert err.startswith("endokern: ") and len(err.strip().splitlines()) == 1 and says in err, err
    assert os.listdir(work) == []


@pytest.mark.parametrize("model, says", [
    ("no-such-owner-xyz/no-such-model-xyz", "not a local path nor a known name"),
    ("./models/not-here", "no such model folder"),
    ("not a model name!", "is not a local path"),
    ("no-tokenizer", "no tokenizer files"),
])
def test_a_model_that_cannot_be_loaded_is_one_line_at_once(tmp_path, rng, capsys, monkeypatch, model, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network: no retries, no waiting
    if model == "no-tokenizer":
        model = _folder_without_tokenizer(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": sentence(rng), "response": " " + sentence(rng)}])
    started = time.perf_counter()
    code, err = refused(capsys, "score", "--input", src, "--output", tmp_path / "out.jsonl", model=model)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - started < 10
    assert not os.path.exists(tmp_path / "out.jsonl") and not os.path.exists(tmp_path / "out.errors.jsonl")


def test_a_failed_run_is_exit_1_and_debug_shows_the_traceback(tmp_path, rng, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": sentence(rng)} for _ in range(3)])  # no response anywhere
    code, err = refused(capsys, "score", "--input", src, "--output", tmp_path / "out.jsonl")
    assert code == 1 and "no row could be scored" in err and "missing field 'response'" in err
    assert "Traceback" not in err
    code, err = refused(capsys, "score", "--input", src, "--output", tmp_path / "out2.jsonl", "--debug")
    assert code == 1 and "Traceback" in err


def test_a_terminal_on_standard_input_says_what_it_waits_for(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    code, err = refused(capsys, "score")
    assert code == 2 and "standard input is a terminal" in err


def test_backends_on_a_missing_cuda_say_so(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["backends", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "available" in out and all("unavailable" in line for line in out.strip().splitlines())


# ---------------------------------------------------------------------------------------- 6: when too many rows fail


def test_compare_with_no_scorable_row_fails_and_max_error_fraction_holds(tmp_path, rng, capsys):
    bad = [{"prompt": sentence(rng), "chosen": " " + sentence(rng)} for _ in range(4)]  # no 'rejected'
    src = write_jsonl(tmp_path / "bad.jsonl", bad)
    code, err = refused(capsys, "compare", "--input", src, "--output", tmp_path / "bad-out.jsonl")
    assert code == 1 and "all 4 rows are errors" in err and "row 0:" in err
    good = [{"prompt": sentence(rng), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)}
            for _ in range(6)]
    mixed = good[:3] + bad[:2] + good[3:]
    src = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    code, err = refused(capsys, "compare", "--input", src, "--output", tmp_path / "m.jsonl", "--max-error-fraction",
                        "0.2")
    assert code == 1 and "2 of 8 rows are errors" in err and "--max-error-fraction 0.2" in err
    assert cli("compare", "--input", src, "--output", tmp_path / "m2.jsonl", "--max-error-fraction", "0.25") == 0


# ------------------------------------------------------------------------------------ mixed ids in a Parquet output


def test_parquet_output_of_rows_with_and_without_ids(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(9)]
    for i in rng.sample(range(9), 4):
        rows[i]["id"] = f"q{i}"
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert cli("score", "--input", src, "--output", tmp_path / "out.parquet", "--chunk-rows", "4") == 0
    ids = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    assert ids == [str(row.get("id", i)) for i, row in enumerate(rows)]


# ------------------------------------------------------------------------------------------------ a resume is one run


@pytest.mark.parametrize("stopped", ["interrupted", "finished"])
def test_a_resume_with_another_fields_mapping_is_refused_and_touches_nothing(tmp_path, rng, capsys, monkeypatch,
                                                                            stopped):
    """Two mappings never meet in one output: a run stopped after its first chunk (or finished) and started again
    with another --fields is a usage error, and its files keep their bytes."""
    from endokern.io import RunWriter

    rows = [{"q": sentence(rng), "good": " " + sentence(rng, 6, 12), "bad": " " + sentence(rng, 1, 3)}
            for _ in range(6)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ("score", "--input", src, "--output", out, "--chunk-rows", 2)
    if stopped == "interrupted":
        commit = RunWriter.commit

        def stop_after_the_first_chunk(self, *a, **k):
            commit(self, *a, **k)
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(RunWriter, "commit", stop_after_the_first_chunk)
            code, _ = refused(capsys, *args, "--fields", "prompt=q,response=good")
        assert code == 130 and len(read_jsonl(out)) == 2
    else:
        assert cli(*args, "--fields", "prompt=q,response=good") == 0
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.name != "in.jsonl"}
    capsys.readouterr()
    code, err = refused(capsys, *args, "--fields", "prompt=q,response=bad")
    assert code == 2 and "fields" in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.name != "in.jsonl"} == files
    # the same mapping resumes (or finds the run complete) and ends with every row
    assert cli(*args, "--fields", "prompt=q,response=good") == 0
    assert len(read_jsonl(out)) == 6


# ------------------------------------------------------------------------------------------------ careless input


def test_a_lone_surrogate_makes_its_row_an_error_row_and_the_rest_are_scored(tmp_path, rng, capsys):
    """Python's JSON reader accepts ``"\\udc00"``, which is no Unicode text: in a text field, a nested field, a key
    or an id, the row is an error row saying so (its id escaped), and every other row is scored."""
    good = [{"id": f"g{i}", "prompt": sentence(rng), "response": " " + sentence(rng)} for i in range(4)]
    bad = [{"id": "b0", "prompt": "the \udc00 cat", "response": " ran"},
           {"id": "b\ud800x", "prompt": sentence(rng), "response": " " + sentence(rng)},
           {"id": "b2", "prompt": sentence(rng), "response": " sun", "meta": {"\udfff": 1}},
           {"id": "b3", "messages": [{"role": "user", "content": "hi \udc80"}, {"role": "assistant", "content": "x"}]}]
    rows = good + bad
    rng.shuffle(rows)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json escapes the surrogates as \udcxx
    out = tmp_path / "out.jsonl"
    assert cli("score", "--input", src, "--output", out) == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(r["id"] for r in good)
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(e["row"] for e in errors) == sorted(i for i, r in enumerate(rows) if r in bad)
    assert all("lone surrogate" in e["reason"] for e in errors)
    assert ascii("b\ud800x") in {e.get("id") for e in errors}  # escaped, so the errors file is UTF-8


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_a_parquet_input_that_cannot_be_opened_is_refused_before_any_file(tmp_path, rng, capsys, damage):
    import pyarrow as pa

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [sentence(rng)], "response": [" " + sentence(rng)]}), src)
    data = src.read_bytes()
    src.write_bytes(data[: rng.randint(1, len(data) - 1)] if damage == "truncated" else b"prompt,response\nx,y\n")
    code, err = refused(capsys, "score", "--input", src, "--output", tmp_path / "out.jsonl")
    assert code == 2 and "is not a Parquet file" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
