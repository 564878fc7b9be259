"""Plain PyTorch backend: chunked over the vocabulary and over rows, fp32 accumulation, never N x V.

The fallback on any device and the fast twin of the float64 oracle. Outer loop over vocabulary chunks
(each weight chunk converted to fp32 once), inner loop over row chunks, with a running
(max, sum, entropy sum, target logit) per row: the online logsumexp of the Triton and C++ kernels; with
``return_logit_sum`` also the running sum of the logits (then the result has a fourth tensor).
"""

from __future__ import annotations

from typing import Optional

import torch

# Every matmul has the same [ROW_CHUNK, D] x [D, VOCAB_CHUNK] shape: BLAS picks its blocking from the
# shape, so a row padded into a fixed-size chunk gets the same bits whatever else is in the batch.
ROW_CHUNK = 128
VOCAB_CHUNK = 8192


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor],
    alpha: float,
    softcap: Optional[float],
    return_entropy: bool,
    return_logit_sum: bool = False,
):
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    run_max = torch.full((n,), -torch.inf, **f32)  # max of z / alpha
    run_sum = torch.zeros(n, **f32)  # sum exp(z / alpha - run_max)
    run_ent = torch.zeros(n, **f32)  # sum exp(u - run_max) * (u - run_max), u = z / alpha
    target_logit = torch.zeros(n, **f32)
    run_lsum = torch.zeros(n, **f32) if return_logit_sum else None  # sum of z (after bias and softcap)
    rows_f32 = torch.empty(ROW_CHUNK, d, **f32)
    inv_alpha = 1.0 / alpha

    for v0 in range(0, v, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, v)
        weight_t = weight[v0:v1].to(torch.float32).t()
        bias_chunk = None if bias is None else bias[v0:v1]
        for r0 in range(0, n, ROW_CHUNK):
            r1 = min(r0 + ROW_CHUNK, n)
            rows = r1 - r0
            rows_f32[:rows].copy_(hidden[r0:r1])
            rows_f32[rows:].zero_()
            # Every op below runs on the full padded chunk (a reduction over one short row may be split
            # across threads), and only the first `rows` results are kept.
            z = torch.mm(rows_f32, weight_t)
            if bias_chunk is not None:
                z += bias_chunk
            if softcap is not None:
                z = torch.tanh(z.div_(softcap)).mul_(softcap)

            tgt = torch.full((ROW_CHUNK,), -1, dtype=torch.int64, device=device)
            tgt[:rows] = targets[r0:r1] - v0
            in_chunk = (tgt >= 0) & (tgt < v1 - v0)
            picked = z.gather(1, tgt.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            target_logit[r0:r1] += torch.where(in_chunk, picked, torch.zeros_like(picked))[:rows]
            if run_lsum is not None:
                run_lsum[r0:r1] += z.sum(dim=1)[:rows]

            u = z.mul_(inv_alpha)
            old_max = torch.full((ROW_CHUNK,), -torch.inf, **f32)
            old_max[:rows] = run_max[r0:r1]
            new_max = torch.maximum(old_max, u.amax(dim=1))
            shift = old_max - new_max  # -inf on the first chunk
            rescale = torch.exp(shift)
            u.sub_(new_max.unsqueeze(1))
            p = torch.exp(u)
            chunk_sum = p.sum(dim=1)[:rows]
            old_sum = run_sum[r0:r1]
            if return_entropy:
                chunk_ent = (p * u).sum(dim=1)[:rows]
                carried = torch.where(old_sum > 0, run_ent[r0:r1] + old_sum * shift[:rows], torch.zeros_like(old_sum))
                run_ent[r0:r1] = rescale[:rows] * carried + chunk_ent
            run_sum[r0:r1] = old_sum * rescale[:rows] + chunk_sum
            run_max[r0:r1] = new_max[:rows]

    log_sum = torch.log(run_sum)
    value = alpha * (run_max + log_sum)
    entropy = log_sum - run_ent / run_sum if return_entropy else None
    if return_logit_sum:
        return value, target_logit, entropy, run_lsum
    return value, target_logit, entropy
