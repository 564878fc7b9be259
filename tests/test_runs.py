"""endokern.run: the one file-run API behind the command line, from Python."""

from __future__ import annotations

import gzip
import json
import random
import shutil

import pytest
from model_utils import FIXTURE, fixture_model
from test_cli import read_jsonl, run_cli, sentence, write_jsonl
from test_tokenization import chat_tokenizer  # noqa: F401  (a fixture)

import endokern
from endokern import EndoRM, runs
from endokern.settings import Settings, SettingsError


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def fixture_rm(**kwargs):
    model, tokenizer = fixture_model()
    return EndoRM(model, tokenizer, **kwargs)


def test_python_run_writes_what_the_command_writes(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)}
            for _ in range(rng.randint(3, 9))]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows + [{"prompt": "a", "chosen": "b"}])
    run_cli("compare", "--input", src, "--output", tmp_path / "cli.jsonl", "--chunk-rows", 4)
    lines = []
    result = endokern.run(Settings(command="compare", model=FIXTURE, input=[src], output=str(tmp_path / "py.jsonl"),
                                   chunk_rows=4, progress=False), log=lines.append)
    assert (tmp_path / "py.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    assert (tmp_path / "py.errors.jsonl").read_bytes() == (tmp_path / "cli.errors.jsonl").read_bytes()
    assert result.paths == {"output": str(tmp_path / "py.jsonl"), "errors": str(tmp_path / "py.errors.jsonl"),
                            "summary": str(tmp_path / "py.summary.json")}
    assert result.summary == json.loads((tmp_path / "py.summary.json").read_text())
    assert result.summary["rows"] == len(rows) and result.summary["errors"] == 1
    assert result.stats.rows == len(rows) + 1 and any("summary in" in line for line in lines)


def test_a_finished_run_loads_no_model(tmp_path, rng, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": sentence(rng), "response": " " + sentence(rng)}])
    settings = Settings(command="score", model=FIXTURE, input=[src], output=str(tmp_path / "o.jsonl"), progress=False)
    first = runs.run(settings, rm=fixture_rm())
    assert first.stats.rows == 1 and not first.already_complete

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for a run that was complete")

    monkeypatch.setattr(EndoRM, "from_settings", refuse)
    monkeypatch.setattr(EndoRM, "from_pretrained", refuse)
    again = runs.run(settings)
    assert again.already_complete and again.stats.rows == 0 and again.stats.resumed_from == 1


def test_a_wrong_option_is_refused_before_any_file(tmp_path):
    out = tmp_path / "sub" / "kept.jsonl"
    with pytest.raises(SettingsError, match="top-fraction"):
        runs.run(Settings(command="filter", model=FIXTURE, input=[str(tmp_path / "none.jsonl")], output=str(out),
                          top_fraction=1.5))
    assert not (tmp_path / "sub").exists()


def test_top_fraction_pass_from_python_holds_the_rule(tmp_path, rng):
    n = rng.randint(8, 30)
    rows = [{"id": i, "prompt": sentence(rng), "response": " " + sentence(rng)} for i in range(n)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    fraction = rng.uniform(0.1, 0.9)
    rm = fixture_rm()
    scores = [r.reward for r in rm.score([r["prompt"] for r in rows], [r["response"] for r in rows])]
    floor = sorted(scores)[-2] - 1e-3 if rng.random() < 0.5 else None  # sometimes a min-reward as well
    settings = Settings(command="filter", model=FIXTURE, input=[src], output=str(tmp_path / "top.jsonl"),
                        top_fraction=fraction, min_reward=floor, progress=False)
    result = runs.run(settings, rm=rm)
    kept, rejected = read_jsonl(tmp_path / "top.jsonl"), read_jsonl(tmp_path / "top.rejected.jsonl")
    keep = max(1, int(round(fraction * n)))
    assert result.filtered["scored"] == n and result.filtered["kept"] == len(kept)
    assert len(kept) + len(rejected) == n
    ranked = sorted(range(n), key=lambda i: -scores[i])
    expected = {i for i in ranked[:keep] if floor is None or scores[i] >= floor}
    assert {r["id"] for r in kept} == expected  # tolerance-free: the scored rows are rescored identically here
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)  # input order kept


def test_threshold_and_reasons(rng):
    rewards = [rng.gauss(0, 5) for _ in range(rng.randint(1, 200))]
    fraction = rng.uniform(0.01, 1.0)
    t = runs.top_fraction_threshold(rewards, fraction)
    keep = max(1, int(round(fraction * len(rewards))))
    assert sum(r >= t for r in rewards) == keep  # distinct random rewards: exactly the top ``keep``
    assert runs.top_fraction_threshold([], fraction) == float("inf")
    assert runs.rejection(t, t, None) is None and "top-fraction" in runs.rejection(t - 1, t, None)
    assert "min-reward" in runs.rejection(t, t, t + 1)
    with pytest.raises(ValueError):
        runs.top_fraction_threshold(rewards, 0.0)


def test_files_are_named_by_one_rule_for_both_engines():
    local = runs.paths(Settings(command="filter", output="dir/Out.JSONL.GZ", min_reward=0.0))
    assert local == {"output": "dir/Out.JSONL.GZ", "errors": "dir/Out.errors.jsonl",
                     "rejected": "dir/Out.rejected.jsonl", "scored": "dir/Out.scored.jsonl"}
    ray = runs.paths(Settings(command="filter", output="dir/out/", min_reward=0.0, engine="ray"))
    assert ray == {"output": "dir/out", "errors": "dir/out.errors.jsonl", "rejected": "dir/out.rejected",
                   "scored": "dir/out/_endokern/scored"}
    assert runs.paths(Settings(command="compare", output="-")) == {"output": "-", "errors": "-", "summary": "-"}


def test_tokens_per_second_counts_a_shared_prompt_once(tmp_path, rng):
    """A preference pair's prompt runs once through the model (prompt sharing), and is counted once."""
    rm = fixture_rm()
    assert rm.share_prompts
    rows = [{"prompt": sentence(rng, 4, 12), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)}
            for _ in range(rng.randint(2, 6))]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = runs.run(Settings(command="compare", model=FIXTURE, input=[src], output=str(tmp_path / "o.jsonl"),
                               template="plain", progress=False), rm=rm)
    encoder = rm.encoder("plain")
    expected = 0
    for r in rows:
        chosen, rejected = encoder.encode([endokern.tokenization.TextExample(r["prompt"], r["chosen"]),
                                           endokern.tokenization.TextExample(r["prompt"], r["rejected"])])
        assert chosen.prompt_ids == rejected.prompt_ids
        expected += len(chosen.prompt_ids) + len(chosen.response_ids) + len(rejected.response_ids)
    assert result.stats.tokens == expected and result.stats.examples == 2 * len(rows)


def test_real_preference_layouts_give_the_margins_of_plain_pairs(tmp_path, rng, chat_tokenizer):
    """Labelled pairs, a conversation as the prompt and TRL's conversational formats, through a compare run,
    give exactly the margins of the same pairs written as prompt / chosen / rejected strings."""
    model, _ = fixture_model()
    rm = EndoRM(model, chat_tokenizer)
    pairs = [(sentence(rng), sentence(rng), sentence(rng)) for _ in range(rng.randint(3, 6))]
    user = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    said = lambda x: {"role": "assistant", "content": x}  # noqa: E731
    flip = [rng.random() < 0.5 for _ in pairs]
    layouts = {
        "strings": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs],
        "labelled": [{"prompt": p, "response_a": r if f else c, "response_b": c if f else r, "label": "B>A" if f else "A"}
                     for (p, c, r), f in zip(pairs, flip)],
        "messages": [{"messages": user(p), "chosen": c, "rejected": r} for p, c, r in pairs],
        "trl-implicit": [{"chosen": user(p) + [said(c)], "rejected": user(p) + [said(r)]} for p, c, r in pairs],
        "trl-explicit": [{"prompt": user(p), "chosen": [said(c)], "rejected": [said(r)]} for p, c, r in pairs],
    }
    margins = {}
    for name, rows in layouts.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / f"{name}.out.jsonl"
        endokern.run(Settings(command="compare", input=[src], output=str(out), template="chat", progress=False),
                     rm=rm, log=lambda line: None)
        got = read_jsonl(out)
        assert len(got) == len(pairs), name
        margins[name] = [row["margin"] for row in got]
    for name, values in margins.items():
        assert values == margins["strings"], name


