"""What a run does to its rows, chunk by chunk, whichever engine runs it.

A command's :class:`Task` turns an input row into examples and its results into output rows; :func:`process_chunk`
takes one chunk of numbered input rows through a task (encoding, length checks, one ``score_encoded`` call, per-row
errors) and is the unit both engines run: :func:`stream` in this process, the Ray engine on its actors. :func:`stream`
reads the inputs in chunks (memory does not grow with the input) and commits each chunk's output and error rows
together through :class:`endokern.io.RunWriter`, whose checkpoint makes a killed run resumable: output rows + error
rows = input rows, no duplicates.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import layouts
from .io import InputRow, RunWriter, read_inputs
from .model import EndoRM, ScoreResult, progress_bar
from .settings import Settings
from .tokenization import Encoded, EncodeError, TextExample, resolve_template

SCORE_FIELDS = ("reward", "reward_mean", "logprob", "num_tokens")


class Task:
    """What a command makes of a row (examples) and of its results (output rows per stream). ``fields`` maps the
    input's columns onto endokern's names (:func:`endokern.layouts.map_fields`) before the row is read."""

    name = "score"
    per_token = False
    fields: Optional[Dict[str, str]] = None

    def examples(self, row: Dict[str, Any]) -> Tuple[List[TextExample], Any]:
        return layouts.score_examples(row), None

    def encode(self, encoder, examples: List[TextExample]) -> List[Any]:
        """The chunk's examples as :class:`Encoded` (or :class:`EncodeError`) in order."""
        return encoder.encode(examples)

    def outputs(self, row: Dict[str, Any], index: int, state: Any, results: List[ScoreResult]) -> Dict[str, List[dict]]:
        result = results[0]
        out = {"id": layouts.row_id(row, index)}
        out.update({k: getattr(result, k) for k in SCORE_FIELDS})
        if self.per_token:
            out.update(token_rewards=result.token_rewards, token_logprobs=result.token_logprobs)
        return {"output": [out]}


class ScoreTask(Task):
    def __init__(self, per_token: bool = False):
        self.per_token = per_token


class CompareTask(Task):
    name = "compare"

    def __init__(self, template: str):
        self.template = template

    def examples(self, row):
        pref = layouts.preference_examples(row, self.template)
        return pref.examples, pref

    def outputs(self, row, index, state, results):
        return {"output": [layouts.preference_output(row, index, state, [r.reward for r in results])]}


class RankTask(Task):
    name = "rank"

    def examples(self, row):
        return layouts.rank_examples(row), None

    def outputs(self, row, index, state, results):
        return {"output": [layouts.rank_output(row, index, [r.reward for r in results])]}


class FilterTask(Task):
    """Keeps a row when its reward is at least ``min_reward``; the rest go to ``rejected`` with the reason.
    With ``keep_scored`` every scored row goes to ``output`` (a later pass picks the top fraction)."""

    name = "filter"

    def __init__(self, min_reward: Optional[float], keep_scored: bool = False):
        self.min_reward = min_reward
        self.keep_scored = keep_scored

    def outputs(self, row, index, state, results):
        result = results[0]
        out = dict(row)
        out["id"] = layouts.row_id(row, index)
        out.update({k: getattr(result, k) for k in SCORE_FIELDS})
        if self.keep_scored or self.min_reward is None or result.reward >= self.min_reward:
            return {"output": [out]}
        out["reason"] = f"reward {result.reward:.6g} < min-reward {self.min_reward:g}"
        return {"rejected": [out]}


def make_task(settings: Settings, rm: EndoRM, *, keep_scored: bool = False) -> Task:
    """The :class:`Task` of ``settings.command``. ``compare`` gets the template resolved by the model's tokenizer
    (HH-RLHF transcripts become messages under a chat template); filter's ``keep_scored`` sends every scored row to
    ``output`` (a later pass keeps the top fraction)."""
    if settings.command == "score":
        task: Task = ScoreTask(per_token=settings.per_token)
    elif settings.command == "compare":
        task = CompareTask(resolve_template(rm.tokenizer, settings.template))
    elif settings.command == "rank":
        task = RankTask()
    elif settings.command == "filter":
        task = FilterTask(None if keep_scored else settings.min_reward, keep_scored=keep_scored)
    else:
        raise ValueError(f"no task for command {settings.command!r}")
    task.fields = layouts.parse_fields(settings.fields) if settings.fields else None
    return task


