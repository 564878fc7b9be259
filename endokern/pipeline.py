"""The one path from rows to results, for every front door.

A command's :class:`Task` turns an input row into examples and its results into output rows (a reward variant
included). :class:`RowScorer` takes rows through a task: the row checks (parsed, Unicode text, the task's layout,
``--fields``, lengths), the text template, one ``score_encoded`` call, and the results back in row order with every
row that cannot be scored as an error row in its place. Every front door runs it: a file run on either engine
(:func:`stream` in this process, the Ray engine on its actors), ``endokern serve`` (which splits it around its
batcher: :meth:`RowScorer.prepare`, then :meth:`RowScorer.assemble`) and the TRL reward. :func:`stream` reads the
inputs in chunks (memory does not grow with the input) and commits each chunk's output and error rows together
through :class:`endokern.io.RunWriter`, whose checkpoint makes a killed run resumable: output rows + error rows =
input rows, no duplicates.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import layouts
from .io import InputRow, RunWriter, read_inputs
from .model import EndoRM, ScoreResult, progress_bar
from .settings import ModelSettings, Settings
from .tokenization import Encoded, EncodeError, TextExample, document_start, resolve_template
from .variants import Variant, variant_score

__all__ = ["AttributesTask", "ChunkResult", "CompareTask", "FilterTask", "PreparedChunk", "RankTask", "RowScorer",
           "RunStats", "ScoreTask", "Task", "make_task", "rows_chunk", "stream"]

SCORE_FIELDS = ("reward", "reward_mean", "logprob", "num_tokens")


class Task:
    """What a command makes of a row (examples) and of its results (output rows per stream). ``fields`` maps the
    input's columns onto endokern's names (:func:`endokern.layouts.map_fields`) before the row is read."""

    name = "score"
    per_token = False
    self_certainty = False
    fields: Optional[Dict[str, str]] = None

    @property
    def needs_self_certainty(self) -> bool:
        """Whether its results must carry the self-certainty (its outputs, or a variant that is it)."""
        return self.self_certainty

    @property
    def needs_per_token(self) -> bool:
        """Whether its results must carry the per-token values (its outputs, or a variant computed from them)."""
        return self.per_token

    def examples(self, row: Dict[str, Any]) -> Tuple[List[TextExample], Any]:
        return layouts.score_examples(row), None

    def encode(self, encoder, examples: List[TextExample]) -> List[Any]:
        """The chunk's examples as :class:`Encoded` (or :class:`EncodeError`) in order."""
        return encoder.encode(examples)

    def error_outputs(self, error: Dict[str, Any]) -> Dict[str, List[dict]]:
        """What a row that cannot be scored puts in the streams besides its error row (nothing, but for an output
        that must mirror its input row for row)."""
        return {}

    def outputs(self, row: Dict[str, Any], index: int, state: Any, results: List[ScoreResult]) -> Dict[str, List[dict]]:
        result = results[0]
        out = {"id": layouts.row_id(row, index)}
        out.update({k: getattr(result, k) for k in SCORE_FIELDS})
        if self.per_token:
            out.update(token_rewards=result.token_rewards, token_logprobs=result.token_logprobs)
        return {"output": [out]}


class ScoreTask(Task):
    """``score``'s rows: ``reward`` and ``reward_mean`` by the model's options, or by ``variant`` (a reward variant of
    :mod:`endokern.variants` from the same forward pass, at the model's ``alpha``)."""

    def __init__(self, per_token: bool = False, variant: Optional[Variant] = None, alpha: float = 1.0,
                 self_certainty: bool = False):
        self.per_token = per_token
        self.variant = variant
        self.alpha = alpha
        self.self_certainty = self_certainty

    @property
    def needs_per_token(self) -> bool:
        return self.per_token or (self.variant is not None and self.variant.needs_per_token)

    @property
    def needs_self_certainty(self) -> bool:
        return self.self_certainty or (self.variant is not None and self.variant.needs_self_certainty)

    def outputs(self, row, index, state, results):
        streams = super().outputs(row, index, state, results)
        if self.self_certainty:
            streams["output"][0]["self_certainty"] = results[0].self_certainty
        if self.variant is not None:
            out, result = streams["output"][0], results[0]
            mean = Variant(self.variant.name + "-mean", self.variant.kind, self.variant.gamma, self.variant.terminal,
                           "mean")
            out["reward"] = variant_score(result, self.variant, self.alpha)
            out["reward_mean"] = variant_score(result, mean, self.alpha)
        return streams


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


