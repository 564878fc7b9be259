"""Self-certainty (KL from the uniform distribution to the model's next-token distribution) end to end: EndoRM's
results against the float64 oracle of the same model's full logits, at alpha 1 (one pass) and not (a second pass)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params
from model_utils import fixture_model, full_logits64, random_examples

from endokern import EndoRM


def self_certainty_oracle(model, prompt_ids, response_ids):
    """Per example (mean, per-state list): LSE(z) - mean(z) - log V at the H states s_1 .. s_H (positions p .. T-1,
    1-based: the logits that predict the response tokens), from the float64 copy's full logits."""
    out = []
    for p, ids, z in full_logits64(model, prompt_ids, response_ids):
        states = z[len(p) - 1 : ids.shape[1] - 1]  # 0-based rows p-1 .. p+H-2: the states that predict the response
        per_state = torch.logsumexp(states, dim=1) - states.mean(dim=1) - math.log(z.shape[1])
        scale = torch.maximum(torch.logsumexp(states, dim=1).abs(), states.abs().mean(dim=1)).clamp(min=1.0)
        out.append((float(per_state.mean()), per_state.tolist(), scale.tolist()))
    return out


def assert_matches(results, expected, rtol=1e-5):
    """fp32 arithmetic: LSE(z) within rtol of max(|LSE|, 1) (as the values of the main battery), and the mean logit
    within rtol of mean |z|; so each state within rtol of the larger of the two, and the mean within the largest."""
    for i, (res, (mean, per_state, scale)) in enumerate(zip(results, expected)):
        assert res.self_certainty is not None
        assert abs(res.self_certainty - mean) <= 2 * rtol * max(scale), (i, res.self_certainty, mean)
        if res.token_self_certainty is not None:
            assert len(res.token_self_certainty) == len(per_state) == res.num_tokens
            for j, (got, want, s) in enumerate(zip(res.token_self_certainty, per_state, scale)):
                assert abs(got - want) <= 2 * rtol * s, (i, j, got, want)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_self_certainty_matches_the_oracle(gen, backend, alpha):
    model, tok = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 9)
    rm = EndoRM(model, tok, alpha=alpha, backend=backend, batch_tokens=300)
    results = rm.score_ids(prompts, responses, self_certainty=True, per_token=True)
    expected = self_certainty_oracle(model, prompts, responses)
    assert_matches(results, expected)
    assert all(r.self_certainty > 0 for r in results)  # a trained model is more certain than uniform
    # asking for it changes nothing else, and without per_token there is no per-state list
    plain = rm.score_ids(prompts, responses, per_token=True)
    for a, b in zip(results, plain):
        assert b.self_certainty is None and b.token_self_certainty is None
        assert (a.reward, a.logprob, a.token_rewards) == (b.reward, b.logprob, b.token_rewards)
    means = rm.score_ids(prompts, responses, self_certainty=True)
    assert [r.self_certainty for r in means] == [r.self_certainty for r in results]
    assert all(r.token_self_certainty is None for r in means)


@pytest.mark.parametrize("name", ["phi-untied-head-with-bias", "gemma2-softcap", "cohere-logit-scale"])
def test_self_certainty_with_bias_softcap_and_logit_scale(gen, name):
    """The model's own logit transforms are part of z: a head bias, a final softcap, a logit scale."""
    from test_model import _other_architectures

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = _other_architectures()[name]()
    if name.startswith("phi"):
        with torch.no_grad():
            model.get_output_embeddings().bias.normal_(0, 1.0)
    prompts, responses = random_examples(gen, 300, 6)
    results = EndoRM(model, alpha=0.8).score_ids(prompts, responses, self_certainty=True, per_token=True)
    assert_matches(results, self_certainty_oracle(model, prompts, responses))


# ---- every front door: score --self-certainty, the variant in eval, explain per token, ScoreTask -------------------


