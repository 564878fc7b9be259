"""The endogenous reward (arXiv 2506.23235), from the kernel's per-row soft values and target logits.

One sequence is token ids ``x_1 .. x_T``: a prompt of ``p >= 1`` tokens, then ``H = T - p >= 1`` response
tokens. Its response rows are the hidden states at positions ``p .. T`` (1-based), ``H + 1`` rows: row
``j = 0 .. H`` is position ``p + j``, with target ``x_{p+j+1}`` for ``j < H`` and none for the last. With
``value`` (V) and ``target_logit`` (Q) of those rows, for response token ``h = 1 .. H``:

- ``Q_h = target_logit[h - 1]``, ``V(s_h) = value[h - 1]``,
- ``V(s_{h+1}) = value[h]`` for ``h < H``; for ``h = H``: 0 (``terminal="zero"``) or ``value[H]`` (``"bootstrap"``),
- token reward ``r_h = Q_h - gamma * V(s_{h+1})`` (the inverse soft Bellman operator),
- token log-probability ``log pi_h = (Q_h - V(s_h)) / alpha``,
- ``reward = sum_h r_h`` (``reduce="sum"``) or its mean over the ``H`` tokens (``reduce="mean"``),
- ``logprob = alpha * sum_h log pi_h = sum_h (Q_h - V(s_h))``,
- ``final_value = value[H] = V(s_{H+1})`` (with ``token_values`` and ``token_logprobs`` it gives every
  (gamma, terminal, reduce) variant of the same forward: ``Q_h = alpha * log pi_h + V(s_h)``),
- with the rows' self-certainty (:func:`self_certainty_rows`), ``token_self_certainty`` (rows ``0 .. H - 1``, the
  states the response tokens are predicted from, as for the log-probabilities) and ``self_certainty``, its mean.

Self-certainty (Kang et al., arXiv 2502.18581) is the KL divergence from the uniform distribution over the
vocabulary to the model's next-token distribution: ``KL(U || softmax(z)) = LSE(z) - mean_j z_j - log V_n``. It is
0 for a uniform distribution and grows with the model's confidence; unlike ``r_h`` and ``log pi_h`` it does not
depend on which token the response took. It is taken at temperature 1 (the model's own distribution, as in the
paper), whatever ``alpha``: ``LSE(z)`` is ``V`` at alpha 1, so with ``alpha = 1`` it comes from the same kernel
pass (plus the logit sum); at another ``alpha`` :class:`endokern.EndoRM` makes a second pass at alpha 1.

Rows of many sequences are packed one after another; ``cu_rows`` (``[B + 1]``, starting at 0) marks
where each sequence's ``H + 1`` rows begin. Nothing crosses a sequence boundary. The O(N) arithmetic
runs in float64, and each sequence's sums run left to right over its own tokens only, so a sequence's
results do not depend on the other sequences of the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .settings import check_reward

IGNORE_INDEX = -100  # soft_values' target of a row that has none (each sequence's last response row)


class ResponseRows(NamedTuple):
    """Where the response rows of packed sequences are, and their targets."""

    index: torch.Tensor  # [R] int64: positions in the packed hidden states, R = sum_b (H_b + 1)
    targets: torch.Tensor  # [R] int64: the next token, ignore_index on each sequence's last row
    cu_rows: torch.Tensor  # [B + 1] int64: sequence b owns rows cu_rows[b] .. cu_rows[b + 1] - 1


class Rewards(NamedTuple):
    """Per-token results (packed, ``cu_tokens`` marks each sequence) and per-sequence results (``[B]``)."""

    token_rewards: torch.Tensor  # [sum H] float64, r_h
    token_logprobs: torch.Tensor  # [sum H] float64, log pi_h
    token_values: torch.Tensor  # [sum H] float64, V(s_h)
    token_entropies: Optional[torch.Tensor]  # [sum H] float64, or None
    cu_tokens: torch.Tensor  # [B + 1] int64
    reward: torch.Tensor  # [B] float64, per `reduce`
    reward_sum: torch.Tensor  # [B] float64
    reward_mean: torch.Tensor  # [B] float64
    logprob: torch.Tensor  # [B] float64, alpha * sum_h log pi_h
    num_tokens: torch.Tensor  # [B] int64, H
    final_value: Optional[torch.Tensor] = None  # [B] float64, V(s_{H+1}): the value after the last response token
    token_self_certainty: Optional[torch.Tensor] = None  # [sum H] float64, KL(U || softmax(z)) of each state s_h
    self_certainty: Optional[torch.Tensor] = None  # [B] float64, its mean over the response tokens


def response_rows(
    cu_seqlens: torch.Tensor, prompt_lens: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> ResponseRows:
    """The rows of section 1 in packed sequences, and their targets.

    Args:
        cu_seqlens: ``[B + 1]`` token offsets of the packed sequences (sequence b is tokens
            ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1``).
        prompt_lens: ``[B]`` prompt lengths ``p``.
        input_ids: ``[total]`` the packed token ids.
    """
    cu_seqlens = cu_seqlens.to(torch.int64)
    prompt_lens = prompt_lens.to(torch.int64, copy=False).to(cu_seqlens.device)
    seq_lens = cu_seqlens[1:] - cu_seqlens[:-1]
    if cu_seqlens.dim() != 1 or prompt_lens.shape != seq_lens.shape:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} and prompt_lens {tuple(prompt_lens.shape)} disagree")
    if bool((prompt_lens < 1).any()):
        raise ValueError("every prompt needs at least one token (p >= 1)")
    if bool((seq_lens - prompt_lens < 1).any()):
        raise ValueError("every response needs at least one token (H = T - p >= 1)")
    starts = cu_seqlens[:-1] + prompt_lens  # 0-based position of x_{p+1}
    return span_rows(starts - 1, starts, seq_lens - prompt_lens, input_ids, ignore_index)


def span_rows(
    prompt_last: torch.Tensor,
    response_start: torch.Tensor,
    response_len: torch.Tensor,
    input_ids: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> ResponseRows:
    """The rows of section 1 where each response's ``H`` tokens are contiguous in the flattened ``input_ids`` but its
    prompt's last token (the state ``s_1``) may lie elsewhere, as when several responses share one prompt's forward.

    Row 0 of sequence b is ``prompt_last[b]`` with target ``x_{p+1}``; row ``j = 1 .. H`` is
    ``response_start[b] + j - 1`` with target the next response token, none (``ignore_index``) for ``j = H``.
    """
    device = input_ids.device
    prompt_last = prompt_last.to(device=device, dtype=torch.int64)
    response_start = response_start.to(device=device, dtype=torch.int64)
    h = response_len.to(device=device, dtype=torch.int64)
    rows_per_seq = h + 1
    cu_rows = torch.zeros(len(h) + 1, dtype=torch.int64, device=device)
    torch.cumsum(rows_per_seq, 0, out=cu_rows[1:])
    seq_of_row = torch.repeat_interleave(torch.arange(len(h), device=device), rows_per_seq)
    j = torch.arange(int(cu_rows[-1]), device=device) - cu_rows[:-1][seq_of_row]
    start = response_start[seq_of_row]
    index = torch.where(j == 0, prompt_last[seq_of_row], start + j - 1)
    is_last = j == h[seq_of_row]
    next_token = input_ids.reshape(-1).to(torch.int64)[start + torch.where(is_last, j - 1, j)]
    targets = torch.where(is_last, torch.full_like(next_token, ignore_index), next_token)
    return ResponseRows(index, targets, cu_rows)


def self_certainty_rows(lse: torch.Tensor, logit_sum: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per row ``KL(U || softmax(z)) = LSE(z) - sum_j z_j / V_n - log V_n`` in float64, from the kernel's value at
    alpha 1 (``lse``) and its ``logit_sum``; ``vocab`` is ``V_n``, the LM head's rows."""
    return lse.to(torch.float64) - logit_sum.to(torch.float64) / vocab - math.log(vocab)


