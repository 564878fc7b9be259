"""Rows -> examples and results -> output rows, per layout (no model)."""

from __future__ import annotations

import random

import pytest

from endokern import layouts
from endokern.tokenization import TextExample


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def words(rng, n=4):
    return " ".join(rng.choice(["a", "cat", "ran", "home", "sun", "big"]) for _ in range(n))


def test_score_and_rank_rows(rng):
    prompt, response = words(rng), words(rng)
    assert layouts.score_examples({"prompt": prompt, "response": response}) == [TextExample(prompt, response)]
    assert layouts.score_examples({"prompt": "", "response": response}) == [TextExample("", response)]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    assert layouts.score_examples({"messages": messages}) == [TextExample(messages=messages)]
    for row, says in (({"prompt": prompt}, "missing field 'response'"), ({"prompt": 3, "response": "x"}, "string"),
                      ({"messages": messages[:1]}, "assistant"), ({"messages": []}, "non-empty")):
        with pytest.raises(layouts.RowError, match=says):
            layouts.score_examples(row)
    responses = [words(rng) for _ in range(rng.randint(1, 5))]
    assert layouts.rank_examples({"prompt": prompt, "responses": responses}) == [
        TextExample(prompt, r) for r in responses]
    with pytest.raises(layouts.RowError, match=r"responses\[1\]"):
        layouts.rank_examples({"prompt": prompt, "responses": ["x", 3]})
    # an empty response is data (the encoder scores it under a chat template and refuses it under plain)
    assert layouts.score_examples({"prompt": prompt, "response": ""}) == [TextExample(prompt, "")]


def test_rank_output_takes_the_first_of_equal_rewards(rng):
    rewards = [rng.uniform(-5, 5) for _ in range(rng.randint(2, 6))]
    best = rng.randrange(len(rewards))
    rewards[best] = max(rewards) + 1.0
    rewards.append(rewards[best])  # a tie after it
    out = layouts.rank_output({"id": "x"}, 7, rewards)
    assert out == {"id": "x", "rewards": rewards, "best": best, "best_reward": rewards[best]}
    assert layouts.rank_output({}, 7, rewards)["id"] == 7


def test_preference_layouts(rng):
    p, c, r = words(rng), words(rng), words(rng)
    pair = layouts.preference_examples({"prompt": p, "chosen": c, "rejected": r}, "plain")
    assert (pair.examples, pair.k, pair.grid, pair.layout) == ([TextExample(p, c), TextExample(p, r)], 1, False, "pair")
    label = rng.choice([1, 2, "1", "2"])
    llmbar = layouts.preference_examples({"input": p, "output_1": c, "output_2": r, "label": label}, "plain")
    assert llmbar.examples == ([TextExample(p, c), TextExample(p, r)] if int(label) == 1
                               else [TextExample(p, r), TextExample(p, c)])
    k = rng.randint(1, 4)
    chosen, rejected = [words(rng) for _ in range(k)], [words(rng) for _ in range(k)]
    grid = layouts.preference_examples({"prompt": p, "chosen": chosen, "rejected": rejected}, "plain")
    assert grid.grid and grid.k == k and [e.response for e in grid.examples] == chosen + rejected
    head = f"\n\nHuman: {p}\n\nAssistant: {c}\n\nHuman: {r}\n\nAssistant:"
    hh = {"chosen": head + " yes " + c, "rejected": head + " no"}
    plain = layouts.preference_examples(hh, "plain")
    assert [e.prompt for e in plain.examples] == [head, head] and plain.examples[1].response == " no"
    chat = layouts.preference_examples(hh, "chat")
    assert chat.examples[1].messages == [{"role": "user", "content": p}, {"role": "assistant", "content": c},
                                         {"role": "user", "content": r}, {"role": "assistant", "content": "no"}]
    for row, says in (({"chosen": "a", "rejected": "b"}, "Assistant"), ({"prompt": p, "chosen": [c], "rejected": []},
                      "equal length"), ({"input": p, "output_1": c, "output_2": r, "label": 3}, "label"),
                      ({"chosen": head + " x", "rejected": "\n\nHuman: q\n\nAssistant: y"}, "differ")):
        with pytest.raises(layouts.RowError, match=says):
            layouts.preference_examples(row, "plain")