def test_fields_map_renamed_and_nested_columns(tmp_path, rng):
    rows = [(f"k{i}", sentence(rng), " " + sentence(rng)) for i in range(rng.randint(2, 6))]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": k, "prompt": p, "response": r} for k, p, r in rows])
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"key": k, "q": p, "a": {"text": r}} for k, p, r in rows])
    run_cli("score", "--input", plain, "--output", tmp_path / "plain.out.jsonl")
    run_cli("score", "--input", nested, "--output", tmp_path / "nested.out.jsonl",
            "--fields", "prompt=q,response=a.text,id=key")
    assert read_jsonl(tmp_path / "nested.out.jsonl") == read_jsonl(tmp_path / "plain.out.jsonl")
    with pytest.raises(SystemExit) as refused:  # an unknown endokern name is a usage error, before any file
        run_cli("score", "--input", nested, "--output", tmp_path / "bad.jsonl", "--fields", "question=q")
    assert refused.value.code == 2 and not (tmp_path / "bad.jsonl").exists()


def _documents(root, rng, files=("a.jsonl.gz", "sub/b.jsonl.gz")):
    docs = {}
    for name in files:
        path = root / "documents" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": f"{name}-{i}", "text": sentence(rng), "source": "test"} for i in range(rng.randint(5, 12))]
        rows[rng.randrange(len(rows))]["text"] = ""  # a document that cannot be scored keeps its line
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        docs[str(path)] = rows
    return docs


