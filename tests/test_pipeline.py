"""process_chunk, the unit both engines run: rows -> examples -> one scoring call -> output and error rows."""

from __future__ import annotations

import random

import pytest
from model_utils import fixture_model
from test_cli import sentence

from endokern import EndoRM
from endokern.io import InputRow
from endokern.pipeline import CompareTask, FilterTask, RankTask, RunStats, ScoreTask, process_chunk


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


@pytest.fixture(scope="module")
def rm():
    model, tokenizer = fixture_model()
    return EndoRM(model, tokenizer)


def chunk_of(rows, first=0, subset=None):
    return [(InputRow(first + i, row, None) if isinstance(row, dict) else InputRow(first + i, None, row), subset)
            for i, row in enumerate(rows)]


def test_outputs_and_errors_in_input_order_with_row_numbers(rm, rng):
    first = rng.randint(0, 10**6)
    # good rows stay far below --max-length (at most 16 words); the long one is far above it
    rows = [{"prompt": sentence(rng, 1, 8), "response": " " + sentence(rng, 1, 8)} for _ in range(rng.randint(6, 14))]
    bad = sorted(rng.sample(range(len(rows)), 3))
    rows[bad[0]] = {"prompt": "no response"}
    rows[bad[1]] = "bad JSON: Expecting value"  # an unparseable line, as the readers report it
    rows[bad[2]] = {"id": "long", "prompt": "the " * 150, "response": " end"}
    encoder = rm.encoder("plain")
    stats = RunStats()
    streams = process_chunk(rm, ScoreTask(), encoder, chunk_of(rows, first), max_length=120, stats=stats)
    assert [e["row"] for e in streams["errors"]] == [first + b for b in bad]
    assert streams["errors"][2]["id"] == "long" and "max-length 120" in streams["errors"][2]["reason"]
    good = [i for i in range(len(rows)) if i not in bad]
    assert [o["id"] for o in streams["output"]] == [first + i for i in good]
    expected = rm.score([rows[i]["prompt"] for i in good], [rows[i]["response"] for i in good], template="plain")
    assert [o["reward"] for o in streams["output"]] == [r.reward for r in expected]  # the same batches: same bits
    assert stats.examples == len(good)


def test_each_task_makes_its_rows(rm, rng):
    encoder = rm.encoder("plain")
    prompt = sentence(rng)
    responses = [" " + sentence(rng) for _ in range(rng.randint(2, 5))]
    rank = process_chunk(rm, RankTask(), encoder, chunk_of([{"prompt": prompt, "responses": responses}]))["output"]
    rewards = [r.reward for r in rm.score([prompt] * len(responses), responses, template="plain")]
    assert rank[0]["rewards"] == pytest.approx(rewards, rel=1e-5, abs=1e-5)
    assert rank[0]["best"] == max(range(len(rewards)), key=lambda i: rewards[i])
    pair = {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    out = process_chunk(rm, CompareTask("plain"), encoder, chunk_of([pair], subset="file"))["output"][0]
    assert out["subset"] == "file" and out["margin"] == out["reward_chosen"] - out["reward_rejected"]
    cut = sorted(rewards)[len(rewards) // 2]
    rows = [{"prompt": prompt, "response": r, "keep": "me"} for r in responses]
    streams = process_chunk(rm, FilterTask(cut), encoder, chunk_of(rows))
    assert all(r["reward"] >= cut and r["keep"] == "me" for r in streams["output"])
    assert all(r["reward"] < cut and "min-reward" in r["reason"] for r in streams.get("rejected", []))
    assert len(streams["output"]) + len(streams.get("rejected", [])) == len(rows)
