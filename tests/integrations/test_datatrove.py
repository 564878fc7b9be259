"""endokern.integrations.datatrove against the real datatrove, with the stories260K fixture: a LocalPipelineExecutor
pipeline (reader -> EndoRMFilter -> writer, with an exclusion writer) keeps exactly the documents ``endokern filter
--min-reward`` keeps on the same rows, with the same rewards; the annotator's prompt sources (a metadata key, a fixed
instruction, none) against ``endokern score``; the steps pickle and copy without their model.

Rewards are compared within 1e-5 relative (batches of other compositions round differently); the threshold is put
midway between two rewards far enough apart that no such rounding can move a document across it.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import pickle
import random

import pytest
from model_utils import FIXTURE

try:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
except ImportError:
    if os.environ.get("ENDOKERN_REQUIRE_DATATROVE") == "1":
        raise  # CI installs endokern[datatrove]: a missing datatrove must fail the run, not skip it
    pytest.skip("datatrove is not installed (pip install 'endokern[datatrove]')", allow_module_level=True)

from test_cli import read_jsonl, sentence, write_jsonl  # noqa: E402

from endokern.cli import main  # noqa: E402
from endokern.integrations.datatrove import EndoRMAnnotator, EndoRMFilter  # noqa: E402


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def run_cli(*args):
    assert main([*map(str, args), "--model", FIXTURE, "--no-progress"]) == 0


def cli_score(tmp_path, rows, *args):
    """``endokern score`` of ``rows``: output rows by id, error rows by row number."""
    src = write_jsonl(tmp_path / "cli-in.jsonl", rows)
    out = tmp_path / "cli-out.jsonl"
    run_cli("score", "--input", src, "--output", out, "--overwrite", *args)
    errors = out.parent / "cli-out.errors.jsonl"
    return {r["id"]: r for r in read_jsonl(out)}, {e["row"]: e for e in read_jsonl(errors)} if errors.exists() else {}


def close(a, b):
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


def folder_docs(folder):
    docs = []
    for name in sorted(os.listdir(folder)):
        with gzip.open(os.path.join(folder, name), "rt") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def random_texts(rng, n):
    texts = [" " + sentence(rng, 1, 20) for _ in range(n)]
    for i in rng.sample(range(n), 2):
        texts[i] = " " + sentence(rng, 60, 70)  # longer than --max-length 64: unscorable (datatrove drops empty texts)
    return texts


def test_a_filter_pipeline_keeps_what_endokern_filter_keeps_with_the_same_rewards(tmp_path, rng):
    texts = random_texts(rng, 37)
    rows = [{"id": f"doc-{i}", "prompt": "", "response": t} for i, t in enumerate(texts)]
    scored, _ = cli_score(tmp_path, rows, "--max-length", 64)
    rewards = sorted(r["reward"] for r in scored.values())
    gaps = [(b - a, i) for i, (a, b) in enumerate(zip(rewards, rewards[1:])) if len(rewards) // 4 <= i]
    gap, at = max(gaps[: len(rewards) // 2])  # a wide gap near the middle: no rounding moves a reward across it
    assert gap > 1e-3
    threshold = (rewards[at] + rewards[at + 1]) / 2

    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_cli("filter", "--input", src, "--output", tmp_path / "kept.jsonl", "--min-reward", threshold,
            "--max-length", 64)
    kept = {r["id"]: r for r in read_jsonl(tmp_path / "kept.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "kept.rejected.jsonl")}
    errors = read_jsonl(tmp_path / "kept.errors.jsonl")
    assert kept and rejected and len(errors) == 2

    data = tmp_path / "documents"
    data.mkdir()
    half = len(rows) // 2  # two files: each of the two tasks reads one
    for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
        write_jsonl(data / name, [{"id": r["id"], "text": r["response"]} for r in part])
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(data)),
        EndoRMFilter(FIXTURE, min_reward=threshold, exclusion_writer=JsonlWriter(str(tmp_path / "dropped")),
                     batch_size=8, max_length=64),
        JsonlWriter(str(tmp_path / "out")),
    ], tasks=2, workers=1, logging_dir=str(tmp_path / "logs")).run()

    out = {d["id"]: d for d in folder_docs(tmp_path / "out")}
    dropped = {d["id"]: d for d in folder_docs(tmp_path / "dropped")}
    assert set(out) == set(kept)
    assert set(dropped) == set(rejected) | {rows[e["row"]]["id"] for e in errors}
    for doc_id, doc in out.items():
        for name in ("reward", "reward_mean", "logprob"):
            assert close(doc["metadata"][name], kept[doc_id][name]), (doc_id, name)
        assert doc["metadata"]["num_tokens"] == kept[doc_id]["num_tokens"]
    for doc_id, doc in dropped.items():
        if doc_id in rejected:
            assert doc["metadata"]["filter_reason"] == "min_reward"
            assert close(doc["metadata"]["reward"], rejected[doc_id]["reward"])
        else:
            assert doc["metadata"]["filter_reason"] == "unscorable"
            assert "--max-length 64" in doc["metadata"]["reward_error"]


def test_the_annotator_takes_the_prompt_from_metadata_a_fixed_instruction_or_none(tmp_path, rng):
    texts = [" " + sentence(rng, 2, 12) for _ in range(9)]
    prompts = [sentence(rng, 1, 8) for _ in texts]
    docs = lambda: [Document(text=t, id=str(i), metadata={"instruction": p})  # noqa: E731
                    for i, (t, p) in enumerate(zip(texts, prompts))]
    fixed = sentence(rng, 2, 6)
    cases = [
        (EndoRMAnnotator(FIXTURE, prompt_key="instruction", batch_size=4), prompts, ()),
        (EndoRMAnnotator(FIXTURE, prompt=fixed, alpha=0.7), [fixed] * len(texts), ("--alpha", "0.7")),
        (EndoRMAnnotator(FIXTURE, reduce="mean"), [""] * len(texts), ("--reduce", "mean")),
    ]
    for step, want_prompts, args in cases:
        annotated = list(step.run(iter(docs()), rank=0, world_size=1))
        assert [d.id for d in annotated] == [str(i) for i in range(len(texts))]  # every document, in order
        want, _ = cli_score(tmp_path, [{"id": str(i), "prompt": p, "response": t}
                                       for i, (p, t) in enumerate(zip(want_prompts, texts))], *args)
        for doc in annotated:
            for name in ("reward", "reward_mean", "logprob"):
                assert close(doc.metadata[name], want[doc.id][name]), (step.prompt_key, step.prompt, name)

    missing = [Document(text=" a cat", id="0", metadata={}), Document(text="", id="1", metadata={"instruction": "x"})]
    out = list(EndoRMAnnotator(FIXTURE, prompt_key="instruction").run(iter(missing)))
    assert "missing field 'prompt'" in out[0].metadata["reward_error"] and "reward" not in out[0].metadata
    assert "empty response" in out[1].metadata["reward_error"]
    with pytest.raises(ValueError, match="not both"):
        EndoRMFilter(FIXTURE, prompt_key="instruction", prompt="Say something.")


def test_a_variant_decides_what_the_filter_keeps(rng):
    docs = [Document(text=" " + sentence(rng, 2, 12), id=str(i)) for i in range(12)]
    annotated = list(EndoRMAnnotator(FIXTURE, variant="loglik-mean").run(iter(copy.deepcopy(docs))))
    means = sorted(d.metadata["reward"] for d in annotated)
    assert all(close(d.metadata["reward"], d.metadata["reward_mean"]) for d in annotated)  # a mean variant
    threshold = (means[5] + means[6]) / 2
    step = EndoRMFilter(FIXTURE, variant="loglik-mean", min_reward=threshold, batch_size=5)
    kept = list(step.run(iter(docs)))
    assert sorted(d.id for d in kept) == sorted(d.id for d in annotated if d.metadata["reward"] >= threshold)


def test_the_steps_pickle_and_copy_without_their_model():
    step = EndoRMFilter(FIXTURE, min_reward=-50.0, alpha=0.5)
    list(step.run(iter([Document(text=" a cat", id="0")])))
    assert step.scorer._scorers is not None  # loaded
    blob = pickle.dumps(step)
    assert len(blob) < 100_000  # the model (about 1 MB of weights) is not in it
    again = pickle.loads(blob)
    assert again.scorer._scorers is None and again.scorer.options == {"alpha": 0.5} and again.min_reward == -50.0
    assert copy.deepcopy(step).scorer._scorers is None
    with pytest.raises(TypeError, match="unknown option"):
        EndoRMFilter(FIXTURE, temperature=2.0)