def test_dolma_attributes_mirror_the_documents_and_resume(tmp_path, rng, monkeypatch, capsys):
    """``--dolma-attributes NAME``: attributes/NAME/ mirrors documents/ file for file and row for row, with the
    rewards of ``endokern score`` on the same texts (scored from the beginning of sequence), and a run stopped in
    its second file resumes to the same bytes."""
    from endokern.io import RunWriter

    docs = _documents(tmp_path / "ds", rng)
    args = ("score", "--input", *docs, "--dolma-attributes", "endo", "--chunk-rows", 3)
    run_cli(*args)
    reference = {p: gzip.decompress((tmp_path / "ds" / "attributes" / "endo" / p).read_bytes())
                 for p in ("a.jsonl.gz", "sub/b.jsonl.gz")}
    for path, rows in docs.items():
        got = read_jsonl(path.replace("/documents/", "/attributes/endo/"))
        assert [g["id"] for g in got] == [r["id"] for r in rows]
        plain = [{"prompt": "", "response": r["text"]} for r in rows]
        src = write_jsonl(tmp_path / "plain.jsonl", plain)
        out = tmp_path / f"plain-{len(rows)}-{rng.randrange(10**6)}.jsonl"
        run_cli("score", "--input", src, "--output", out, "--template", "plain", "--chunk-rows", 3)
        scored = {s["id"]: s for s in read_jsonl(out)}
        for i, (g, r) in enumerate(zip(got, rows)):
            if not r["text"]:
                assert g["attributes"] == {}
                continue
            span = [0, len(r["text"])]
            assert g["attributes"] == {f"endo__{k}": [span + [scored[i][k]]]
                                       for k in ("reward", "reward_mean", "logprob", "num_tokens")}
    # stopped after the first chunk of the second file, then resumed: the same files
    shutil.rmtree(tmp_path / "ds" / "attributes")
    commit, calls = RunWriter.commit, []

    def stop_in_the_second_file(self, *a, **k):
        commit(self, *a, **k)
        calls.append(self.checkpoint_path)
        if "sub" in self.checkpoint_path:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunWriter, "commit", stop_in_the_second_file)
        with pytest.raises(SystemExit):
            run_cli(*args)
    run_cli(*args)
    assert "already complete" in capsys.readouterr().err  # the first file was finished and is not scored again
    for p, data in reference.items():
        assert gzip.decompress((tmp_path / "ds" / "attributes" / "endo" / p).read_bytes()) == data


@pytest.mark.parametrize("extra, says", [
    (("--output", "x.jsonl"), "leave out --output"), (("--template", "chat"), "plain text"),
    (("--dolma-attributes", "a__b"), "without '__'"), (("--engine", "ray"), "local engine"),
])
def test_dolma_attributes_refuse_what_cannot_mirror(tmp_path, rng, capsys, extra, says):
    docs = _documents(tmp_path / "ds", rng, files=("a.jsonl.gz",))
    with pytest.raises(SystemExit) as refused:
        run_cli("score", "--input", *docs, "--dolma-attributes", "endo", *extra)
    assert refused.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "ds" / "attributes").exists()
    loose = write_jsonl(tmp_path / "loose.jsonl", [{"text": "a"}])
    with pytest.raises(SystemExit, match="documents/ folder"):
        run_cli("score", "--input", loose, "--dolma-attributes", "endo")
