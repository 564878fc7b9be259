"""The reward math of SPEC section 1 on packed sequences, against the float64 oracle of full logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TEST_DEVICE, backend_params
from oracle import logits64, sequence_rewards64

import endokern
from endokern.reward import response_rows, sequence_rewards


def test_response_rows_by_hand():
    # sequence 0: 5 tokens, prompt 2 (H = 3); sequence 1: 3 tokens, prompt 1 (H = 2)
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    rows = response_rows(torch.tensor([0, 5, 8]), torch.tensor([2, 1]), ids)
    assert rows.index.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert rows.targets.tolist() == [12, 13, 14, -100, 16, 17, -100]
    assert rows.cu_rows.tolist() == [0, 4, 7]


@pytest.mark.parametrize(
    "cu,prompts,match",
    [([0, 3], [0], "at least one token"), ([0, 3], [3], "response needs"), ([0, 2, 4], [1], "disagree")],
)
def test_response_rows_errors(cu, prompts, match):
    with pytest.raises(ValueError, match=match):
        response_rows(torch.tensor(cu), torch.tensor(prompts), torch.arange(cu[-1]))


def random_packed(gen, lengths, prompts, d=32, v=301):
    hidden = torch.randn(sum(lengths), d, generator=gen) * 2.0
    weight = torch.randn(v, d, generator=gen) / math.sqrt(d)
    ids = torch.randint(0, v, (sum(lengths),), generator=gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hidden, weight, ids, cu, torch.tensor(prompts)


def score(hidden, weight, ids, cu, prompts, backend, *, alpha, gamma, terminal, reduce="sum", bias=None):
    rows = response_rows(cu, prompts, ids)
    dev = TEST_DEVICE
    out = endokern.soft_values(
        hidden[rows.index].to(dev), weight.to(dev), rows.targets.to(dev), alpha=alpha,
        bias=None if bias is None else bias.to(dev), return_entropy=True, backend=backend,
    )
    return sequence_rewards(
        out.value.cpu(), out.target_logit.cpu(), rows.cu_rows, alpha=alpha, gamma=gamma,
        terminal=terminal, reduce=reduce, entropy=out.entropy.cpu(),
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("terminal", ["zero", "bootstrap"])
@pytest.mark.parametrize("alpha,gamma", [(1.0, 1.0), (0.5, 0.93), (2.0, 1.0)])
def test_rewards_match_oracle(gen, backend, terminal, alpha, gamma):
    lengths, prompts = [9, 4, 17, 2, 6], [3, 1, 10, 1, 5]
    hidden, weight, ids, cu, p = random_packed(gen, lengths, prompts)
    bias = torch.randn(weight.shape[0], generator=gen)
    res = score(hidden, weight, ids, cu, p, backend, alpha=alpha, gamma=gamma, terminal=terminal, bias=bias)
    res_mean = score(hidden, weight, ids, cu, p, backend, alpha=alpha, gamma=gamma, terminal=terminal,
                     reduce="mean", bias=bias)
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        z = logits64(hidden[lo:hi], weight, bias)
        r, lp, v = sequence_rewards64(z, ids[lo:hi].tolist(), prompts[b], alpha=alpha, gamma=gamma, terminal=terminal)
        t0, t1 = res.cu_tokens[b].item(), res.cu_tokens[b + 1].item()
        H = lengths[b] - prompts[b]
        assert res.num_tokens[b].item() == H == t1 - t0
        scale = 1e-5 * max(1.0, float(z.abs().max()))
        torch.testing.assert_close(res.token_rewards[t0:t1], r, rtol=1e-5, atol=scale)
        torch.testing.assert_close(res.token_logprobs[t0:t1], lp, rtol=1e-5, atol=scale / alpha)
        torch.testing.assert_close(res.token_values[t0:t1], v, rtol=1e-5, atol=scale)
        torch.testing.assert_close(res.reward[b], r.sum(), rtol=1e-5, atol=H * scale)
        torch.testing.assert_close(res.reward_sum[b], r.sum(), rtol=1e-5, atol=H * scale)
        torch.testing.assert_close(res_mean.reward[b], r.mean(), rtol=1e-5, atol=scale)
        torch.testing.assert_close(res.reward_mean[b], r.mean(), rtol=1e-5, atol=scale)
        torch.testing.assert_close(res.logprob[b], alpha * lp.sum(), rtol=1e-5, atol=H * scale)
        # entropies of the H states
        logp = torch.log_softmax(z[prompts[b] - 1 : lengths[b] - 1] / alpha, dim=1)
        ent = -(logp.exp() * logp).sum(1)
        torch.testing.assert_close(res.token_entropies[t0:t1], ent, rtol=1e-5, atol=scale * math.log(301) / alpha)


@pytest.mark.parametrize("backend", backend_params())
def test_identities(gen, backend):
    """gamma = 1, terminal zero: sum r = alpha sum log pi + V(s_1); r_h = alpha log pi_h + V(s_h) - V(s_{h+1})."""
    lengths, prompts = [12, 7, 30], [4, 6, 2]
    hidden, weight, ids, cu, p = random_packed(gen, lengths, prompts)
    alpha = 0.6
    res = score(hidden, weight, ids, cu, p, backend, alpha=alpha, gamma=1.0, terminal="zero")
    for b in range(len(lengths)):
        t0, t1 = res.cu_tokens[b].item(), res.cu_tokens[b + 1].item()
        r, lp, v = res.token_rewards[t0:t1], res.token_logprobs[t0:t1], res.token_values[t0:t1]
        v_next = torch.cat([v[1:], torch.zeros(1, dtype=v.dtype)])
        tol = 1e-9 * float(v.abs().max() * (t1 - t0))
        assert abs(float(r.sum() - (alpha * lp.sum() + v[0]))) <= tol
        torch.testing.assert_close(r, alpha * lp + v - v_next, rtol=0, atol=1e-12 * float(v.abs().max()))
        # per token, rewards and log-probabilities are not the same ranking signal
        assert not torch.allclose(r, alpha * lp)


def test_sequence_independent_of_batch(gen):
    """A sequence scored alone gets the same bits as in a pack with others (torch backend)."""
    lengths, prompts = [9, 4, 17], [3, 1, 10]
    hidden, weight, ids, cu, p = random_packed(gen, lengths, prompts)
    together = score(hidden, weight, ids, cu, p, "torch", alpha=1.0, gamma=1.0, terminal="zero")
    lo, hi = cu[2].item(), cu[3].item()
    alone = score(hidden[lo:hi], weight, ids[lo:hi], torch.tensor([0, hi - lo]), p[2:], "torch",
                  alpha=1.0, gamma=1.0, terminal="zero")
    assert torch.equal(alone.reward, together.reward[2:])
    assert torch.equal(alone.logprob, together.logprob[2:])
    assert torch.equal(alone.token_rewards, together.token_rewards[together.cu_tokens[2]:])


def test_sequence_rewards_errors():
    v = torch.zeros(4)
    with pytest.raises(ValueError, match="terminal"):
        sequence_rewards(v, v, torch.tensor([0, 4]), terminal="end")
    with pytest.raises(ValueError, match="reduce"):
        sequence_rewards(v, v, torch.tensor([0, 4]), reduce="max")
    with pytest.raises(ValueError, match="H \\+ 1 >= 2"):
        sequence_rewards(v, v, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="no target logit"):
        sequence_rewards(v, torch.tensor([0.0, float("nan"), 0.0, 0.0]), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="ends at"):
        sequence_rewards(v, v, torch.tensor([0, 3]))