def sequence_rewards(
    value: torch.Tensor,
    target_logit: torch.Tensor,
    cu_rows: torch.Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    terminal: str = "zero",
    reduce: str = "sum",
    entropy: Optional[torch.Tensor] = None,
    self_certainty: Optional[torch.Tensor] = None,
) -> Rewards:
    """Token and sequence rewards from the soft values of packed response rows (see the module doc);
    ``self_certainty``: the rows' values of :func:`self_certainty_rows`, or None."""
    check_reward(alpha, gamma, terminal, reduce)
    cu_rows = cu_rows.to(torch.int64)
    device = value.device
    rows_per_seq = cu_rows[1:] - cu_rows[:-1]
    if bool((rows_per_seq < 2).any()):
        raise ValueError("each sequence needs H + 1 >= 2 rows (at least one response token)")
    if int(cu_rows[-1]) != value.shape[0] or target_logit.shape != value.shape:
        raise ValueError(f"cu_rows ends at {int(cu_rows[-1])} but there are {value.shape[0]} rows")
    num_seqs = len(rows_per_seq)
    num_tokens = rows_per_seq - 1

    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs, device=device), rows_per_seq)
    row_in_seq = torch.arange(value.shape[0], device=device) - cu_rows[:-1][seq_of_row]
    token_row = (row_in_seq < num_tokens[seq_of_row]).nonzero().squeeze(1)  # rows 0 .. H-1 of each sequence
    seq_of_token = seq_of_row[token_row]
    step = row_in_seq[token_row]  # h - 1

    value64 = value.to(torch.float64)
    q = target_logit.to(torch.float64)[token_row]
    if bool(torch.isnan(q).any()):
        raise ValueError("a response row has no target logit (its target was ignore_index)")
    v_here = value64[token_row]
    v_next = value64[token_row + 1]
    if terminal == "zero":
        v_next = torch.where(step == num_tokens[seq_of_token] - 1, torch.zeros_like(v_next), v_next)
    token_rewards = q - gamma * v_next
    token_logprobs = (q - v_here) / alpha
    token_entropies = entropy.to(torch.float64)[token_row] if entropy is not None else None

    reward_sum = _segment_sums(token_rewards, seq_of_token, step, num_tokens)
    logprob = _segment_sums(q - v_here, seq_of_token, step, num_tokens)
    reward_mean = reward_sum / num_tokens.to(torch.float64)
    token_sc = sc_mean = None
    if self_certainty is not None:
        token_sc = self_certainty.to(torch.float64)[token_row]
        sc_mean = _segment_sums(token_sc, seq_of_token, step, num_tokens) / num_tokens.to(torch.float64)
    cu_tokens = torch.zeros(num_seqs + 1, dtype=torch.int64, device=device)
    torch.cumsum(num_tokens, 0, out=cu_tokens[1:])
    return Rewards(
        token_rewards=token_rewards,
        token_logprobs=token_logprobs,
        token_values=v_here,
        token_entropies=token_entropies,
        cu_tokens=cu_tokens,
        reward=reward_sum if reduce == "sum" else reward_mean,
        reward_sum=reward_sum,
        reward_mean=reward_mean,
        logprob=logprob,
        num_tokens=num_tokens,
        final_value=value64[cu_rows[1:] - 1],
        token_self_certainty=token_sc,
        self_certainty=sc_mean,
    )


def _segment_sums(x: torch.Tensor, seq: torch.Tensor, step: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums, each a left-to-right running sum over that sequence alone."""
    width = int(lengths.max())
    table = torch.zeros(len(lengths), width, dtype=x.dtype, device=x.device)
    table[seq, step] = x
    running = table.cumsum(dim=1)
    return running[torch.arange(len(lengths), device=x.device), lengths - 1]
