"""Encoded examples -> forward batches (length-sorted, filled to a token budget, packed where the attention
allows); no model needed.

Examples are grouped into *units*, one line of a batch each: a prompt once, then the responses that share it, each
seeing only the prompt and itself through a tree attention mask (a unit of one response is an ordinary sequence).
Units are sorted longest first and filled into batches of ``batch_tokens`` tokens: padded lines (``B x L``, padding
counted) or one packed line (the sum of the lengths). For each batch :func:`collate` lays out the token ids and
positions and finds the response rows of the reward with :func:`endokern.reward.span_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from .reward import span_rows
from .tokenization import Encoded


@dataclass
class Unit:
    """One line of a forward batch: a prompt, then the responses that share it."""

    prompt_ids: List[int]
    members: List[int]  # positions in the caller's list
    length: int  # tokens on the line: p + sum of the members' H


@dataclass
class Batch:
    order: List[int]  # positions in the caller's list, in the order of cu_rows
    input_ids: torch.Tensor  # [B, L] padded lines, or [1, S] packed
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]  # [B, 1, L, L] tree mask when a line shares a prompt, else None
    row_index: torch.Tensor  # [R] rows of the flattened hidden states: H + 1 per example (the response rows)
    row_targets: torch.Tensor  # [R] next token, or IGNORE_INDEX on each example's last row
    cu_rows: torch.Tensor  # [B' + 1] where each example's rows begin
    forward_tokens: int  # tokens the model runs, a shared prompt once, padding not counted


def units(encoded: Sequence[Encoded], batch_tokens: int, share_prompts: bool) -> List[Unit]:
    """Examples with the same prompt ids share one line (split so a line stays within the token budget)."""
    if not share_prompts:
        return [Unit(e.prompt_ids, [i], e.length) for i, e in enumerate(encoded)]
    groups: Dict[tuple, List[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(tuple(e.prompt_ids), []).append(i)
    out = []
    for members in groups.values():
        prompt = encoded[members[0]].prompt_ids
        cap = max(batch_tokens, len(prompt) + max(len(encoded[i].response_ids) for i in members))
        unit = Unit(prompt, [], len(prompt))
        for i in members:
            size = len(encoded[i].response_ids)
            if unit.members and unit.length + size > cap:
                out.append(unit)
                unit = Unit(prompt, [], len(prompt))
            unit.members.append(i)
            unit.length += size
        out.append(unit)
    return out


def batches(encoded: Sequence[Encoded], *, batch_tokens: int, packing: bool, share_prompts: bool) -> Iterator[Batch]:
    """Longest line first, each batch filled to the token budget (padded: B x L; packed: the sum of lengths)."""
    lines = units(encoded, batch_tokens, share_prompts)
    lines.sort(key=lambda u: (-u.length, u.members[0]))
    start = 0
    while start < len(lines):
        end, total = start, 0
        while end < len(lines):
            cost = total + lines[end].length if packing else (end - start + 1) * lines[start].length
            if end > start and cost > batch_tokens:
                break
            total += lines[end].length
            end += 1
        yield collate(lines[start:end], encoded, packing)
        start = end


def collate(lines: List[Unit], encoded: Sequence[Encoded], packing: bool) -> Batch:
    """Lay the lines out (padded rows of width L, or one packed row) and find the response rows of the reward:
    for each example the prompt's last position, then its response positions (the last has no target)."""
    width = sum(u.length for u in lines) if packing else max(u.length for u in lines)
    height = 1 if packing else len(lines)
    input_ids = torch.zeros(height, width, dtype=torch.int64)
    position_ids = torch.zeros(height, width, dtype=torch.int64)
    segment = torch.full((height, width), -1, dtype=torch.int64)  # 0: prompt, k: k-th response, -1: padding
    order: List[int] = []
    prompt_last: List[int] = []
    response_start: List[int] = []
    response_len: List[int] = []
    base = 0
    for line, unit in enumerate(lines):
        b = 0 if packing else line
        col = base if packing else 0
        p = len(unit.prompt_ids)
        input_ids[b, col : col + p] = torch.tensor(unit.prompt_ids)
        position_ids[b, col : col + p] = torch.arange(p)
        segment[b, col : col + p] = 0
        last = b * width + col + p - 1
        col += p
        for k, i in enumerate(unit.members, start=1):
            response = encoded[i].response_ids
            h = len(response)
            input_ids[b, col : col + h] = torch.tensor(response)
            position_ids[b, col : col + h] = torch.arange(p, p + h)
            segment[b, col : col + h] = k
            order.append(i)
            prompt_last.append(last)
            response_start.append(b * width + col)
            response_len.append(h)
            col += h
        base += unit.length
    rows = span_rows(torch.tensor(prompt_last), torch.tensor(response_start), torch.tensor(response_len), input_ids)
    mask = None
    if any(len(u.members) > 1 for u in lines):
        q = torch.arange(width)
        causal = q.view(1, -1) <= q.view(-1, 1)  # [query, key]
        seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)
        same_branch = (seg_k == 0) | (seg_k == seg_q)
        mask = ((causal & same_branch) | torch.eye(width, dtype=torch.bool)).unsqueeze(1)
    return Batch(order, input_ids, position_ids, mask, rows.index, rows.targets, rows.cu_rows,
                 sum(u.length for u in lines))
