"""Row layouts: input rows to examples, and results back to output rows, for each command (preference pairs,
RM-Bench grids, LLMBar, labelled pairs, conversations, TRL's formats).

A row that cannot be used raises :class:`RowError` with the reason; the run reports it and goes on.

Preference layouts that ``compare`` reads, detected per row:

- ``prompt`` + ``chosen`` + ``rejected`` strings: one pair.
- RM-Bench: ``prompt`` + ``chosen`` and ``rejected`` lists of equal length k (k styles: concise, detailed
  plain, detailed markdown). Every chosen response meets every rejected one (a k x k grid; row i = chosen
  style i, column j = rejected style j). "easy" is the mean over cells below the diagonal (the chosen
  response is the more elaborate style), "normal" the diagonal, "hard" the cells above it.
- LLMBar: ``input``, ``output_1``, ``output_2``, ``label`` (1 or 2, the preferred output).
- Labelled pairs (JudgeBench, MT-Bench judgements and the like): ``prompt``, ``response_a``, ``response_b``,
  ``label`` naming the better one: ``A``/``B``, ``A>B``/``B>A`` (also ``>>``), or ``1``/``2``. A tie or any other
  label is an error row that says so.
- A conversation as the prompt: ``messages`` (the turns up to and including the last user turn) and ``chosen`` /
  ``rejected`` strings: each is scored as the assistant turn after the conversation (a chat template is needed).
- TRL's conversational preference formats: ``chosen`` / ``rejected`` as message lists, the prompt implicit in
  their common prefix (each must end with the assistant turn that differs); or ``prompt`` as a message list with
  ``chosen`` / ``rejected`` as one-assistant-turn message lists (or strings).
- HH-RLHF: ``chosen`` and ``rejected`` whole transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ..."), split at the last
  "\\n\\nAssistant:"; both must share everything before it. With a chat template the turns become messages.

Accuracy counts a tie (margin exactly 0) as half.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .settings import FIELD_NAMES, parse_fields  # the syntax of --fields (re-exported: layouts read rows by it)
from .tokenization import TextExample

__all__ = ["FIELD_NAMES", "HH_ASSISTANT", "Preference", "RowError", "grid_accuracy", "map_fields", "optional_subset",
           "parse_fields", "preference_examples", "preference_output", "rank_examples", "rank_output", "row_id",
           "score_examples", "summarize_preferences", "win"]

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class RowError(ValueError):
    """A row that cannot be scored, with the reason."""


def map_fields(row: Dict[str, Any], mapping: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """The row with ``mapping``'s names set from its columns (a dotted column reads a nested field: ``a.b`` is
    ``row["a"]["b"]``, or the column literally named ``a.b`` when the row has one); the mapped columns are kept too.
    A mapped column the row lacks raises :class:`RowError` naming it."""
    if not mapping:
        return row
    out = dict(row)
    for name, column in mapping.items():
        if column in row:
            out[name] = row[column]
            continue
        value: Any = row
        for key in column.split("."):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise RowError(f"--fields {name}={column}: the row has no {column!r} "
                               f"(its columns: {', '.join(map(str, row)) or 'none'})")
        out[name] = value
    return out


def row_id(row: Dict[str, Any], index: int) -> Any:
    """The input's ``id``, else the row number."""
    value = row.get("id")
    return index if value is None else value


