"""RowScorer, the one path of every front door: rows -> examples -> one scoring call -> output and error rows, in row
order with the errors in place."""

from __future__ import annotations

import random

import pytest
from model_utils import fixture_model
from test_cli import sentence
from test_tokenization import chat_tokenizer  # noqa: F401  (a fixture)

from endokern import EndoRM
from endokern.io import InputRow
from endokern.pipeline import CompareTask, FilterTask, RankTask, RowScorer, RunStats, ScoreTask
from endokern.tokenization import TextExample


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
    stats = RunStats()
    scorer = RowScorer(rm, ScoreTask(), template="plain", max_length=120)
    result = scorer.score_chunk(chunk_of(rows, first), stats=stats)
    streams = result.streams()
    per_row = result.per_row()  # one result per row, the error rows in their places
    assert [("reason" in r) for r in per_row] == [i in bad for i in range(len(rows))]
    assert [r["row"] for r in per_row if "reason" in r] == [first + b for b in bad]
    assert [e["row"] for e in streams["errors"]] == [first + b for b in bad]
    assert streams["errors"][2]["id"] == "long" and "max-length 120" in streams["errors"][2]["reason"]
    good = [i for i in range(len(rows)) if i not in bad]
    assert [o["id"] for o in streams["output"]] == [first + i for i in good]
    expected = rm.score([rows[i]["prompt"] for i in good], [rows[i]["response"] for i in good], template="plain")
    assert [o["reward"] for o in streams["output"]] == [r.reward for r in expected]  # the same batches: same bits
    assert stats.examples == len(good)


def test_each_task_makes_its_rows(rm, rng):
    prompt = sentence(rng)
    responses = [" " + sentence(rng) for _ in range(rng.randint(2, 5))]
    rank_row = {"prompt": prompt, "responses": responses}
    rank = RowScorer(rm, RankTask(), template="plain").score_chunk(chunk_of([rank_row])).streams()["output"]
    rewards = [r.reward for r in rm.score([prompt] * len(responses), responses, template="plain")]
    assert rank[0]["rewards"] == pytest.approx(rewards, rel=1e-5, abs=1e-5)
    assert rank[0]["best"] == max(range(len(rewards)), key=lambda i: rewards[i])
    pair = {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    scorer = RowScorer(rm, CompareTask("plain"), template="plain")
    out = scorer.score_chunk(chunk_of([pair], subset="file")).streams()["output"][0]
    assert out["subset"] == "file" and out["margin"] == out["reward_chosen"] - out["reward_rejected"]
    cut = sorted(rewards)[len(rewards) // 2]
    rows = [{"prompt": prompt, "response": r, "keep": "me"} for r in responses]
    streams = RowScorer(rm, FilterTask(cut), template="plain").score_chunk(chunk_of(rows)).streams()
    assert all(r["reward"] >= cut and r["keep"] == "me" for r in streams["output"])
    assert all(r["reward"] < cut and "min-reward" in r["reason"] for r in streams.get("rejected", []))
    assert len(streams["output"]) + len(streams.get("rejected", [])) == len(rows)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_token_id_rows_score_as_their_text_does(rm, rng, template, chat_tokenizer):
    """What a policy sampled, as ids: ``prompt_ids`` + ``response_ids`` and ``prompt`` + ``response_ids`` give the
    rewards of the text rows they encode; ids the model cannot take are error rows in their places."""
    model = rm if template == "plain" else EndoRM(rm.model, chat_tokenizer)
    texts = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(rng.randint(3, 7))]
    encoded = model.encoder(template).encode([TextExample(t["prompt"], t["response"]) for t in texts])
    vocab = model.head.weight.shape[0]
    rows = []
    for t, e in zip(texts, encoded):
        rows.append({"prompt_ids": e.prompt_ids, "response_ids": e.response_ids})
        rows.append({"prompt": t["prompt"], "response_ids": e.response_ids})
    bad = [{"prompt_ids": [1], "response_ids": [vocab]}, {"prompt_ids": [1], "response_ids": [-1]},
           {"prompt_ids": [1], "response_ids": [True]}, {"prompt_ids": [1], "response_ids": []},
           {"prompt": "a", "response": "b", "response_ids": [3]}, {"prompt_ids": [1], "response": " b"}]
    at = sorted(rng.sample(range(len(rows) + len(bad)), len(bad)))
    for i, b in zip(at, bad):
        rows.insert(i, b)
    scorer = RowScorer(model, ScoreTask(), template=template)
    got = scorer.score_rows(rows)
    expected = [r["reward"] for r in scorer.score_rows(texts)]
    assert [i for i, r in enumerate(got) if "reason" in r] == at
    good = [r["reward"] for r in got if "reason" not in r]
    assert good == pytest.approx([x for x in expected for _ in range(2)], rel=1e-5, abs=1e-5)
    assert "outside the model's vocabulary" in got[at[0]]["reason"] and "negative" in got[at[1]]["reason"]
