"""EndoRM end to end against the float64 oracle of the same model's full logits (SPEC sections 3 and 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import backend_params
from model_utils import FIXTURE, assert_close_to_oracle, fixture_model, oracle, random_examples
from torch.utils._python_dispatch import TorchDispatchMode

import endokern.model as model_module
from endokern import EndoRM, batching


def make_rm(**kwargs):
    model, tokenizer = fixture_model()
    return EndoRM(model, tokenizer, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "alpha,gamma,terminal,reduce",
    [(1.0, 1.0, "zero", "sum"), (0.7, 1.0, "bootstrap", "mean"), (1.3, 0.9, "zero", "mean"), (0.5, 0.93, "bootstrap", "sum")],
)
def test_every_output_matches_oracle(gen, backend, alpha, gamma, terminal, reduce):
    model, _ = fixture_model()
    rm = make_rm(alpha=alpha, gamma=gamma, terminal=terminal, reduce=reduce, backend=backend, batch_tokens=300)
    prompts, responses = random_examples(gen, model.config.vocab_size, 9)
    results = rm.score_ids(prompts, responses, per_token=True)
    expected = oracle(model, prompts, responses, alpha=alpha, gamma=gamma, terminal=terminal)
    assert_close_to_oracle(results, expected, rtol=1e-5, reduce=reduce)


def test_text_scoring_matches_oracle_and_is_fluency_aware():
    model, tokenizer = fixture_model()
    rm = make_rm()
    prompt = "Once upon a time"
    fluent = " there was a little girl named Lily. She loved to play outside in the park."
    words = fluent.split()
    shuffled = " " + " ".join(words[3:] + words[:3][::-1])
    results = rm.score([prompt, prompt], [fluent, shuffled], per_token=True, entropy=True)
    prompt_ids = tokenizer(prompt)["input_ids"]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in (fluent, shuffled)]
    assert prompt_ids[0] == tokenizer.bos_token_id  # plain template keeps the tokenizer's BOS
    assert_close_to_oracle(results, oracle(model, [prompt_ids] * 2, responses), rtol=1e-5)
    # Same prompt: the summed reward ranks by likelihood (SPEC section 1), and the real model prefers fluency.
    assert results[0].logprob > results[1].logprob
    assert results[0].reward > results[1].reward
    assert all(len(r.token_entropies) == r.num_tokens and min(r.token_entropies) >= 0 for r in results)


def test_batch_composition_changes_nothing_beyond_1e5(gen):
    model, _ = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 24)
    alone = [make_rm().score_ids([p], [r])[0] for p, r in zip(prompts, responses)]
    for kwargs in ({"batch_tokens": 50}, {"batch_tokens": 4096}, {"packing": True, "batch_tokens": 700}):
        together = make_rm(**kwargs).score_ids(prompts, responses)
        for a, b in zip(alone, together):
            for name in ("reward", "reward_mean", "logprob"):
                x, y = getattr(a, name), getattr(b, name)
                assert abs(x - y) <= 1e-5 * max(abs(x), 1.0), f"{kwargs}: {name} {x} alone, {y} in a batch"


def test_results_in_input_order_whatever_the_length_order(gen):
    model, _ = fixture_model()
    prompts, responses = random_examples(gen, model.config.vocab_size, 12)
    rm = make_rm(batch_tokens=120)
    forward = rm.score_ids(prompts, responses)
    backward = rm.score_ids(prompts[::-1], responses[::-1])[::-1]
    assert [r.num_tokens for r in forward] == [len(r) for r in responses]
    for a, b in zip(forward, backward):
        assert a.reward == pytest.approx(b.reward, rel=1e-5, abs=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.vocab_sized = []  # (op, shape) of every output with a vocabulary-sized dimension

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.vocab_sized.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_no_logits_are_materialized_and_the_head_sees_only_response_rows(gen, backend, monkeypatch):
    from endokern.ops.registry import unavailable_reason

    if unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(unavailable_reason(backend, torch.device("cpu")))
    from transformers import LlamaConfig, LlamaForCausalLM

    # A vocabulary much larger than the hidden size, so N x V logits would dwarf every activation.
    config = LlamaConfig(vocab_size=20000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = LlamaForCausalLM(config).eval()
    rm = EndoRM(model, backend=backend)
    prompts, responses = random_examples(gen, config.vocab_size, 16, max_prompt=60, max_response=30)
    rows = sum(len(r) + 1 for r in responses)
    seen_rows = []
    real = model_module.soft_values

    def spy(hidden, weight, *args, **kwargs):
        seen_rows.append(hidden.shape[0])
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(model_module, "soft_values", spy)
    with _LargestTensor(config.vocab_size) as watch:
        results = rm.score_ids(prompts, responses)
    assert sum(seen_rows) == rows  # H + 1 rows per example: no prompt row reaches the LM head
    # The only vocabulary-sized tensors allowed: the head itself, its bias, and kernel tiles far below N x V.
    for op, shape in watch.vocab_sized:
        numel = 1
        for s in shape:
            numel *= s
        assert numel <= max(config.vocab_size * config.hidden_size, rows * config.vocab_size // 8), (op, shape)
    expected = oracle(model, prompts, responses)
    assert_close_to_oracle(results, expected, rtol=1e-5)


def _tiny(config_cls, model_cls, head_scale=1.0, attn_implementation=None, **extra):
    config = config_cls(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    if attn_implementation is not None:  # transformers' default differs between releases (Gemma 2: eager, then sdpa)
        config._attn_implementation = attn_implementation
    model = model_cls(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)  # large logits, so a softcap or scale matters
    return model


def _other_architectures():
    from transformers import (
        CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM,
    )

    return {
        "phi-untied-head-with-bias": lambda: _tiny(PhiConfig, PhiForCausalLM, head_scale=3.0),
        "gemma2-softcap": lambda: _tiny(Gemma2Config, Gemma2ForCausalLM, head_scale=400.0, head_dim=8,
                                        final_logit_softcapping=30.0),
        "cohere-logit-scale": lambda: _tiny(CohereConfig, CohereForCausalLM, head_scale=20.0, logit_scale=0.0625),
    }


@pytest.mark.parametrize("name", ["phi-untied-head-with-bias", "gemma2-softcap", "cohere-logit-scale"])
def test_other_architectures_match_their_own_logits(gen, name):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = _other_architectures()[name]()
    rm = EndoRM(model, alpha=0.8)
    head = rm.head
    if name.startswith("phi"):
        assert head.bias is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        with torch.no_grad():
            model.get_output_embeddings().bias.normal_(0, 1.0)
    if name.startswith("gemma2"):
        assert head.softcap == 30.0
    if name.startswith("cohere"):
        assert head.scale == 0.0625
    prompts, responses = random_examples(gen, 300, 6)
    results = rm.score_ids(prompts, responses, per_token=True)
    expected = oracle(model, prompts, responses, alpha=0.8)
    if name.startswith("gemma2"):  # the cap is active: some logits of the oracle sit near +-30
        assert max(abs(v) for r in expected for v in r["token_values"]) > 20
    assert_close_to_oracle(results, expected, rtol=1e-5)


def test_an_unknown_logit_transform_is_refused():
    model, tokenizer = fixture_model()
    doubled = copy.deepcopy(model)
    original = doubled.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2  # something the wrapper cannot see from the head and config
        return out

    doubled.forward = forward
    with pytest.raises(ValueError, match="logit transform"):
        EndoRM(doubled, tokenizer)


def test_from_pretrained_loads_a_folder_and_scores():
    rm = EndoRM.from_pretrained(FIXTURE, device="cpu", alpha=0.9, reduce="mean")
    assert rm.device.type == "cpu" and rm.head.weight.dtype == torch.float32
    result = rm.score(["Once upon a time"], [" there was a cat."])[0]
    assert result.reward == result.reward_mean and result.num_tokens > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"terminal": "end"}, "terminal"),
        ({"reduce": "max"}, "reduce"),
        ({"batch_tokens": 0}, "batch_tokens"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_rm(**kwargs)


def test_bad_ids_are_refused():
    rm = make_rm()
    with pytest.raises(ValueError, match="no tokens"):
        rm.score_ids([[]], [[5]])
    with pytest.raises(ValueError, match="no tokens"):
        rm.score_ids([[5]], [[]])
    with pytest.raises(ValueError, match="vocabulary"):
        rm.score_ids([[5]], [[512]])
    with pytest.raises(ValueError, match="positions"):
        rm.score_ids([[5] * 400], [[6] * 200])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        rm.score_ids([[5], [6]], [[7]])


def _shared_prompt_examples(gen, vocab, prompts=4, responses=3):
    base_prompts, base_responses = random_examples(gen, vocab, prompts * responses)
    return [base_prompts[i // responses] for i in range(prompts * responses)], base_responses


@pytest.mark.parametrize("name", ["stories260K-sdpa", "gemma2-eager"])
def test_responses_sharing_a_prompt_share_its_forward_and_match_oracle(gen, name):
    if name.startswith("gemma2"):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = _tiny(Gemma2Config, Gemma2ForCausalLM, head_scale=400.0, head_dim=8, final_logit_softcapping=30.0,
                      attn_implementation="eager")
    else:
        model, _ = fixture_model()
    shared = EndoRM(model, batch_tokens=200)
    assert shared.share_prompts and shared.attn_implementation == name.split("-")[1]
    prompts, responses = _shared_prompt_examples(gen, model.config.vocab_size)
    encoded = [model_module.Encoded(p, r) for p, r in zip(prompts, responses)]
    batches = list(batching.batches(encoded, batch_tokens=shared.batch_tokens, packing=shared.packing,
                                    share_prompts=shared.share_prompts))
    assert any(b.attention_mask is not None for b in batches)  # some line holds several responses
    lines = sum(b.input_ids.shape[0] for b in batches)
    assert lines < len(prompts)
    results = shared.score_ids(prompts, responses, per_token=True)
    assert_close_to_oracle(results, oracle(model, prompts, responses), rtol=1e-5)
    apart = EndoRM(model, batch_tokens=200, share_prompts=False).score_ids(prompts, responses)
    for a, b in zip(results, apart):
        assert a.reward == pytest.approx(b.reward, rel=1e-5, abs=1e-5)


def test_prompt_sharing_is_refused_where_attention_cannot_take_a_tree_mask():
    model, tokenizer = fixture_model()
    with pytest.raises(ValueError, match="share_prompts"):
        EndoRM(model, tokenizer, packing=True, share_prompts=True)
    assert not EndoRM(model, tokenizer, packing=True).share_prompts
