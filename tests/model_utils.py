"""Shared pieces of the model tests: the fixture model, random token examples, the float64 oracle."""

import copy
import functools
import math
import os

import torch
from oracle import sequence_rewards64

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stories260K")


@functools.lru_cache(maxsize=None)
def fixture_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(FIXTURE)


@functools.lru_cache(maxsize=None)
def _model64(model):
    return copy.deepcopy(model).to(torch.float64)


def random_examples(gen, vocab, count, max_prompt=30, max_response=40, low=3):
    """Random token-id examples of ragged lengths (p >= 1, H >= 1), never special ids below ``low``."""
    prompts, responses = [], []
    for _ in range(count):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=gen))
        h = int(torch.randint(1, max_response + 1, (1,), generator=gen))
        prompts.append(torch.randint(low, vocab, (p,), generator=gen).tolist())
        responses.append(torch.randint(low, vocab, (h,), generator=gen).tolist())
    return prompts, responses


def full_logits64(model, prompt_ids, response_ids):
    """Per example: ``(prompt ids, token ids [1, T], the float64 copy's full logits [T, V])``."""
    model64 = _model64(model)
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            ids = torch.tensor([list(p) + list(r)])
            yield p, ids, model64(input_ids=ids, use_cache=False).logits[0]


def oracle(model, prompt_ids, response_ids, *, alpha=1.0, gamma=1.0, terminal="zero"):
    """Per example: a dict of every output field, from the float64 copy's own full logits (its own head,
    bias, logit scale and softcap), through SPEC section 1 as tests/oracle.py writes it."""
    out = []
    for p, ids, z in full_logits64(model, prompt_ids, response_ids):
        rewards, logprobs, values = sequence_rewards64(z, ids[0], len(p), alpha=alpha, gamma=gamma, terminal=terminal)
        out.append({
            "reward_sum": float(rewards.sum()),
            "reward_mean": float(rewards.mean()),
            "logprob": float(alpha * logprobs.sum()),
            "num_tokens": ids.shape[1] - len(p),
            "token_rewards": rewards.tolist(),
            "token_logprobs": logprobs.tolist(),
            "token_values": values.tolist(),
        })
    return out


def assert_close_to_oracle(results, expected, rtol, reduce="sum"):
    """Every field of every result within ``rtol`` of the oracle, relative to max(|oracle|, |V|, 1), where V is
    the soft value of the state (token fields) or the largest of the example (sums): a token reward is a
    difference of two soft values, so its rounding is relative to them, not to the difference."""
    worst = 0.0
    for i, (res, ref) in enumerate(zip(results, expected)):
        assert res.num_tokens == ref["num_tokens"], f"example {i}: num_tokens {res.num_tokens} != {ref['num_tokens']}"
        values = ref["token_values"]
        v_max = max(abs(v) for v in values)
        checks = [
            ("reward", res.reward, ref["reward_sum"] if reduce == "sum" else ref["reward_mean"], v_max),
            ("reward_mean", res.reward_mean, ref["reward_mean"], v_max),
            ("reward_sum", res.reward_sum, ref["reward_sum"], v_max),
            ("logprob", res.logprob, ref["logprob"], v_max),
        ]
        for name in ("token_rewards", "token_logprobs", "token_values"):
            got = getattr(res, name)
            if got is not None:
                assert len(got) == len(ref[name]), f"example {i}: {name} has {len(got)} entries"
                checks += [(f"{name}[{j}]", a, b, abs(values[j])) for j, (a, b) in enumerate(zip(got, ref[name]))]
        for name, got, want, v in checks:
            err = abs(got - want) / max(abs(want), v, 1.0)
            worst = max(worst, err)
            assert err <= rtol, f"example {i} {name}: {got} vs oracle {want} (relative error {err:.3g} > {rtol})"
    return worst


# Text for the integration tests: random sentences of the fixture's words, and the batch-composition tolerance.
WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was".split()
RTOL = 1e-5


def sentence(rng, low=2, high=8):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def close(a, b, rtol=RTOL):
    """``a`` is a number within ``rtol`` (relative, and absolute near zero) of ``b``."""
    return a is not None and math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)