def test_score_command_writes_a_self_certainty_column(tmp_path, gen):
    import json
    import random

    from model_utils import FIXTURE
    from test_cli import read_jsonl, sentence, write_jsonl

    from endokern.cli import main

    rng = random.Random(int(gen.initial_seed()))
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(9)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--input", src, "--output", str(out), "--self-certainty", "--alpha", "0.7",
                 "--model", FIXTURE, "--no-progress", "--chunk-rows", "4"]) == 0
    got = read_jsonl(out)
    model, tok = fixture_model()
    want = EndoRM(model, tok, alpha=0.7).score([r["prompt"] for r in rows], [r["response"] for r in rows],
                                              self_certainty=True)
    for r, w in zip(got, want):
        assert set(r) == {"id", "reward", "reward_mean", "logprob", "num_tokens", "self_certainty"}
        assert abs(r["self_certainty"] - w.self_certainty) <= 1e-5 * max(1.0, abs(w.self_certainty))
    plain = tmp_path / "plain.jsonl"
    assert main(["score", "--input", src, "--output", str(plain), "--model", FIXTURE, "--no-progress"]) == 0
    assert "self_certainty" not in read_jsonl(plain)[0]
    assert json.loads(json.dumps(got[0]))["self_certainty"] > 0


def test_score_task_variant_and_column():
    from endokern.pipeline import RowScorer, ScoreTask
    from endokern.variants import parse_variant

    model, tok = fixture_model()
    rm = EndoRM(model, tok)
    rows = [{"prompt": "Once upon a time", "response": " there was a cat."}, {"prompt": "The sun", "response": " shone."}]
    by_variant = RowScorer(rm, ScoreTask(variant=parse_variant("self-certainty")), template="plain").score_rows(rows)
    column = RowScorer(rm, ScoreTask(self_certainty=True), template="plain").score_rows(rows)
    for v, c in zip(by_variant, column):
        assert v["reward"] == v["reward_mean"] == c["self_certainty"]
        assert c["reward"] != c["self_certainty"]


def test_eval_reports_the_self_certainty_variant_with_intervals(tmp_path, gen, capsys):
    import json
    import random

    from test_cli import run_cli
    from test_evaluation import _data_dir

    from endokern.cli import main

    rng = random.Random(int(gen.initial_seed()))
    data = _data_dir(tmp_path, rng)
    out = tmp_path / "eval"
    run_cli("eval", "--suite", "llmbar-natural", "rm-bench-chat", "--data", data, "--output", out, "--template", "plain",
            "--variants", "paper,self-certainty", "--bootstrap", "200")
    report = json.loads((out / "report.json").read_text())
    for suite in ("llmbar-natural", "rm-bench-chat"):
        got = report["suites"][suite]["variants"]["self-certainty"]
        assert 0 <= got["accuracy_ci95"][0] <= got["accuracy"] <= got["accuracy_ci95"][1] <= 1
    rows = [json.loads(line) for line in (out / "llmbar-natural.variants.jsonl").read_text().splitlines()]
    assert all(len(r["rewards"]["self-certainty"]) == 2 for r in rows)
    assert "self-certainty" in (out / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # a usage error: one line on standard error, exit 2, nothing written
        main(["eval", "--variants", "paper,certainty", "--output", str(tmp_path / "x"), "--model", FIXTURE_PATH(),
              "--no-progress"])
    assert stop.value.code == 2 and not (tmp_path / "x").exists()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "self-certainty" in err and "unknown variant 'certainty'" in err


def FIXTURE_PATH():
    from model_utils import FIXTURE

    return FIXTURE


def test_explain_shows_self_certainty_per_token():
    from endokern.explain import explain, render_html, render_terminal
    from endokern.tokenization import TextExample

    model, tok = fixture_model()
    rm = EndoRM(model, tok)
    examples = [TextExample("Once upon a time", " there was a little girl."), TextExample("Once upon a time", " dog")]
    explained = explain(rm, examples, template="plain")
    direct = rm.score(["Once upon a time"] * 2, [" there was a little girl.", " dog"], template="plain",
                      per_token=True, self_certainty=True)
    for e, d in zip(explained, direct):
        assert e.token_self_certainty == d.token_self_certainty and len(e.token_self_certainty) == e.num_tokens
        assert e.self_certainty == d.self_certainty
    page = render_html(explained, metric="self-certainty")
    assert 'data-metric="self-certainty" class="on"' in page and "data-sc=" in page
    assert "self-certainty" in render_terminal(explained, color=True, metric="self-certainty")
