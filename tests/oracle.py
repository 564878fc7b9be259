"""The float64 oracle of SPEC section 6: every quantity of section 1 from the full logits."""

from __future__ import annotations

import math

import torch


def logits64(hidden, weight, bias=None, softcap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def soft_values64(hidden, weight, targets=None, *, alpha=1.0, bias=None, softcap=None, ignore_index=-100):
    """(value, target_logit, entropy) in float64; target_logit NaN where there is no target."""
    z = logits64(hidden, weight, bias, softcap)
    u = z / alpha
    value = alpha * torch.logsumexp(u, dim=1)
    logp = torch.log_softmax(u, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    if targets is None:
        target = torch.full_like(value, float("nan"))
    else:
        has = targets != ignore_index
        picked = z.gather(1, torch.where(has, targets, 0).unsqueeze(1)).squeeze(1)
        target = torch.where(has, picked, torch.full_like(picked, float("nan")))
    return value, target, entropy


def logit_sums64(hidden, weight, bias=None, softcap=None):
    """(sum_j z_j, scale) per row in float64. ``scale = sum_j (|z_j| + sum_k |h_k w_jk| + |b_j|)`` bounds what fp32
    arithmetic can get wrong: each z_j's dot product and bias add err by at most about (D + 1) ulps of its terms (a
    softcap's derivative is at most 1), and a blocked fp32 sum by at most its depth in ulps of sum_j |z_j|."""
    z = logits64(hidden, weight, bias, softcap)
    scale = z.abs().sum(dim=1) + hidden.double().abs() @ weight.double().abs().sum(dim=0)
    if bias is not None:
        scale = scale + bias.double().abs().sum()
    return z.sum(dim=1), scale


def self_certainty64(hidden, weight, bias=None, softcap=None):
    """Self-certainty per row in float64 from the full logits: KL(uniform || softmax(z)) = LSE(z) - mean(z) - log V."""
    z = logits64(hidden, weight, bias, softcap)
    return torch.logsumexp(z, dim=1) - z.mean(dim=1) - math.log(z.shape[1])


def soft_values_in_dtype(hidden, weight, targets=None, *, alpha=1.0, bias=None, softcap=None, ignore_index=-100):
    """PyTorch's own computation in the input dtype: logits in that dtype, then fp32 reductions."""
    z = (hidden @ weight.T).float()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    u = z / alpha
    value = alpha * torch.logsumexp(u, dim=1)
    logp = torch.log_softmax(u, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    has = targets != ignore_index if targets is not None else torch.zeros_like(value, dtype=torch.bool)
    idx = torch.where(has, targets, 0) if targets is not None else torch.zeros_like(value, dtype=torch.int64)
    picked = z.gather(1, idx.unsqueeze(1)).squeeze(1)
    return value, torch.where(has, picked, torch.full_like(picked, float("nan"))), entropy


def sequence_rewards64(z, input_ids, prompt_len, *, alpha=1.0, gamma=1.0, terminal="zero"):
    """Token rewards, log-probs, values of one sequence straight from its full float64 logits ``z`` [T, V].

    Written from SPEC section 1 with 1-based positions, independently of endokern.reward.
    """
    T = len(input_ids)
    p = prompt_len
    H = T - p
    V = [None] + [alpha * torch.logsumexp(z[i - 1] / alpha, 0) for i in range(1, T + 1)]  # V[i], 1-based
    rewards, logprobs, values = [], [], []
    for h in range(1, H + 1):
        state = p + h - 1
        q = z[state - 1][input_ids[p + h - 1]]  # x_{p+h} is input_ids[p+h-1] (0-based)
        v_here = V[state]
        if h < H:
            v_next = V[p + h]
        else:
            v_next = V[T] if terminal == "bootstrap" else torch.zeros((), dtype=torch.float64)
        rewards.append(q - gamma * v_next)
        logprobs.append((q - v_here) / alpha)
        values.append(v_here)
    return torch.stack(rewards), torch.stack(logprobs), torch.stack(values)