def _text(row: Dict[str, Any], name: str, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise RowError(f"missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise RowError(f"empty field '{name}'")
    return value


def score_examples(row: Dict[str, Any]) -> List[TextExample]:
    """``prompt`` + ``response``, or ``messages`` (the last turn is the response); or token ids where the caller has
    them: ``response_ids`` after ``prompt_ids`` (both scored as given) or after the ``prompt`` text."""
    if row.get("response_ids") is not None:
        if row.get("response") is not None or row.get("messages") is not None:
            raise RowError("give the response as 'response' text or as 'response_ids', not both")
        if row.get("prompt_ids") is not None:
            if row.get("prompt") is not None:
                raise RowError("give the prompt as 'prompt' text or as 'prompt_ids', not both")
            return [TextExample(prompt_ids=row["prompt_ids"], response_ids=row["response_ids"])]
        return [TextExample(prompt=_text(row, "prompt", allow_empty=True), response_ids=row["response_ids"])]
    if row.get("prompt_ids") is not None:
        raise RowError("'prompt_ids' goes with 'response_ids' (the ids of the response to score)")
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise RowError("field 'messages' must be a non-empty list of {role, content}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RowError("each message needs 'role' and 'content' strings")
        if messages[-1]["role"] != "assistant":
            raise RowError("the last message must be the assistant turn (the response to score)")
        return [TextExample(messages=messages)]
    # an empty response is scored under a chat template (its end-of-turn token); the encoder refuses it under plain
    return [TextExample(prompt=_text(row, "prompt", allow_empty=True),
                        response=_text(row, "response", allow_empty=True))]


def rank_examples(row: Dict[str, Any]) -> List[TextExample]:
    """``prompt`` + ``responses`` (a non-empty list of strings)."""
    prompt = _text(row, "prompt", allow_empty=True)
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise RowError("field 'responses' must be a non-empty list of strings")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RowError(f"responses[{i}] must be a string")
    return [TextExample(prompt=prompt, response=r) for r in responses]


@dataclass
class Preference:
    """One preference row as examples: ``k`` chosen then ``k`` rejected responses (``k = 1`` but for grids)."""

    examples: List[TextExample]
    k: int
    grid: bool
    layout: str


_LABEL_A = {"a", "a>b", "a>>b", "1"}
_LABEL_B = {"b", "b>a", "b>>a", "2"}


def _labelled_pair(row: Dict[str, Any]) -> Preference:
    prompt = _text(row, "prompt", allow_empty=True)
    a, b = _text(row, "response_a", True), _text(row, "response_b", True)
    label = row.get("label")
    key = str(label).strip().lower().replace(" ", "") if isinstance(label, (str, int)) else None
    if key in _LABEL_A:
        chosen, rejected = a, b
    elif key in _LABEL_B:
        chosen, rejected = b, a
    elif key in ("a=b", "b=a", "tie", "=", "0"):
        raise RowError(f"label {label!r} is a tie: a pair with no preferred response cannot be compared")
    else:
        raise RowError(f"label {label!r} does not name the better response: use A/B, A>B/B>A or 1/2")
    return Preference([TextExample(prompt, chosen), TextExample(prompt, rejected)], 1, False, "labelled-pair")


def _messages(value: Any, name: str) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a non-empty list of {{role, content}} messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"each message of '{name}' needs 'role' and 'content' strings")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _assistant_turn(value: Any, name: str) -> Dict[str, str]:
    """A response given as a string or as a one-assistant-turn message list."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    turns = _messages(value, name)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise RowError(f"field '{name}' must be a string or one assistant message after the prompt's turns")
    return turns[0]


def _conversation_pair(row: Dict[str, Any], template: str) -> Preference:
    """``messages`` or a message-list ``prompt`` plus chosen/rejected, or TRL's implicit-prompt message lists."""
    if template != "chat":
        raise RowError("a conversation needs a chat template (--template chat, and a model that has one)")
    if _is_message_list(row.get("chosen")) and _is_message_list(row.get("rejected")) and not (
        isinstance(row.get("prompt"), list) or isinstance(row.get("messages"), list)
    ):  # TRL's implicit prompt: the common prefix of the two conversations
        chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if len(chosen) != shared + 1 or len(rejected) != shared + 1:
            raise RowError("'chosen' and 'rejected' conversations must share every turn but their last")
        head = chosen[:shared]
        last = (chosen[-1], rejected[-1])
    else:
        name = "messages" if isinstance(row.get("messages"), list) else "prompt"
        head = _messages(row[name], name)
        last = (_assistant_turn(row.get("chosen"), "chosen"), _assistant_turn(row.get("rejected"), "rejected"))
    if not head or head[-1]["role"] != "user":
        raise RowError("the turn before the scored responses must be the user's")
    for turn, name in zip(last, ("chosen", "rejected")):
        if turn["role"] != "assistant":
            raise RowError(f"the last turn of '{name}' must be the assistant's")
    return Preference([TextExample(messages=head + [turn]) for turn in last], 1, False, "conversation")


def preference_examples(row: Dict[str, Any], template: str) -> Preference:
    """The examples of a preference row in any layout of the module doc; ``template`` is ``plain`` or ``chat``."""
    if "output_1" in row or "output_2" in row:
        prompt = _text(row, "input", allow_empty=True)
        outputs = [_text(row, "output_1"), _text(row, "output_2")]
        label = row.get("label")
        if label not in (1, 2, "1", "2"):
            raise RowError(f"field 'label' must be 1 or 2, got {label!r}")
        chosen = outputs[int(label) - 1]
        rejected = outputs[2 - int(label)]
        return Preference([TextExample(prompt, chosen), TextExample(prompt, rejected)], 1, False, "llmbar")
    if "response_a" in row or "response_b" in row:
        return _labelled_pair(row)
    if "chosen" not in row or "rejected" not in row:
        raise RowError(_layout_hint(row))
    chosen, rejected = row["chosen"], row["rejected"]
    if (isinstance(row.get("messages"), list) or isinstance(row.get("prompt"), list) or _is_message_list(chosen)
            or _is_message_list(rejected)):
        return _conversation_pair(row, template)
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not isinstance(chosen, list) or not isinstance(rejected, list) or len(chosen) != len(rejected) or not chosen:
            raise RowError("'chosen' and 'rejected' lists must be non-empty and of equal length")
        prompt = _text(row, "prompt", allow_empty=True)
        for name, values in (("chosen", chosen), ("rejected", rejected)):
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise RowError(f"{name}[{i}] must be a string")
        examples = [TextExample(prompt, r) for r in list(chosen) + list(rejected)]
        return Preference(examples, len(chosen), True, "rm-bench")
    if "prompt" in row:
        prompt = _text(row, "prompt", allow_empty=True)
        return Preference(
            [TextExample(prompt, _text(row, "chosen", True)), TextExample(prompt, _text(row, "rejected", True))], 1,
            False, "pair"
        )
    return Preference(_hh_examples(_text(row, "chosen"), _text(row, "rejected"), template), 1, False, "hh-rlhf")


def _layout_hint(row: Dict[str, Any]) -> str:
    """Which columns a row has and which layout they look closest to."""
    found = sorted(row)
    names = set(found)
    if "label" in names:
        looks = ("a labelled pair, which needs 'prompt', 'response_a', 'response_b', 'label' "
                 "(or LLMBar's 'input', 'output_1', 'output_2', 'label')")
    elif names & {"chosen", "rejected"}:
        looks = "a preference pair, which needs both 'chosen' and 'rejected'"
    elif names & {"response", "responses"}:
        looks = "a row for 'score' or 'rank', not a preference pair"
    else:
        looks = "no preference layout"
    return (f"columns {found} look like {looks}; map other names with --fields NAME=COLUMN "
            "(e.g. --fields chosen=better,rejected=worse)")


def _hh_examples(chosen: str, rejected: str, template: str) -> List[TextExample]:
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise RowError("an HH-RLHF transcript needs a '\\n\\nAssistant:' turn")
    head = chosen[: cut_c + len(HH_ASSISTANT)]
    if rejected[: cut_r + len(HH_ASSISTANT)] != head:
        raise RowError("'chosen' and 'rejected' transcripts differ before their last assistant turn")
    responses = [chosen[len(head) :], rejected[len(head) :]]
    if template == "plain":
        # The prompt ends with "Assistant:"; the response keeps its leading space, as the text continues.
        for r in responses:
            if not r.strip():
                raise RowError("empty response after the last '\\n\\nAssistant:'")
        return [TextExample(head, r) for r in responses]
    turns = _hh_turns(head[: -len(HH_ASSISTANT)])
    out = []
    for r in responses:
        if not r.strip():
            raise RowError("empty response after the last '\\n\\nAssistant:'")
        out.append(TextExample(messages=turns + [{"role": "assistant", "content": r.strip()}]))
    return out


def _hh_turns(transcript: str) -> List[Dict[str, str]]:
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise RowError("an HH-RLHF transcript must start with '\\n\\nHuman:'")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not turns or turns[-1]["role"] != "user":
        raise RowError("the last turn before the scored assistant turn must be the human's")
    return turns


def preference_output(row: Dict[str, Any], index: int, pref: Preference, rewards: Sequence[float]) -> Dict[str, Any]:
    """One output row: ``id``, ``margin`` (chosen minus rejected; for a grid, the mean over its cells), the rewards,
    and for a grid the k x k margins with the row's easy / normal / hard accuracies."""
    out: Dict[str, Any] = {"id": row_id(row, index)}
    if row.get("subset") is not None:
        out["subset"] = row["subset"]
    k = pref.k
    chosen, rejected = list(rewards[:k]), list(rewards[k:])
    if not pref.grid:
        out.update(margin=chosen[0] - rejected[0], reward_chosen=chosen[0], reward_rejected=rejected[0])
        return out
    margins = [[c - r for r in rejected] for c in chosen]
    cells = [m for line in margins for m in line]
    out.update(margin=sum(cells) / len(cells), margins=margins, rewards_chosen=chosen, rewards_rejected=rejected)
    out.update(grid_accuracy(margins))
    return out


def win(margin: float) -> float:
    """1 for a positive margin, 0.5 for a tie, 0 otherwise."""
    if math.isnan(margin):
        raise ValueError("a margin is NaN")
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def grid_accuracy(margins: Sequence[Sequence[float]]) -> Dict[str, float]:
    """RM-Bench's easy (below the diagonal), normal (diagonal) and hard (above) accuracies of one grid."""
    k = len(margins)
    cells = {"easy": [], "normal": [], "hard": []}
    for i in range(k):
        for j in range(k):
            cells["easy" if i > j else "normal" if i == j else "hard"].append(win(margins[i][j]))
    return {name: sum(v) / len(v) for name, v in cells.items() if v}


def summarize_preferences(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Accuracy overall and per subset (grids: the mean over all their cells, and easy / normal / hard)."""

    def accumulate(group: List[Dict[str, Any]]) -> Dict[str, Any]:
        scores, grids = [], {"easy": [], "normal": [], "hard": []}
        for r in group:
            if "margins" in r:
                cells = [win(m) for line in r["margins"] for m in line]
                scores.append(sum(cells) / len(cells))
                for name in grids:
                    if name in r:
                        grids[name].append(r[name])
            else:
                scores.append(win(r["margin"]))
        out: Dict[str, Any] = {"rows": len(group), "accuracy": sum(scores) / len(scores) if scores else None}
        ties = sum(1 for r in group if "margins" not in r and r["margin"] == 0)
        out["ties"] = ties
        for name, values in grids.items():
            if values:
                out[name] = sum(values) / len(values)
        return out

    summary = accumulate(list(rows))
    subsets: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("subset") is not None:
            subsets.setdefault(str(r["subset"]), []).append(r)
    if subsets:
        summary["subsets"] = {name: accumulate(group) for name, group in sorted(subsets.items())}
    return summary


def rank_output(row: Dict[str, Any], index: int, rewards: Sequence[float]) -> Dict[str, Any]:
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))  # the first of equal rewards
    return {"id": row_id(row, index), "rewards": list(rewards), "best": best, "best_reward": rewards[best]}


def optional_subset(row: Dict[str, Any], default: Optional[str]) -> Dict[str, Any]:
    """The row with ``subset`` set to ``default`` when it has none (multi-file inputs name it by file)."""
    if default is not None and row.get("subset") is None:
        row = dict(row)
        row["subset"] = default
    return row
