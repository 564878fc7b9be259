"""Batching without a model: every example once, the rows of SPEC section 1, the token budget, the tree mask."""

from __future__ import annotations

import pytest
import torch

from endokern.batching import batches, collate, units
from endokern.reward import IGNORE_INDEX, response_rows, span_rows
from endokern.tokenization import Encoded


def random_encoded(gen, count, vocab=500, shared=0.5):
    """Ragged examples; about ``shared`` of them reuse an earlier example's prompt (pairs, best-of-N)."""
    out = []
    for _ in range(count):
        if out and float(torch.rand((), generator=gen)) < shared:
            prompt = out[int(torch.randint(0, len(out), (1,), generator=gen))].prompt_ids
        else:
            prompt = torch.randint(3, vocab, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        h = int(torch.randint(1, 25, (1,), generator=gen))
        out.append(Encoded(list(prompt), torch.randint(3, vocab, (h,), generator=gen).tolist()))
    return out


def check_rows(batch, encoded):
    """The rows of each example are its prompt's last token then its response tokens, with next-token targets."""
    flat = batch.input_ids.reshape(-1)
    positions = batch.position_ids.reshape(-1)
    bounds = batch.cu_rows.tolist()
    for slot, (a, b) in zip(batch.order, zip(bounds[:-1], bounds[1:])):
        ex = encoded[slot]
        index = batch.row_index[a:b]
        assert b - a == len(ex.response_ids) + 1
        assert flat[index].tolist() == [ex.prompt_ids[-1]] + ex.response_ids
        assert positions[index].tolist() == list(range(len(ex.prompt_ids) - 1, ex.length))
        assert batch.row_targets[a:b].tolist() == ex.response_ids + [IGNORE_INDEX]


@pytest.mark.parametrize("packing, share", [(False, False), (False, True), (True, False)])  # sharing needs lines
def test_every_example_once_with_its_rows(gen, packing, share):
    encoded = random_encoded(gen, int(torch.randint(1, 60, (1,), generator=gen)))
    budget = int(torch.randint(60, 400, (1,), generator=gen))
    got = list(batches(encoded, batch_tokens=budget, packing=packing, share_prompts=share))
    assert sorted(i for b in got for i in b.order) == list(range(len(encoded)))
    for batch in got:
        check_rows(batch, encoded)
        lines, width = batch.input_ids.shape
        if packing:
            assert lines == 1
        cost = width if packing else lines * width
        # over the budget only when one line (padded) or one example (packed) is longer than it on its own
        assert cost <= budget or (len(batch.order) == 1 if packing else lines == 1), (cost, budget)


def test_a_shared_prompt_runs_once_and_each_response_sees_only_it_and_itself(gen):
    prompt = torch.randint(3, 500, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
    responses = [torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(int(torch.randint(2, 6, (1,), generator=gen)))]
    encoded = [Encoded(prompt, r) for r in responses]
    (batch,) = list(batches(encoded, batch_tokens=10_000, packing=False, share_prompts=True))
    p = len(prompt)
    assert batch.input_ids.shape == (1, p + sum(map(len, responses)))
    assert batch.forward_tokens == p + sum(map(len, responses))  # the prompt counted once: the model ran it once
    check_rows(batch, encoded)
    mask = batch.attention_mask[0, 0]
    starts = [p + sum(map(len, responses[:k])) for k in range(len(responses))]
    for k, (start, r) in enumerate(zip(starts, responses)):
        for q in range(start, start + len(r)):
            seen = mask[q].nonzero().flatten().tolist()
            assert seen == list(range(p)) + list(range(start, q + 1)), (k, q)
    apart = list(batches(encoded, batch_tokens=10_000, packing=False, share_prompts=False))
    assert sum(b.forward_tokens for b in apart) == sum(e.length for e in encoded)
    assert all(b.attention_mask is None for b in apart)


def test_units_split_a_long_group_to_the_budget(gen):
    prompt = [5] * 4
    encoded = [Encoded(prompt, [7] * int(torch.randint(3, 8, (1,), generator=gen))) for _ in range(20)]
    budget = 30
    lines = units(encoded, budget, share_prompts=True)
    assert sorted(i for u in lines for i in u.members) == list(range(20))
    for u in lines:
        assert u.length == 4 + sum(len(encoded[i].response_ids) for i in u.members)
        assert u.length <= budget or len(u.members) == 1


def test_span_rows_is_response_rows_on_contiguous_sequences(gen):
    """The rows batching uses (prompt anywhere) agree with the packed-sequence rule where the two meet."""
    encoded = random_encoded(gen, int(torch.randint(1, 20, (1,), generator=gen)), shared=0.0)
    ids = torch.tensor([t for e in encoded for t in e.prompt_ids + e.response_ids])
    lengths = torch.tensor([e.length for e in encoded])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    p = torch.tensor([len(e.prompt_ids) for e in encoded])
    packed = response_rows(cu, p, ids)
    spans = span_rows(cu[:-1] + p - 1, cu[:-1] + p, lengths - p, ids)
    for a, b in zip(packed, spans):
        assert torch.equal(a, b)
    one = collate(units(encoded, 10**6, share_prompts=False), encoded, packing=True)
    assert torch.equal(one.row_targets, packed.targets) and torch.equal(one.row_index, packed.index)