@dataclass
class RunStats:
    rows: int = 0  # input rows done by this call
    errors: int = 0
    examples: int = 0  # responses scored
    tokens: int = 0  # tokens the model ran: a prompt shared by several responses counts once, padding never
    seconds: float = 0.0
    resumed_from: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        out = {
            "rows": self.rows, "errors": self.errors, "examples": self.examples, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "resumed_from_row": self.resumed_from,
        }
        if self.seconds > 0:
            out["rows_per_s"] = round(self.rows / self.seconds, 3)
            out["examples_per_s"] = round(self.examples / self.seconds, 3)
            out["tokens_per_s"] = round(self.tokens / self.seconds, 1)
        return out


def stream(rm: EndoRM, task: Task, settings: Settings, writer: RunWriter) -> RunStats:
    """Stream ``settings.input`` through ``task`` into ``writer``, resuming after the rows it has committed.

    ``settings`` gives the text options (template, system, append_eos, max_length), the shard, ``limit``,
    ``chunk_rows`` and ``progress``. The bar counts committed rows, and the tokens the model ran per second."""
    encoder = rm.encoder(settings.template, system=settings.system, append_eos=settings.append_eos)
    stats = RunStats(resumed_from=writer.rows_done)
    if writer.complete:
        return stats
    rows = read_inputs(settings.input, settings.num_shards, settings.shard_index, writer.rows_done)
    limit = settings.limit
    if limit is not None:
        rows = itertools.islice(rows, max(0, limit - writer.rows_done))
    total = None if limit is None else max(0, limit - writer.rows_done)
    bar = progress_bar(total, task.name, disable=not settings.progress)
    bar.bar.unit = "row"
    started = time.perf_counter()
    try:
        while True:
            chunk = list(itertools.islice(rows, settings.chunk_rows))
            if not chunk:
                break
            streams = _run_chunk(rm, task, encoder, chunk, settings.max_length, bar, stats)
            writer.commit(streams, rows_consumed=len(chunk))
            stats.rows += len(chunk)
            stats.errors += len(streams.get("errors", []))
            for error in streams.get("errors", []):
                if error.get("damaged"):
                    stats.extra.setdefault("damaged", error["reason"])
            bar.bar.n = stats.rows  # the chunk is committed: the bar shows whole rows again
            bar.bar.refresh()
        writer.finish()
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - started
    return stats


def _run_chunk(rm, task, encoder, chunk, max_length, bar, stats) -> Dict[str, List[dict]]:
    """:func:`process_chunk` with a progress bar that counts whole rows."""
    pending = [0.0]  # rows' worth of scored examples not yet shown (the bar shows whole rows)

    def progress(n_examples: int, n_tokens: int, rows_per_example: float) -> None:
        bar.report(0, n_tokens)
        pending[0] += n_examples * rows_per_example
        whole = min(int(pending[0]), len(chunk) - 1)
        if whole > 0:
            bar.bar.update(whole)
            pending[0] -= whole

    return process_chunk(rm, task, encoder, chunk, max_length, stats=stats, progress=progress)


@dataclass
class PreparedChunk:
    """A chunk's rows after parsing, encoding and length checks, before the model runs: the rows that failed (error
    rows, in input order), the rows to score with the slots of their examples in ``to_score``, and those examples."""

    errors: List[dict]
    scorable: List[Tuple[InputRow, Dict[str, Any], Any, List[int]]]  # item, row, state, slots in to_score
    to_score: List[Encoded]
    rows: int  # rows in the chunk

    @property
    def rows_per_example(self) -> float:
        return (self.rows - len(self.errors)) / max(len(self.to_score), 1)


