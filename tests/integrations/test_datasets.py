"""endokern.integrations.datasets against the real HF datasets, with the stories260K fixture: ``ds.map`` with the
mapper equals ``endokern score`` (rewards within 1e-5 relative, the same rows refused), a second identical map reads
the cache while any changed option misses it, ``fields`` and rows with no prompt, ``num_proc`` workers, and a
tokenizer that adds no BOS."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil

import pytest
from model_utils import FIXTURE

try:
    import datasets
    from datasets.fingerprint import Hasher
except ImportError:
    if os.environ.get("ENDOKERN_REQUIRE_DATASETS") == "1":
        raise  # CI installs endokern[datasets]: a missing datasets must fail the run, not skip it
    pytest.skip("datasets is not installed (pip install 'endokern[datasets]')", allow_module_level=True)

from test_cli import read_jsonl, sentence, write_jsonl  # noqa: E402

from endokern.cli import main  # noqa: E402
from endokern.integrations.datasets import OUTPUT_COLUMNS, EndoRMMapper, document_start  # noqa: E402


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def cli_score(tmp_path, rows, *args, model=FIXTURE):
    """``endokern score`` of ``rows``: one dict per row, in order (the output row, or the error row)."""
    src = write_jsonl(tmp_path / "cli-in.jsonl", rows)
    out = tmp_path / "cli-out.jsonl"
    assert main(["score", "--input", src, "--output", str(out), "--overwrite", "--no-progress", "--model", model,
                 *map(str, args)]) == 0
    errors_path = tmp_path / "cli-out.errors.jsonl"
    errors = {e["row"]: e for e in read_jsonl(errors_path)} if errors_path.exists() else {}
    outputs = iter(read_jsonl(out))
    return [errors[i] if i in errors else next(outputs) for i in range(len(rows))]


def close(a, b):
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


def assert_same(mapped, want):
    assert len(mapped) == len(want)
    for got, row in zip(mapped, want):
        if "reason" in row:
            assert got["reward_error"] == row["reason"] and math.isnan(got["reward"]) and got["num_tokens"] == 0
            continue
        assert got["reward_error"] == "", got
        for name in ("reward", "reward_mean", "logprob"):
            assert close(got[name], row[name]), (name, got, row)
        assert got["num_tokens"] == row["num_tokens"]


def random_rows(rng, n):
    rows = [{"prompt": sentence(rng, 1, 10), "response": " " + sentence(rng, 1, 14)} for _ in range(n)]
    rows[rng.randrange(n)]["response"] = ""  # no tokens under the plain template: an error row
    return rows


def dataset(tmp_path, rows, name="rows.jsonl"):
    """A dataset backed by cache files (an in-memory one is never cached)."""
    path = write_jsonl(tmp_path / name, rows)
    return datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_map_equals_endokern_score_and_a_second_identical_map_reads_the_cache(tmp_path, rng, monkeypatch):
    rows = random_rows(rng, 41)
    ds = dataset(tmp_path, rows)
    first = ds.map(EndoRMMapper(FIXTURE), batched=True, batch_size=16, with_rank=True)
    assert set(OUTPUT_COLUMNS) <= set(first.column_names)
    assert_same(first.to_list(), cli_score(tmp_path, rows))

    calls = []
    call = EndoRMMapper.__call__
    monkeypatch.setattr(EndoRMMapper, "__call__", lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
    again = ds.map(EndoRMMapper(FIXTURE), batched=True, batch_size=16, with_rank=True)  # a new, equal mapper
    assert calls == [] and again._fingerprint == first._fingerprint and again.cache_files == first.cache_files

    other = ds.map(EndoRMMapper(FIXTURE, alpha=0.5), batched=True, batch_size=16, with_rank=True)
    assert calls and other._fingerprint != first._fingerprint
    assert_same(other.to_list(), cli_score(tmp_path, rows, "--alpha", 0.5))


def test_the_fingerprint_is_the_options_and_nothing_else(tmp_path):
    mapper = EndoRMMapper(FIXTURE, alpha=0.5, fields="prompt=q,response=a")
    before = Hasher.hash(mapper)
    mapper.score_rows([{"q": "Once", "a": " upon a time"}])  # loads the model
    assert Hasher.hash(mapper) == before
    assert Hasher.hash(EndoRMMapper(FIXTURE, fields={"response": "a", "prompt": "q"}, alpha=0.5)) == before
    copy_dir = tmp_path / "model-copy"
    shutil.copytree(FIXTURE, copy_dir)
    changed = [
        EndoRMMapper(FIXTURE, alpha=0.5), EndoRMMapper(FIXTURE, alpha=0.6, fields="prompt=q,response=a"),
        EndoRMMapper(str(copy_dir), alpha=0.5, fields="prompt=q,response=a"),
    ] + [EndoRMMapper(FIXTURE, alpha=0.5, fields="prompt=q,response=a", **{name: value}) for name, value in (
        ("template", "plain"), ("reduce", "mean"), ("gamma", 0.9), ("terminal", "bootstrap"), ("max_length", 99),
        ("append_eos", True), ("dtype", "bfloat16"), ("batch_tokens", 64), ("variant", "loglik"), ("device", "cpu"))]
    hashes = {Hasher.hash(m) for m in changed}
    assert len(hashes) == len(changed) and before not in hashes
    blob = pickle.dumps(mapper)
    assert len(blob) < 10_000  # options, not the model
    assert pickle.loads(blob)._scorers is None and repr(pickle.loads(blob)) == repr(mapper)
    with pytest.raises(TypeError, match="unknown option"):
        EndoRMMapper(FIXTURE, temperature=1.0)
    with pytest.raises(ValueError, match="alpha"):
        EndoRMMapper(FIXTURE, alpha=0)
    with pytest.raises(ValueError, match="fields"):
        EndoRMMapper(FIXTURE, fields="question")
    with pytest.raises(ValueError, match="variant"):
        EndoRMMapper(FIXTURE, variant="judge")


def test_fields_map_the_columns_and_a_batch_with_no_prompt_is_text_from_bos(tmp_path, rng):
    rows = random_rows(rng, 23)
    renamed = [{"question": r["prompt"], "answer": {"text": r["response"]}} for r in rows]
    ds = dataset(tmp_path, renamed, "renamed.jsonl")
    mapped = ds.map(EndoRMMapper(FIXTURE, fields="prompt=question,response=answer.text"), batched=True,
                    with_rank=True)
    assert_same(mapped.to_list(), cli_score(tmp_path, rows))

    texts = dataset(tmp_path, [{"text": r["response"]} for r in rows], "texts.jsonl")
    bare = texts.map(EndoRMMapper(FIXTURE, fields="response=text", variant="mean"), batched=True, with_rank=True)
    want = cli_score(tmp_path, [{"prompt": "", "response": r["response"]} for r in rows], "--reduce", "mean")
    assert_same(bare.to_list(), want)


def test_num_proc_workers_give_the_same_rewards(tmp_path, rng):
    rows = random_rows(rng, 30)
    ds = dataset(tmp_path, rows)
    mapped = ds.map(EndoRMMapper(FIXTURE), batched=True, batch_size=8, with_rank=True, num_proc=2)
    assert_same(mapped.to_list(), cli_score(tmp_path, rows))


def test_a_tokenizer_that_adds_no_bos_starts_a_text_at_its_bos_token(tmp_path, rng):
    folder = tmp_path / "no-bos"
    shutil.copytree(FIXTURE, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None  # a tokenizer that adds no BOS
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    mapper = EndoRMMapper(str(folder))
    tokenizer = mapper.load().tokenizer
    assert tokenizer("")["input_ids"] == [] and document_start(tokenizer) == tokenizer.bos_token == "<s>"
    responses = [" " + sentence(rng, 1, 12) for _ in range(7)]
    got = mapper({"response": responses})
    want = cli_score(tmp_path, [{"prompt": "<s>", "response": r} for r in responses], model=str(folder))
    assert_same([dict(zip(got, values)) for values in zip(*got.values())], want)
    # and equal to the fixture's own BOS-first scoring of the same texts
    with_bos = EndoRMMapper(FIXTURE)({"response": responses})
    assert all(close(a, b) for a, b in zip(got["reward"], with_bos["reward"]))
