"""Reward variants and likelihood baselines from one per-token pass, against direct runs and the float64 oracle."""

from __future__ import annotations

import pytest
from model_utils import fixture_model, oracle, random_examples

from endokern import EndoRM
from endokern.variants import ONE_PASS, Variant, parse_variant, parse_variants, variant_score


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_every_variant_equals_a_direct_run_with_its_settings(gen, alpha):
    model, tok = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 10)
    results = EndoRM(model, tok, alpha=alpha).score_ids(prompts, responses, per_token=True)
    variants = parse_variants("paper,mean,bootstrap,bootstrap-mean,gamma=0.93,gamma=0.5,loglik,loglik-mean")
    for v in variants:
        got = [variant_score(r, v, alpha) for r in results]
        if v.kind == "reward":
            direct = EndoRM(model, tok, alpha=alpha, gamma=v.gamma, terminal=v.terminal, reduce=v.reduce)
            want = [r.reward for r in direct.score_ids(prompts, responses)]
        else:  # the log-likelihood of the alpha-tempered policy: logprob / alpha, summed or averaged
            want = [r.logprob / alpha / (r.num_tokens if v.reduce == "mean" else 1) for r in results]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-12, abs=1e-12), v.name


def test_variants_against_the_float64_oracle(gen):
    model, tok = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 8)
    results = EndoRM(model, tok, alpha=0.8).score_ids(prompts, responses, per_token=True)
    for gamma, terminal in ((0.93, "zero"), (1.0, "bootstrap"), (0.5, "bootstrap")):
        ref = oracle(model, prompts, responses, alpha=0.8, gamma=gamma, terminal=terminal)
        v = Variant("custom", "reward", gamma=gamma, terminal=terminal)
        for r, o in zip(results, ref):
            scale = max(abs(o["reward_sum"]), 1.0)
            assert abs(variant_score(r, v, 0.8) - o["reward_sum"]) <= 1e-5 * scale


def test_final_value_is_the_value_after_the_last_token(gen):
    model, tok = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 6)
    results = EndoRM(model, tok, gamma=1.0, terminal="bootstrap").score_ids(prompts, responses, per_token=True)
    zero = EndoRM(model, tok).score_ids(prompts, responses)
    for b, z in zip(results, zero):  # gamma 1: bootstrap = zero - V(s_{H+1})
        assert b.reward_sum == pytest.approx(z.reward_sum - b.final_value, rel=1e-9, abs=1e-9)
    assert EndoRM(model, tok).score_ids(prompts, responses)[0].final_value is None  # only with per_token


@pytest.mark.parametrize("bad", ["nope", "gamma=1.5", "gamma=x", ""])
def test_bad_variants_are_refused(bad):
    with pytest.raises(ValueError):
        parse_variants(bad) if bad == "" else parse_variant(bad)


def test_all_is_the_one_pass_variants_and_the_judge():
    assert [v.name for v in parse_variants("all")] == list(ONE_PASS) + ["judge"]
    assert [v.name for v in parse_variants("mean,paper,mean")] == ["mean", "paper"]


def test_self_certainty_variant(gen):
    """The self-certainty variant is the result's mean self-certainty (from the scoring pass, no per-token values
    needed), and a task with it asks the model for it."""
    from endokern.pipeline import ScoreTask

    model, tok = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 5)
    v = parse_variant("self-certainty")
    assert v.needs_self_certainty and not v.needs_per_token
    task = ScoreTask(variant=v)
    assert task.needs_self_certainty and not task.needs_per_token
    assert not ScoreTask(variant=parse_variant("mean")).needs_self_certainty
    results = EndoRM(model, tok).score_ids(prompts, responses, self_certainty=True)
    assert [variant_score(r, v) for r in results] == [r.self_certainty for r in results]
    with pytest.raises(ValueError, match="self_certainty=True"):
        variant_score(EndoRM(model, tok).score_ids(prompts, responses, per_token=True)[0], v)


def test_unknown_variant_is_one_line_listing_the_variants():
    with pytest.raises(ValueError) as err:
        parse_variant("certainty")
    message = str(err.value)
    assert "\n" not in message and "self-certainty" in message and "loglik-mean" in message and "gamma=G" in message