class AttributesTask(Task):
    """Dolma attribute rows: one per document, in the documents' order, ``{"id", "attributes": {"<name>__<field>":
    [[0, len(text), value]]}}`` for reward, reward_mean, logprob and num_tokens (and, filtering, ``keep``: 1 or 0 by
    ``min_reward``); a document that cannot be scored keeps its line with no attributes. A document is its ``text``
    (or the column ``--fields response=`` names) after its ``prompt`` when it has one, else after the model's
    beginning of sequence (:func:`endokern.tokenization.document_start`)."""

    name = "attributes"

    def __init__(self, attribute: str, min_reward: Optional[float] = None, start: str = ""):
        self.attribute = attribute
        self.min_reward = min_reward
        self.start = start  # the prompt text of a document with none (endokern.tokenization.document_start)

    def examples(self, row):
        text = row.get("response", row.get("text"))
        if not isinstance(text, str):
            raise layouts.RowError("a document needs a 'text' string (or --fields response=COLUMN)")
        prompt = row.get("prompt") or self.start
        if not isinstance(prompt, str):
            raise layouts.RowError("field 'prompt' must be a string")
        return [TextExample(prompt=prompt, response=text)], len(text)

    def outputs(self, row, index, state, results):
        result = results[0]
        values = {k: getattr(result, k) for k in SCORE_FIELDS}
        if self.min_reward is not None:
            values["keep"] = 1 if result.reward >= self.min_reward else 0
        attributes = {f"{self.attribute}__{k}": [[0, state, v]] for k, v in values.items()}
        return {"output": [{"id": layouts.row_id(row, index), "attributes": attributes}]}

    def error_outputs(self, error):
        return {"output": [{"id": error.get("id", error["row"]), "attributes": {}}]}


def make_task(settings: Settings, rm: EndoRM, *, keep_scored: bool = False) -> Task:
    """The :class:`Task` of ``settings.command``. ``compare`` gets the template resolved by the model's tokenizer
    (HH-RLHF transcripts become messages under a chat template); filter's ``keep_scored`` sends every scored row to
    ``output`` (a later pass keeps the top fraction)."""
    if settings.attributes is not None:
        task: Task = AttributesTask(settings.attributes, settings.min_reward if settings.command == "filter" else None,
                                    document_start(rm.tokenizer))
    elif settings.command == "score":
        task = ScoreTask(per_token=settings.per_token, self_certainty=settings.self_certainty)
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
    scorer = RowScorer.for_settings(rm, settings, task)
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
            streams = _run_chunk(scorer, chunk, bar, stats)
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


def _run_chunk(scorer: "RowScorer", chunk, bar, stats) -> Dict[str, List[dict]]:
    """:meth:`RowScorer.score_chunk` with a progress bar that counts whole rows."""
    pending = [0.0]  # rows' worth of scored examples not yet shown (the bar shows whole rows)

    def progress(n_examples: int, n_tokens: int, rows_per_example: float) -> None:
        bar.report(0, n_tokens)
        pending[0] += n_examples * rows_per_example
        whole = min(int(pending[0]), len(chunk) - 1)
        if whole > 0:
            bar.bar.update(whole)
            pending[0] -= whole

    return scorer.score_chunk(chunk, stats=stats, progress=progress).streams()


@dataclass
class PreparedChunk:
    """A chunk's rows after the row checks and encoding, before the model runs: per row, in chunk order, its error
    row or what scoring it needs (``entries``), and the examples to score (``to_score``)."""

    entries: List[Tuple[str, Any]]  # ("error", error row) or ("scorable", (item, row, state, slots in to_score))
    to_score: List[Encoded]

    @property
    def rows(self) -> int:
        return len(self.entries)

    @property
    def errors(self) -> List[dict]:
        return [e for kind, e in self.entries if kind == "error"]

    @property
    def scorable(self) -> List[Tuple[InputRow, Dict[str, Any], Any, List[int]]]:
        return [e for kind, e in self.entries if kind == "scorable"]

    @property
    def rows_per_example(self) -> float:
        return (self.rows - len(self.errors)) / max(len(self.to_score), 1)


@dataclass
class ChunkResult:
    """A chunk's results: per input row, in chunk order, its rows by output stream (``output``, ``rejected`` or
    ``errors``)."""

    rows: List[Dict[str, List[dict]]]

    def streams(self) -> Dict[str, List[dict]]:
        """The rows of each stream, each in input order (what a file run commits)."""
        out: Dict[str, List[dict]] = {"errors": []}
        for by_stream in self.rows:
            for name, rows in by_stream.items():
                out.setdefault(name, []).extend(rows)
        return out

    def per_row(self) -> List[dict]:
        """One result per input row, in order: its first output row (``output`` or ``rejected``), or its error row
        (``{"row", "id"?, "reason"}``)."""
        return [(by.get("output") or by.get("rejected") or by["errors"])[0] for by in self.rows]