def test_preference_output_grid_margins(rng):
    k = rng.randint(2, 4)
    rewards = [rng.uniform(-9, 9) for _ in range(2 * k)]
    grid = layouts.Preference([TextExample("p", "r")] * (2 * k), k, True, "rm-bench")
    out = layouts.preference_output({"subset": "s"}, 3, grid, rewards)
    margins = [[rewards[i] - rewards[k + j] for j in range(k)] for i in range(k)]
    assert out["id"] == 3 and out["subset"] == "s" and out["margins"] == margins
    assert out["margin"] == pytest.approx(sum(map(sum, margins)) / k**2)
    assert {n: out[n] for n in ("easy", "normal", "hard")} == layouts.grid_accuracy(margins)
    with pytest.raises(ValueError, match="NaN"):
        layouts.win(float("nan"))


def test_optional_subset_names_only_rows_without_one():
    row = {"a": 1}
    assert layouts.optional_subset(row, "f") == {"a": 1, "subset": "f"} and row == {"a": 1}
    assert layouts.optional_subset({"subset": "own"}, "f") == {"subset": "own"}
    assert layouts.optional_subset(row, None) is row


def test_labelled_pairs_every_label_spelling(rng):
    p, a, b = words(rng), words(rng), words(rng)
    a_wins = rng.choice(["A", "a", "A>B", "A>>B", "a > b", 1, "1"])
    b_wins = rng.choice(["B", "b", "B>A", "B>>A", 2, "2"])
    for label, better, worse in ((a_wins, a, b), (b_wins, b, a)):
        pref = layouts.preference_examples({"prompt": p, "response_a": a, "response_b": b, "label": label}, "plain")
        assert pref.examples == [TextExample(p, better), TextExample(p, worse)] and pref.layout == "labelled-pair"
    for label, says in (("A=B", "tie"), ("tie", "tie"), ("C", "does not name"), (None, "does not name")):
        with pytest.raises(layouts.RowError, match=says):
            layouts.preference_examples({"prompt": p, "response_a": a, "response_b": b, "label": label}, "plain")


def test_a_label_column_beside_chosen_and_rejected_is_not_llmbar(rng):
    p, c, r = words(rng), words(rng), words(rng)
    pref = layouts.preference_examples({"prompt": p, "chosen": c, "rejected": r, "label": 1}, "plain")
    assert pref.examples == [TextExample(p, c), TextExample(p, r)]


def test_judgebench_like_rows_through_fields(rng):
    q, a, b = words(rng), words(rng), words(rng)
    row = {"pair_id": "x", "question": q, "response_A": a, "response_B": b, "label": "B>A"}
    with pytest.raises(layouts.RowError, match=r"columns \['label', 'pair_id', 'question', 'response_A', "
                                                 r"'response_B'\] look like a labelled pair"):
        layouts.preference_examples(row, "plain")
    mapping = layouts.parse_fields("prompt=question,response_a=response_A,response_b=response_B")
    pref = layouts.preference_examples(layouts.map_fields(row, mapping), "plain")
    assert pref.examples == [TextExample(q, b), TextExample(q, a)]


def test_conversation_layouts(rng):
    turns = [{"role": "user", "content": words(rng)}]
    if rng.random() < 0.5:  # a longer conversation before the scored turn
        turns = [{"role": "system", "content": words(rng)}, *turns, {"role": "assistant", "content": words(rng)},
                 {"role": "user", "content": words(rng)}]
    c, r = words(rng), words(rng)
    want = [TextExample(messages=turns + [{"role": "assistant", "content": x}]) for x in (c, r)]
    rows = {
        "messages + strings": {"messages": turns, "chosen": c, "rejected": r},
        "trl implicit prompt": {"chosen": want[0].messages, "rejected": want[1].messages},
        "trl explicit prompt": {"prompt": turns, "chosen": [{"role": "assistant", "content": c}],
                                "rejected": [{"role": "assistant", "content": r}]},
        "prompt list + strings": {"prompt": turns, "chosen": c, "rejected": r},
    }
    for name, row in rows.items():
        pref = layouts.preference_examples(row, "chat")
        assert pref.examples == want and pref.layout == "conversation", name
        with pytest.raises(layouts.RowError, match="chat template"):
            layouts.preference_examples(row, "plain")
    bad = {"chosen": want[0].messages, "rejected": [{"role": "user", "content": "other"}] + want[1].messages[-1:]}
    with pytest.raises(layouts.RowError, match="share every turn but their last"):
        layouts.preference_examples(bad, "chat")
    with pytest.raises(layouts.RowError, match="must be the user's"):
        layouts.preference_examples({"messages": [{"role": "assistant", "content": c}], "chosen": c, "rejected": r},
                                    "chat")
