"""``endokern eval``: the judge baseline, bootstrap intervals, suites and the report."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
from model_utils import fixture_model
from test_cli import read_jsonl, run_cli, sentence, write_jsonl
from test_tokenization import chat_tokenizer  # noqa: F401 (the fixture)

from endokern import EndoRM, evaluation
from endokern.layouts import grid_accuracy, win
from endokern.tokenization import TextExample
from endokern.variants import parse_variants


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def test_row_metrics_follow_the_grid_protocol(rng):
    k = 3
    rewards = [rng.uniform(-5, 5) for _ in range(2 * k)]
    rewards[4] = rewards[0]  # a tie in cell (0, 1)
    row = {"k": k, "grid": True, "rewards": {"v": rewards}}
    margins = [[rewards[i] - rewards[k + j] for j in range(k)] for i in range(k)]
    got = evaluation.row_metrics(row, "v")
    assert got["accuracy"] == pytest.approx(sum(win(m) for line in margins for m in line) / 9)
    for name, value in grid_accuracy(margins).items():
        assert got[name] == pytest.approx(value)
    pair = {"k": 1, "grid": False, "rewards": {"v": [1.0, 1.0]}}
    assert evaluation.row_metrics(pair, "v") == {"accuracy": 0.5}


def _pass_file(tmp_path, name, wins):
    rows = [{"id": i, "k": 1, "grid": False, "rewards": {"paper": [1.0, 0.0] if w else [0.0, 1.0]}}
            for i, w in enumerate(wins)]
    path = write_jsonl(tmp_path / f"{name}.variants.jsonl", rows)
    return evaluation.PassResult(name, "variants", path, {"seconds": 1.0})


def test_bootstrap_intervals_and_sections(tmp_path, rng):
    variants = parse_variants("paper")
    wins_a = [rng.random() < 0.7 for _ in range(200)]
    wins_b = [rng.random() < 0.4 for _ in range(50)]
    passes = [_pass_file(tmp_path, "llmbar-natural", wins_a), _pass_file(tmp_path, "llmbar-adversarial-manual", wins_b),
              _pass_file(tmp_path, "rm-bench-chat", wins_a[:30]), _pass_file(tmp_path, "rm-bench-code", wins_b[:20])]
    report = evaluation.build_report(passes, variants, resamples=2000, seed=1)
    a = report["suites"]["llmbar-natural"]["variants"]["paper"]
    p = sum(wins_a) / 200
    assert a["accuracy"] == pytest.approx(p)
    lo, hi = a["accuracy_ci95"]
    half = 1.96 * math.sqrt(p * (1 - p) / 200)  # the normal approximation the bootstrap should be near
    assert lo < p < hi and abs((hi - lo) / 2 - half) < 0.25 * half
    pooled = report["sections"]["chat-hard"]["variants"]["paper"]
    assert pooled["accuracy"] == pytest.approx((sum(wins_a) + sum(wins_b)) / 250)  # pooled pairs
    macro = report["sections"]["rm-bench"]["variants"]["paper"]
    assert macro["accuracy"] == pytest.approx((sum(wins_a[:30]) / 30 + sum(wins_b[:20]) / 20) / 2)  # mean of domains
    assert macro["accuracy_ci95"][0] < macro["accuracy"] < macro["accuracy_ci95"][1]
    constant = evaluation.build_report([_pass_file(tmp_path, "x", [True] * 10)], variants, resamples=100)
    assert constant["suites"]["x"]["variants"]["paper"]["accuracy_ci95"] == [1.0, 1.0]
    md = evaluation.report_markdown(report)
    assert "chat-hard (pooled pairs)" in md and f"{pooled['accuracy']:.3f}" in md


def _data_dir(tmp_path, rng):
    """A data folder in the built-in layout with short rows the fixture can read (512 positions)."""
    root = tmp_path / "data"
    for sub in ("rm-bench", "llmbar", "hh-rlhf"):
        (root / sub).mkdir(parents=True)
    for domain in ("chat", "code", "safety-refuse"):
        rows = [{"id": i, "subset": domain, "prompt": sentence(rng), "chosen": [" " + sentence(rng) for _ in range(3)],
                 "rejected": [" " + sentence(rng) for _ in range(3)]} for i in range(6)]
        (root / "rm-bench" / f"{domain}_filtered.json").write_text(json.dumps(rows))
    for f in evaluation._LLMBAR.values():
        rows = [{"input": sentence(rng), "output_1": " " + sentence(rng), "output_2": " " + sentence(rng),
                 "label": rng.choice([1, 2])} for _ in range(7)]
        (root / "llmbar" / f).write_text(json.dumps(rows))
    with gzip.open(root / "hh-rlhf" / "harmless-base_test.jsonl.gz", "wt") as f:
        for _ in range(9):
            head = f"\n\nHuman: {sentence(rng)}\n\nAssistant:"
            f.write(json.dumps({"chosen": head + " " + sentence(rng), "rejected": head + " " + sentence(rng)}) + "\n")
    return root


def test_eval_cli_matches_compare_for_the_same_settings(tmp_path, rng):
    data = _data_dir(tmp_path, rng)
    out = tmp_path / "eval"
    run_cli("eval", "--suite", "all", "--data", data, "--output", out, "--template", "plain",
            "--variants", "paper,mean,gamma=0.93,loglik", "--bootstrap", "200")
    report = json.loads((out / "report.json").read_text())
    assert set(report["suites"]) == set(evaluation.SUITES)
    assert set(report["sections"]) == {"rm-bench", "chat-hard"}
    for suite, files in (("rm-bench-code", "rm-bench/code_filtered.json"), ("llmbar-natural", "llmbar/LLMBar__Natural.json"),
                         ("hh-rlhf-harmless", "hh-rlhf/harmless-base_test.jsonl.gz")):
        for variant, flags in (("paper", []), ("mean", ["--reduce", "mean"]), ("gamma=0.93", ["--gamma", "0.93"])):
            cmp_out = tmp_path / f"cmp-{suite}-{variant}.jsonl"
            run_cli("compare", "--input", data / files, "--output", cmp_out, "--template", "plain", *flags)
            summary = json.loads(cmp_out.with_name(cmp_out.name.replace(".jsonl", ".summary.json")).read_text())
            got = report["suites"][suite]["variants"][variant]
            assert got["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-12), (suite, variant)
            if suite.startswith("rm-bench"):
                for name in ("easy", "normal", "hard"):
                    assert got[name] == pytest.approx(summary[name], abs=1e-12)
    # the per-row rewards are those of compare too
    paper_rows = read_jsonl(out / "llmbar-natural.variants.jsonl")
    cmp_rows = read_jsonl(tmp_path / "cmp-llmbar-natural-paper.jsonl")
    for e, c in zip(paper_rows, cmp_rows):
        assert e["rewards"]["paper"][0] - e["rewards"]["paper"][1] == pytest.approx(c["margin"], rel=1e-9, abs=1e-9)
    md = (out / "report.md").read_text()
    for name in list(evaluation.SUITES) + ["rm-bench (mean of domains)", "easy", "hard", "pairs/s"]:
        assert name in md
    # Running again resumes: nothing is scored twice and the report is the same
    before = {p["suite"] + p["name"]: p["seconds"] for p in report["passes"]}
    run_cli("eval", "--suite", "all", "--data", data, "--output", out, "--template", "plain",
            "--variants", "paper,mean,gamma=0.93,loglik", "--bootstrap", "200")
    again = json.loads((out / "report.json").read_text())
    assert again["suites"] == report["suites"]
    assert {p["suite"] + p["name"]: p["seconds"] for p in again["passes"]} == before


def test_eval_sample_is_seeded_and_custom_files_keep_their_subsets(tmp_path, rng):
    rows = [{"id": f"r{i}", "subset": "ab"[i % 2], "prompt": sentence(rng), "chosen": " " + sentence(rng),
             "rejected": " " + sentence(rng)} for i in range(30)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    suite, paths = evaluation.resolve_suites([path])[0]
    assert suite.name == "mine"
    a, _ = evaluation.sample_rows(suite, paths, 10, seed=3)
    b, _ = evaluation.sample_rows(suite, paths, 10, seed=3)
    c, _ = evaluation.sample_rows(suite, paths, 10, seed=4)
    assert [r["id"] for r in a] == [r["id"] for r in b] != [r["id"] for r in c]
    assert [r["id"] for r in a] == sorted((r["id"] for r in a), key=lambda x: int(x[1:]))  # file order
    out = tmp_path / "eval"
    run_cli("eval", "--suite", path, "--output", out, "--template", "plain", "--variants", "paper", "--max-rows", "12")
    report = json.loads((out / "report.json").read_text())
    res = report["suites"]["mine"]["variants"]["paper"]
    assert res["rows"] == 12 and set(res["subsets"]) == {"a", "b"}
    assert sum(s["rows"] for s in res["subsets"].values()) == 12


def test_missing_data_and_unknown_suites_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        run_cli("eval", "--suite", "rm-bench", "--data", tmp_path, "--output", tmp_path / "o")
    with pytest.raises(SystemExit, match="neither a suite"):
        run_cli("eval", "--suite", "no-such-suite", "--output", tmp_path / "o")
    with pytest.raises(SystemExit, match="unknown variant"):
        run_cli("eval", "--suite", "all", "--variants", "paper,bogus", "--output", tmp_path / "o")


def test_eval_fails_when_no_row_could_be_scored_or_too_many_failed(tmp_path, rng, capsys):
    bad = [{"prompt": sentence(rng), "chosen": " " + sentence(rng)} for _ in range(4)]  # no 'rejected'
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(SystemExit, match="no row of bad could be scored") as failed:
        run_cli("eval", "--suite", path, "--output", tmp_path / "e1", "--template", "plain", "--variants", "paper")
    assert failed.value.code == 1 and "row 0:" in capsys.readouterr().err
    good = [{"prompt": sentence(rng), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)}
            for _ in range(6)]
    path = write_jsonl(tmp_path / "mixed.jsonl", good + bad[:2])
    with pytest.raises(SystemExit, match="2 of 8 rows of mixed are errors") as failed:
        run_cli("eval", "--suite", path, "--output", tmp_path / "e2", "--template", "plain", "--variants", "paper",
                "--max-error-fraction", "0.2")
    assert failed.value.code == 1


@pytest.fixture(scope="module")
def chat_rm(chat_tokenizer):
    model, _ = fixture_model()
    return EndoRM(model, chat_tokenizer)


def test_judge_scores_the_answer_tokens_of_the_judge_prompt(tmp_path, rng, chat_rm):
    rows = [{"prompt": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)} for _ in range(5)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    suites = evaluation.resolve_suites([path])
    variants = parse_variants("paper,judge")
    passes = evaluation.run_eval(chat_rm, suites, variants, str(tmp_path / "out"), template="chat", progress=False,
                                 log=lambda m: None)
    judged = read_jsonl(passes[1].output)
    encoder = chat_rm.encoder("chat")
    answer_ids = chat_rm.tokenizer("Yes", add_special_tokens=False)["input_ids"]
    for row, out in zip(rows, judged):
        for response, reward in ((row["chosen"], out["rewards"]["judge"][0]), (row["rejected"], out["rewards"]["judge"][1])):
            text = evaluation.JUDGE_PROMPT.format(prompt=row["prompt"], response=response)
            prompt_ids = encoder.encode([TextExample(text, "Yes")])[0].prompt_ids
            # the answer alone, without the end-of-turn token that the template adds after it
            assert out["num_tokens"][0] == len(answer_ids)
            want = chat_rm.score_ids([prompt_ids], [answer_ids])[0].logprob
            # scored alone here, in a batch of ten in the pass: batch composition moves fp32 results by ~1e-6
            assert reward == pytest.approx(want, rel=1e-5, abs=1e-5)
    report = evaluation.build_report(passes, variants, resamples=100)
    assert report["suites"]["pairs"]["variants"]["judge"]["rows"] == 5


def test_eval_plot_writes_one_png_per_variant(tmp_path, rng):
    pytest.importorskip("matplotlib")
    rows = [{"prompt": sentence(rng), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)} for _ in range(8)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "eval"
    run_cli("eval", "--suite", path, "--output", out, "--template", "plain", "--variants", "paper,mean", "--plot")
    for name in ("margins-paper.png", "margins-mean.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_length_preference(rng):
    rows = []
    for i in range(20):
        lengths = [rng.randint(1, 50) for _ in range(6)]
        rows.append({"id": i, "k": 3, "grid": True, "num_tokens": lengths,
                     "rewards": {"short": [-n for n in lengths], "long": [float(n) for n in lengths]}})
    lengths = {r["id"]: r["num_tokens"] for r in rows}
    assert evaluation.length_bias(rows, "short", lengths) == 1.0
    assert evaluation.length_bias(rows, "long", lengths) == 0.0
    stats = evaluation.response_lengths(rows)
    cells = [(r["num_tokens"][i], r["num_tokens"][3 + j]) for r in rows for i in range(3) for j in range(3)]
    assert stats["chosen_tokens"] == pytest.approx(sum(c for c, _ in cells) / 180)
    assert stats["chosen_shorter"] == pytest.approx(sum(c < r for c, r in cells) / 180)


def test_eval_reads_renamed_columns_through_fields(tmp_path, rng):
    rows = [(sentence(rng), " " + sentence(rng), " " + sentence(rng)) for _ in range(rng.randint(4, 8))]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    renamed = write_jsonl(tmp_path / "renamed.jsonl",
                          [{"q": p, "answers": {"good": c, "bad": r}} for p, c, r in rows])
    run_cli("eval", "--suite", plain, "--output", tmp_path / "e1", "--template", "plain", "--variants", "paper")
    run_cli("eval", "--suite", renamed, "--output", tmp_path / "e2", "--template", "plain", "--variants", "paper",
            "--fields", "prompt=q,chosen=answers.good,rejected=answers.bad")
    first = json.loads((tmp_path / "e1" / "report.json").read_text())["suites"]["plain"]["variants"]["paper"]
    second = json.loads((tmp_path / "e2" / "report.json").read_text())["suites"]["renamed"]["variants"]["paper"]
    assert second["rows"] == first["rows"] == len(rows) and second["accuracy"] == first["accuracy"]
    unnamed = lambda rows: [{k: v for k, v in r.items() if k != "subset"} for r in rows]  # noqa: E731 (file stems)
    assert unnamed(read_jsonl(tmp_path / "e2" / "renamed.variants.jsonl")) == unnamed(
        read_jsonl(tmp_path / "e1" / "plain.variants.jsonl"))


def test_a_second_eval_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, rng):
    from endokern.io import RunLock

    rows = [{"prompt": sentence(rng), "chosen": " " + sentence(rng), "rejected": " " + sentence(rng)} for _ in range(3)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "eval"
    with RunLock(str(out / ".lock"), holder="a running eval"):  # what the first eval holds while it runs
        with pytest.raises(SystemExit) as refused:
            run_cli("eval", "--suite", path, "--output", out, "--template", "plain", "--variants", "paper")
        assert refused.value.code == 1 and "a running eval" in str(refused.value)
        assert not (out / "report.json").exists()
    run_cli("eval", "--suite", path, "--output", out, "--template", "plain", "--variants", "paper")
    assert (out / "report.json").exists() and not (out / ".lock").exists()