def rows_chunk(rows: Sequence[Any], first: int = 0) -> List[Tuple[InputRow, Optional[str]]]:
    """A chunk of plain rows (a request's, a trainer's batch): row ``i`` is numbered ``first + i``; one that is not an
    object becomes an error row."""
    return [(InputRow(first + i, row, None) if isinstance(row, dict) else
             InputRow(first + i, None, "row is not a JSON object"), None) for i, row in enumerate(rows)]


class RowScorer:
    """Rows -> results in row order, errors in place: the one path of every front door (see the module doc).

    ``task``: what a row means and what its results become (:class:`ScoreTask` by default); ``template``, ``system``,
    ``append_eos``: the text template (``rm.encoder``); ``max_length``: longer rows are error rows (as are rows longer
    than the model's positions). The same chunk gives the same results in any process: its examples are encoded and
    scored together.
    """

    def __init__(self, rm: EndoRM, task: Optional[Task] = None, *, template: str = "auto",
                 system: Optional[str] = None, append_eos: bool = False, max_length: Optional[int] = None):
        self.rm = rm
        self.task = task if task is not None else ScoreTask()
        self.encoder = rm.encoder(template, system=system, append_eos=append_eos)
        self.max_length = max_length

    @classmethod
    def for_settings(cls, rm: EndoRM, settings: ModelSettings, task: Optional[Task] = None) -> "RowScorer":
        """The scorer of ``settings``'s text options (template, system, append_eos, max_length); ``task`` defaults to
        the command's (:func:`make_task`) for a run's :class:`~endokern.settings.Settings`, else score."""
        if task is None:
            task = make_task(settings, rm) if isinstance(settings, Settings) else ScoreTask()
        return cls(rm, task, template=settings.template, system=settings.system, append_eos=settings.append_eos,
                   max_length=settings.max_length)

    def prepare(self, chunk: Sequence[Tuple[InputRow, Optional[str]]]) -> PreparedChunk:
        """Rows -> examples -> token ids, every row that cannot be scored as an error row; runs no model (the
        server prepares requests while the model scores others)."""
        return prepare_chunk(self.rm, self.task, self.encoder, chunk, self.max_length)

    def assemble(self, prepared: PreparedChunk, results: Sequence[ScoreResult]) -> ChunkResult:
        """The task's rows of each scored row (``results[i]`` is ``prepared.to_score[i]``'s), errors in place."""
        rows: List[Dict[str, List[dict]]] = []
        for kind, entry in prepared.entries:
            if kind == "error":
                rows.append({"errors": [entry], **self.task.error_outputs(entry)})
            else:
                item, row, state, slots = entry
                rows.append(self.task.outputs(row, item.index, state, [results[s] for s in slots]))
        return ChunkResult(rows)

    def score_chunk(self, chunk: Sequence[Tuple[InputRow, Optional[str]]], *, stats: Optional[RunStats] = None,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> ChunkResult:
        """One chunk of ``(InputRow, subset)`` pairs (as :func:`endokern.io.read_inputs` yields them) through the
        task. ``stats`` (when given) counts the examples scored and the tokens the model ran;
        ``progress(examples, tokens, rows_per_example)`` is called after each scored batch."""
        prepared = self.prepare(chunk)
        rows_per_example = prepared.rows_per_example

        def report(n_examples: int, n_tokens: int) -> None:
            if stats is not None:
                stats.examples += n_examples
                stats.tokens += n_tokens
            if progress is not None:
                progress(n_examples, n_tokens, rows_per_example)

        results = self.rm.score_encoded(prepared.to_score, per_token=self.task.needs_per_token,
                                        self_certainty=self.task.needs_self_certainty,
                                        progress=report) if prepared.to_score else []
        return self.assemble(prepared, results)

    def score_rows(self, rows: Sequence[Any]) -> List[dict]:
        """Plain rows (dicts) -> one result per row, in order (:meth:`ChunkResult.per_row`)."""
        return self.score_chunk(rows_chunk(rows)).per_row()


def prepare_chunk(
    rm: EndoRM,
    task: Task,
    encoder,
    chunk: Sequence[Tuple[InputRow, Optional[str]]],
    max_length: Optional[int] = None,
) -> PreparedChunk:
    """:meth:`RowScorer.prepare`: every row that cannot be parsed, holds text that is not Unicode (a lone surrogate,
    which a JSON reader lets through), has no usable fields, fails to encode, or is longer than ``max_length`` (or the
    model's positions) becomes an error row in its place."""
    entries: List[Tuple[str, Any]] = []
    accepted: List[Tuple[int, InputRow, Dict[str, Any], Any, int, int]] = []  # entry, item, row, state, first, count
    examples: List[TextExample] = []
    limit = max_length if max_length is not None else rm.max_positions
    max_chars = encoder.max_chars(limit) if limit else None
    for item, subset in chunk:
        if item.error is not None:
            entries.append(("error", _error(item.index, None, item.error, damaged=item.damaged)))
            continue
        problem = not_unicode(item.row)
        if problem is not None:
            entries.append(("error", _error(item.index, item.row, problem)))
            continue
        row = layouts.optional_subset(item.row, subset)
        try:
            row = layouts.map_fields(row, task.fields)
            row_examples, state = task.examples(row)
        except layouts.RowError as err:
            entries.append(("error", _error(item.index, row, str(err))))
            continue
        too_long = max_chars is not None and max((text_length(e) for e in row_examples), default=0) > max_chars
        if too_long:  # said before tokenizing: a huge field would take memory far beyond the chunk's
            entries.append(("error", _error(
                item.index, row, f"{max(text_length(e) for e in row_examples)} characters, more than any text of "
                f"{limit} tokens holds with this tokenizer (at most {max_chars}); longer than "
                f"{'--max-length' if max_length is not None else 'the model context'}")))
            continue
        accepted.append((len(entries), item, row, state, len(examples), len(row_examples)))
        entries.append(("pending", None))
        examples.extend(row_examples)
    encoded = task.encode(encoder, examples) if examples else []
    vocab = rm.head.weight.shape[0]  # ids given by a caller are checked against it (text always tokenizes inside)
    to_score: List[Encoded] = []
    for at, item, row, state, first, count in accepted:
        mine = encoded[first : first + count]
        problem = next((e for e in mine if isinstance(e, EncodeError)), None)
        if problem is None and max_length is not None:
            longest = max(e.length for e in mine)
            if longest > max_length:
                problem = f"{longest} tokens, more than --max-length {max_length}"
        if problem is None and max(max(e.prompt_ids + e.response_ids) for e in mine) >= vocab:
            problem = f"a token id is outside the model's vocabulary [0, {vocab})"
        if problem is None and rm.max_positions and max(e.length for e in mine) > rm.max_positions:
            problem = f"{max(e.length for e in mine)} tokens, more than the model's {rm.max_positions} positions"
        if problem is not None:
            entries[at] = ("error", _error(item.index, row, str(problem)))
            continue
        entries[at] = ("scorable", (item, row, state, list(range(len(to_score), len(to_score) + count))))
        to_score.extend(mine)
    return PreparedChunk(entries, to_score)


def text_length(example: TextExample) -> int:
    """The characters of an example's text: prompt, response, and every message's content."""
    n = sum(len(t) for t in (example.prompt, example.response) if isinstance(t, str))
    for m in example.messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        n += len(content) if isinstance(content, str) else 0
    return n


def not_unicode(value: Any, where: str = "") -> Optional[str]:
    """Why a parsed row is not Unicode text (a string or key holding a lone surrogate such as ``"\\udc00"``, which
    Python's JSON reader accepts and no tokenizer or UTF-8 writer can take), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"{where or 'a field'} holds a lone surrogate ({ascii(value[err.start])} at character "
                    f"{err.start}), which is not Unicode text; fix the text's encoding")
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = not_unicode(key, f"a key of {where or 'the row'}") or not_unicode(
                item, f"{where}.{key}" if where else str(key).encode("utf-8", "backslashreplace").decode())
            if problem:
                return problem
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = not_unicode(item, f"{where}[{i}]")
            if problem:
                return problem
    return None


def _error(index: int, row: Optional[Dict[str, Any]], reason: str, damaged: bool = False) -> dict:
    out: Dict[str, Any] = {"row": index}
    if row is not None and row.get("id") is not None:
        # an id that is not Unicode text is kept, escaped, so the error row can be written
        out["id"] = row["id"] if not_unicode(row["id"]) is None else ascii(row["id"])
    out["reason"] = reason
    if damaged:
        out["damaged"] = True  # reading the input stopped here: the run fails once the rows before are committed
    return out