def prepare_chunk(
    rm: EndoRM,
    task: Task,
    encoder,
    chunk: Sequence[Tuple[InputRow, Optional[str]]],
    max_length: Optional[int] = None,
) -> PreparedChunk:
    """The first half of :func:`process_chunk`: rows -> examples -> token ids, with every row that cannot be parsed,
    has no usable fields, fails to encode, or is longer than ``max_length`` (or the model's positions) as an error
    row. Runs no model (the server prepares requests while the model scores others)."""
    errors: List[dict] = []
    accepted: List[Tuple[InputRow, Dict[str, Any], Any, int, int]] = []  # item, row, state, first, count
    examples: List[TextExample] = []
    limit = max_length if max_length is not None else rm.max_positions
    max_chars = encoder.max_chars(limit) if limit else None
    for item, subset in chunk:
        if item.error is not None:
            errors.append(_error(item.index, None, item.error, damaged=item.damaged))
            continue
        row = layouts.optional_subset(item.row, subset)
        try:
            row = layouts.map_fields(row, task.fields)
            row_examples, state = task.examples(row)
        except layouts.RowError as err:
            errors.append(_error(item.index, row, str(err)))
            continue
        too_long = max_chars is not None and max((text_length(e) for e in row_examples), default=0) > max_chars
        if too_long:  # said before tokenizing: a huge field would take memory far beyond the chunk's
            errors.append(_error(item.index, row, f"{max(text_length(e) for e in row_examples)} characters, more "
                                 f"than any text of {limit} tokens holds with this tokenizer (at most {max_chars}); "
                                 f"longer than {'--max-length' if max_length is not None else 'the model context'}"))
            continue
        accepted.append((item, row, state, len(examples), len(row_examples)))
        examples.extend(row_examples)
    encoded = task.encode(encoder, examples) if examples else []
    scorable: List[Tuple[InputRow, Dict[str, Any], Any, List[int]]] = []
    to_score: List[Encoded] = []
    for item, row, state, first, count in accepted:
        mine = encoded[first : first + count]
        problem = next((e for e in mine if isinstance(e, EncodeError)), None)
        if problem is None and max_length is not None:
            longest = max(e.length for e in mine)
            if longest > max_length:
                problem = f"{longest} tokens, more than --max-length {max_length}"
        if problem is None and rm.max_positions and max(e.length for e in mine) > rm.max_positions:
            problem = f"{max(e.length for e in mine)} tokens, more than the model's {rm.max_positions} positions"
        if problem is not None:
            errors.append(_error(item.index, row, str(problem)))
            continue
        scorable.append((item, row, state, list(range(len(to_score), len(to_score) + count))))
        to_score.extend(mine)
    return PreparedChunk(errors, scorable, to_score, len(chunk))


def process_chunk(
    rm: EndoRM,
    task: Task,
    encoder,
    chunk: Sequence[Tuple[InputRow, Optional[str]]],
    max_length: Optional[int] = None,
    *,
    stats: Optional[RunStats] = None,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> Dict[str, List[dict]]:
    """One chunk of input rows through ``task``: the rows of each output stream (``output``, ``errors``, and
    ``rejected`` for filter), each in input order.

    ``chunk`` holds ``(InputRow, subset)`` pairs as :func:`endokern.io.read_inputs` yields them; ``encoder`` is
    ``rm.encoder(template, system=..., append_eos=...)``. A row that cannot be parsed, has no usable fields, fails to
    encode, or is longer than ``max_length`` (or the model's positions) goes to ``errors`` with the reason
    (:func:`prepare_chunk`). The chunk's examples are encoded and scored together, so the same chunk gives the same
    results in any process. ``stats`` (when given) counts the examples scored and the tokens the model ran;
    ``progress(examples, tokens, rows_per_example)`` is called after each scored batch. Used by :func:`stream` and by
    the Ray engine.
    """
    prepared = prepare_chunk(rm, task, encoder, chunk, max_length)
    rows_per_example = prepared.rows_per_example

    def report(n_examples: int, n_tokens: int) -> None:
        if stats is not None:
            stats.examples += n_examples
            stats.tokens += n_tokens
        if progress is not None:
            progress(n_examples, n_tokens, rows_per_example)

    to_score = prepared.to_score
    results = rm.score_encoded(to_score, per_token=task.per_token, progress=report) if to_score else []
    streams: Dict[str, List[dict]] = {"errors": prepared.errors}
    for item, row, state, slots in prepared.scorable:
        for name, rows_out in task.outputs(row, item.index, state, [results[s] for s in slots]).items():
            streams.setdefault(name, []).extend(rows_out)
    # Errors and outputs are both in input order within their own streams.
    return streams


def text_length(example: TextExample) -> int:
    """The characters of an example's text: prompt, response, and every message's content."""
    n = sum(len(t) for t in (example.prompt, example.response) if isinstance(t, str))
    for m in example.messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        n += len(content) if isinstance(content, str) else 0
    return n


def _error(index: int, row: Optional[Dict[str, Any]], reason: str, damaged: bool = False) -> dict:
    out: Dict[str, Any] = {"row": index}
    if row is not None and row.get("id") is not None:
        out["id"] = row["id"]
    out["reason"] = reason
    if damaged:
        out["damaged"] = True  # reading the input stopped here: the run fails once the rows before are committed
    return out
