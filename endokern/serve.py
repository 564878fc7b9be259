"""``endokern serve``: one :class:`endokern.EndoRM` behind HTTP, for RL loops.

Endpoints:

- ``POST /score``: ``{"rows": [{"prompt", "response"} | {"messages"} | {"prompt_ids" | "prompt", "response_ids"}],
  "per_token": false}`` ->
  ``{"results": [...]}``, one per row in order: the fields of ``endokern score``'s output rows (``id``, ``reward``,
  ``reward_mean``, ``logprob``, ``num_tokens``; with ``per_token``, ``token_rewards`` and ``token_logprobs``), or
  ``{"id", "error"}`` for a row that cannot be scored. Optional ``gamma``, ``terminal``, ``reduce`` pick a reward
  variant for this request (from the same forward pass, :func:`endokern.variants.variant_score`); or ``variant``
  names one (``self-certainty``, ``mean``, ``loglik``...: :func:`endokern.variants.parse_variant`).
- ``POST /get_reward``: OpenRLHF's remote reward model: ``{"query": [prompt + response texts], "prompts": [prompt
  texts], "labels": [...]}`` (``labels`` and other fields are not used) -> ``{"rewards": [...], "scores": [...],
  "extra_logs": {"unscorable": [0 or 1]}, "errors": [reason or null]}`` (``extra_logs`` holds numbers only: OpenRLHF
  makes each value a tensor). The texts are rendered already (the policy's chat markup included): the query is
  tokenized once (plain) and split where its prompt ends, so the response is the policy's own tokens; a prompt the
  query does not start with (OpenRLHF truncates long prompts) is split after the longest part of the prompt it starts
  with (the prompt's start, or its end when the prompt lost its first tokens). ``rewards``
  are the raw endogenous rewards, ``scores`` ``sigmoid(reward_mean / --score-scale)`` in (0, 1) (what OpenRLHF's
  dynamic filtering reads). A sample that cannot be scored is ``null`` (or ``--unscorable-reward``'s value: OpenRLHF
  fails on a null reward) with its reason in ``errors`` and the server's log, and the answer is 200 (OpenRLHF drops a
  reward silently on any other status); ``--strict`` makes it a 422.
- ``POST /reward``: slime's remote reward model: one bare ``{"prompt", "response", "label"}`` object ->
  ``{"reward", "reward_mean"}`` (``null``, or ``--unscorable-reward``'s value, with ``error`` for a sample that cannot
  be scored; ``--strict``: 422).
- ``GET /health`` (never needs the key), ``GET /metrics`` (Prometheus text).

Scheduling: request handlers parse and tokenize rows on one encoding thread (the same row -> examples -> token ids
path and checks as offline runs, :meth:`endokern.pipeline.RowScorer.prepare`), then queue the token ids. One scoring
thread owns the model: it takes the oldest request, waits up to ``max_wait_ms`` for others (unless a step's worth of
tokens is already queued), merges requests up to ``step_tokens`` and scores them with one ``score_encoded`` call,
which sorts them by length into forward batches of the model's ``batch_tokens``. A request larger than a step is
queued in pieces of a step, and a request with pieces left waits behind the others, so a 1-row request is never held
up by all of a 10,000-row one. So 16 clients sending 4 rows each run as a few large batches, and a row's reward is its
offline reward up to batch-composition rounding.

Limits: a request whose tokens would take the queue past ``max_queue_tokens`` gets 503 with ``Retry-After``; a body
over ``max_body_bytes`` gets 413 (as does a request too large ever to be queued); malformed JSON 400; wrong fields
422, naming the problem; rows over ``--max-length`` are per-row errors. With an API key (``--api-key`` or
``$ENDOKERN_API_KEY``) every endpoint but ``/health`` needs ``Authorization: Bearer <key>`` (compared in constant
time; 401 otherwise). ``--request-timeout`` bounds a request from arrival to answer (504 past it). Every answer of 400
or more is logged with its reason. SIGTERM (uvicorn's graceful shutdown) stops accepting connections, gives the
requests in flight up to ``--shutdown-grace`` seconds, then stops the scoring thread. A request whose client goes away
is cancelled (499 in the metrics) and its rows leave the queue; one already being scored does not hold up the others.
"""


import argparse
import asyncio
import collections
import concurrent.futures
import hmac
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .model import EndoRM, ScoreResult
from .io import InputRow
from .pipeline import ChunkResult, PreparedChunk, RowScorer, ScoreTask, rows_chunk
from .settings import ModelSettings, SettingsError, check_reward
from .tokenization import Encoded
from .variants import NAMES as VARIANT_NAMES
from .variants import Variant, parse_variant

API_KEY_ENV = "ENDOKERN_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Latency histogram buckets (seconds) of /metrics.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ServeOptions:
    """The server's own options (the model's come from :class:`endokern.settings.ModelSettings`)."""

    host: str = field(default="127.0.0.1", metadata=dict(help="address to bind (a non-loopback one without "
                                                             "--api-key prints a warning)"))
    port: int = field(default=8000, metadata=dict(help="port (0: any free one, printed at start)", type=int))
    api_key: Optional[str] = field(default=None, metadata=dict(
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})"))
    max_wait_ms: float = field(default=5.0, metadata=dict(
        help="how long the oldest queued request waits for others to share its batch", type=float))
    step_tokens: Optional[int] = field(default=None, metadata=dict(
        help="tokens of queued requests merged into one scoring step (default: 4 x --batch-tokens)", type=int))
    max_queue_tokens: int = field(default=262144, metadata=dict(
        help="tokens waiting to be scored; a request past it gets 503 with Retry-After", type=int))
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=dict(
        help="largest request body; a larger one gets 413", type=int))
    request_timeout: Optional[float] = field(default=None, metadata=dict(
        help="seconds a request may take from arrival to answer; past it, 504 (default: no limit)", type=float))
    score_scale: float = field(default=1.0, metadata=dict(
        help="/get_reward's scores are sigmoid(reward_mean / SCALE), in (0, 1); its rewards stay raw", type=float))
    unscorable_reward: Optional[float] = field(default=None, metadata=dict(
        help="/get_reward and /reward give an unscorable sample this reward instead of null (OpenRLHF turns every "
             "reward into a tensor and fails on null)", type=float))
    strict: bool = field(default=False, metadata=dict(
        help="/get_reward and /reward refuse a request with an unscorable sample (422) instead of answering null "
             "with the reason", action="store_true"))
    shutdown_grace: float = field(default=30.0, metadata=dict(
        help="after SIGTERM, seconds the requests in flight get before the server stops anyway", type=float))

    def validate(self) -> "ServeOptions":
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"--port must be in [0, 65535], got {self.port}")
        if not self.max_wait_ms >= 0 or not math.isfinite(self.max_wait_ms):
            raise SettingsError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        for name in ("step_tokens", "max_queue_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.api_key is not None and not self.api_key:
            raise SettingsError("--api-key must not be empty")
        for name in ("request_timeout", "score_scale", "shutdown_grace"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise SettingsError(f"--{name.replace('_', '-')} must be a number > 0, got {value}")
        return self

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("the server")
        for f in fields(cls):
            meta = dict(f.metadata)
            group.add_argument("--" + f.name.replace("_", "-"), default=f.default, **meta)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeOptions":
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        if values["api_key"] is None:
            values["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(**values)


class HTTPError(Exception):
    """A request that fails as a whole: the status, the reason, and headers (Retry-After)."""

    def __init__(self, status: int, detail: Any, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Counters, gauges and one latency histogram, rendered as Prometheus text. Fixed size: memory stays flat."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = collections.Counter()
        self.rows = 0
        self.row_errors = 0
        self.tokens = 0
        self.steps = 0
        self.step_rows = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            self.latency_sum += seconds
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[i] += 1
                    break
            else:
                self.latency_counts[-1] += 1

    def rows_done(self, rows: int, errors: int) -> None:
        with self._lock:
            self.rows += rows
            self.row_errors += errors

    def step(self, rows: int, tokens: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_rows += rows
            self.tokens += tokens

    def render(self, queue_tokens: int, queue_requests: int) -> str:
        with self._lock:
            lines = ["# HELP endokern_requests_total HTTP requests by path and status.",
                     "# TYPE endokern_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'endokern_requests_total{{path="{path}",code="{status}"}} {n}')
            for name, kind, text, value in (
                ("rows_total", "counter", "rows received by /score and /get_reward", self.rows),
                ("row_errors_total", "counter", "rows answered with an error", self.row_errors),
                ("tokens_total", "counter", "tokens of the rows scored (prompt + response)", self.tokens),
                ("steps_total", "counter", "scoring steps (merged requests, one score_encoded call each)", self.steps),
                ("step_rows_total", "counter", "examples scored by the steps", self.step_rows),
                ("queue_tokens", "gauge", "tokens waiting to be scored", queue_tokens),
                ("queue_requests", "gauge", "requests waiting to be scored", queue_requests),
            ):
                lines += [f"# HELP endokern_{name} {text}.", f"# TYPE endokern_{name} {kind}", f"endokern_{name} {value}"]
            lines += ["# HELP endokern_request_duration_seconds Time from a request's arrival to its answer.",
                      "# TYPE endokern_request_duration_seconds histogram"]
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, self.latency_counts):
                cumulative += n
                lines.append(f'endokern_request_duration_seconds_bucket{{le="{bound:g}"}} {cumulative}')
            total = cumulative + self.latency_counts[-1]
            lines += [f'endokern_request_duration_seconds_bucket{{le="+Inf"}} {total}',
                      f"endokern_request_duration_seconds_sum {self.latency_sum:.6f}",
                      f"endokern_request_duration_seconds_count {total}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the scheduler


@dataclass
class Pending:
    """A request's examples waiting in the queue, in pieces of at most a step's tokens (so a large request shares
    the steps with the small ones behind it), and how to hand back its results (or the error)."""

    pieces: Deque[List[Encoded]]
    per_token: bool
    deliver: Callable[[Optional[List[ScoreResult]], Optional[BaseException]], None]
    tokens: int  # still queued
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    results: List[ScoreResult] = field(default_factory=list)
    self_certainty: bool = False  # its rows need ScoreResult.self_certainty (the self-certainty variant)


def split_steps(encoded: Sequence[Encoded], step_tokens: int) -> Deque[List[Encoded]]:
    """Consecutive pieces of ``encoded`` of at most ``step_tokens`` tokens each (an example longer than a step is a
    piece of its own)."""
    pieces: Deque[List[Encoded]] = collections.deque()
    tokens = 0
    for e in encoded:
        if not pieces or (tokens + e.length > step_tokens and pieces[-1]):
            pieces.append([])
            tokens = 0
        pieces[-1].append(e)
        tokens += e.length
    return pieces


class Batcher:
    """One thread owns the model and scores merged requests (see the module doc). A step takes the next piece of
    each waiting request in turn, oldest first, up to ``step_tokens``; a request with pieces left goes behind the
    others, so a 1-row request never waits for all of a 10,000-row one."""

    def __init__(self, rm: EndoRM, *, max_wait_s: float, step_tokens: int, max_queue_tokens: int,
                 metrics: Optional[Metrics] = None):
        self.rm = rm
        self.max_wait_s = max_wait_s
        self.step_tokens = step_tokens
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics or Metrics()
        self.queued_tokens = 0
        self._queue: Deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="endokern-scorer", daemon=True)
        self._thread.start()

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def submit(self, encoded: List[Encoded], per_token: bool,
               deliver: Callable[[Optional[List[ScoreResult]], Optional[BaseException]], None],
               self_certainty: bool = False) -> Optional[Pending]:
        """Queue a request; None when its tokens would take the queue past ``max_queue_tokens``."""
        item = Pending(split_steps(encoded, self.step_tokens), per_token, deliver, sum(e.length for e in encoded),
                       self_certainty=self_certainty)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scorer has stopped")
            if self.queued_tokens + item.tokens > self.max_queue_tokens:
                return None
            self._queue.append(item)
            self.queued_tokens += item.tokens
            self._cond.notify()
        return item

    def close(self) -> None:
        """Score what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _drop(self, item: Pending) -> None:
        self.queued_tokens -= item.tokens
        item.tokens = 0

    def _take(self) -> Optional[List[Tuple[Pending, List[Encoded]]]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            # Wait for company: until the oldest has waited max_wait_s, or a step's worth of tokens is queued.
            deadline = self._queue[0].arrived + self.max_wait_s
            while self.queued_tokens < self.step_tokens and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken: List[Tuple[Pending, List[Encoded]]] = []
            tokens, served = 0, []
            while self._queue:
                item = self._queue[0]
                if item.cancelled:  # its client went away while it waited: dropped before it decides what fits
                    self._drop(self._queue.popleft())
                    continue
                piece_tokens = sum(e.length for e in item.pieces[0])
                if taken and tokens + piece_tokens > self.step_tokens:
                    break  # in order: the next step starts with it
                self._queue.popleft()
                piece = item.pieces.popleft()
                item.tokens -= piece_tokens
                self.queued_tokens -= piece_tokens
                taken.append((item, piece))
                tokens += piece_tokens
                if item.pieces:
                    served.append(item)  # its next piece waits behind the requests not served in this step
            self._queue.extend(served)
            return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            if not taken:
                continue
            encoded = [e for _, piece in taken for e in piece]
            try:
                results = self.rm.score_encoded(encoded, per_token=any(item.per_token for item, _ in taken),
                                                self_certainty=any(item.self_certainty for item, _ in taken))
            except Exception as err:  # noqa: BLE001 - handed to each waiting request as a 500
                for item, _ in taken:
                    if not item.cancelled:
                        item.cancelled = True
                        with self._cond:
                            self._drop(item)
                        item.deliver(None, err)
                continue
            self.metrics.step(len(encoded), sum(e.length for e in encoded))
            start = 0
            for item, piece in taken:
                item.results.extend(results[start : start + len(piece)])
                start += len(piece)
                if not item.pieces and not item.cancelled:
                    item.deliver(item.results, None)


# ------------------------------------------------------------------------------------------------ the service


class RewardService:
    """What the endpoints do, without HTTP: parse a body, prepare rows, queue them, assemble the answer."""

    def __init__(self, rm: EndoRM, settings: ModelSettings, options: ServeOptions,
                 log: Callable[[str], None] = lambda line: None):
        self.rm = rm
        self.log = log
        self.settings = settings
        self.options = options
        self.metrics = Metrics()
        self.scorer = RowScorer.for_settings(rm, settings, ScoreTask())
        # /get_reward's texts are rendered already (the policy's chat markup included): plain text
        self.plain_scorer = RowScorer(rm, ScoreTask(), template="plain", append_eos=settings.append_eos,
                                      max_length=settings.max_length)
        self.bos_text = getattr(rm.tokenizer, "bos_token", None) if _adds_bos(rm.tokenizer) else None
        self.joint = bool(getattr(rm.tokenizer, "is_fast", False))  # offsets: split one tokenization of the query
        # One encoding thread: the fast tokenizer is not shared between threads, and the model thread runs beside it.
        self.encode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="endokern-encode")
        step = options.step_tokens or 4 * rm.batch_tokens
        self.batcher = Batcher(rm, max_wait_s=options.max_wait_ms / 1000.0, step_tokens=step,
                               max_queue_tokens=options.max_queue_tokens, metrics=self.metrics)

    def close(self) -> None:
        self.batcher.close()
        self.encode_pool.shutdown(wait=True)

    async def _prepare(self, rows: Sequence[Any], scorer: RowScorer) -> PreparedChunk:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.encode_pool, scorer.prepare, request_chunk(rows))

    async def _run(self, rows: Sequence[Any], scorer: RowScorer) -> ChunkResult:
        """The one row path (:class:`endokern.pipeline.RowScorer`) split around the batcher: prepared on the encoding
        thread, scored in a merged step, assembled here."""
        prepared = await self._prepare(rows, scorer)
        results = await self._score(prepared.to_score, scorer.task.needs_per_token,
                                    getattr(scorer.task, "needs_self_certainty", False))
        return scorer.assemble(prepared, results)

    async def _score(self, encoded: List[Encoded], per_token: bool, self_certainty: bool = False
                     ) -> List[ScoreResult]:
        if not encoded:
            return []
        tokens = sum(e.length for e in encoded)
        if tokens > self.options.max_queue_tokens:
            raise HTTPError(413, f"the request's rows hold {tokens} tokens, more than the queue takes "
                                 f"(--max-queue-tokens {self.options.max_queue_tokens}); split it")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def resolve(results, error):
            if not future.done():  # the handler may have been cancelled (the client went away)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(results)

        def deliver(results, error):
            loop.call_soon_threadsafe(resolve, results, error)

        item = self.batcher.submit(encoded, per_token, deliver, self_certainty)
        if item is None:
            raise HTTPError(503, f"the queue is full ({self.batcher.queued_tokens} tokens waiting, "
                                 f"--max-queue-tokens {self.options.max_queue_tokens}); retry later",
                            {"Retry-After": "1"})
        try:
            return await future
        except asyncio.CancelledError:
            item.cancelled = True
            raise

    async def score(self, body: Any) -> Dict[str, Any]:
        body = _object(body)
        unknown = set(body) - {"rows", "per_token", "gamma", "terminal", "reduce", "variant"}
        if unknown:
            raise HTTPError(422, f"unknown field(s) {sorted(unknown)}; /score takes rows, per_token, gamma, terminal, "
                                 "reduce, variant")
        rows = body.get("rows")
        if not isinstance(rows, list):
            raise HTTPError(422, "field 'rows' must be a list of {prompt, response}, {messages} or {prompt_ids | "
                                 "prompt, response_ids} objects")
        per_token = body.get("per_token", False)
        if not isinstance(per_token, bool):
            raise HTTPError(422, "field 'per_token' must be true or false")
        variant = self._variant(body)
        scorer = self.scorer
        if per_token or variant is not None:
            scorer = RowScorer.for_settings(self.rm, self.settings, ScoreTask(per_token, variant, self.rm.alpha))
        answer = (await self._run(rows, scorer)).per_row()
        answer = [{"id": r.get("id", r["row"]), "error": r["reason"]} if "reason" in r else r for r in answer]
        self.metrics.rows_done(len(rows), sum("error" in r for r in answer))
        return {"results": answer}

    def _variant(self, body: Dict[str, Any]) -> Optional[Variant]:
        if "variant" in body:  # a name of endokern.variants (self-certainty, mean, loglik, ...), or gamma/terminal/reduce
            if any(k in body for k in ("gamma", "terminal", "reduce")):
                raise HTTPError(422, "give either 'variant' or gamma/terminal/reduce, not both")
            try:
                variant = parse_variant(body["variant"]) if isinstance(body["variant"], str) else None
            except ValueError as err:
                raise HTTPError(422, str(err)) from None
            if variant is None or variant.kind == "judge":
                raise HTTPError(422, "field 'variant' must name a one-pass variant (" +
                                ", ".join(n for n in VARIANT_NAMES if n != "judge") + ")")
            return variant
        if not any(k in body for k in ("gamma", "terminal", "reduce")):
            return None
        gamma = body.get("gamma", self.rm.gamma)
        terminal = body.get("terminal", self.rm.terminal)
        reduce = body.get("reduce", self.rm.reduce)
        if isinstance(gamma, bool):
            gamma = None
        try:
            check_reward(self.rm.alpha, gamma, terminal, reduce)
        except SettingsError as err:
            raise HTTPError(422, str(err)) from None
        return Variant("request", "reward", float(gamma), terminal, reduce)

    async def get_reward(self, body: Any) -> Dict[str, Any]:
        """OpenRLHF's remote reward model (one sample per request as a rule): ``labels`` and other fields it sends
        are accepted and not used; an unscorable sample is ``null`` with its reason in ``extra_logs.errors`` (with
        ``--strict``, the request is refused with 422)."""
        body = _object(body)
        queries, prompts = body.get("query"), body.get("prompts")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise HTTPError(422, "field 'query' must be a list of strings (prompt + response texts)")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise HTTPError(422, "field 'prompts' must be a list of strings (the prompt of each query)")
        if len(queries) != len(prompts):
            raise HTTPError(422, f"{len(queries)} queries but {len(prompts)} prompts")
        results = await self._queries(list(zip(queries, prompts)))
        rewards = [r.get("reward") for r in results]
        scores = [None if m is None else 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, m / self.options.score_scale))))
                  for m in (r.get("reward_mean") for r in results)]
        # extra_logs holds numbers only: OpenRLHF turns each of its values into a tensor
        return {"rewards": rewards, "scores": scores,
                "extra_logs": {"unscorable": [1.0 if "error" in r else 0.0 for r in results]},
                "errors": [r.get("error") for r in results]}

    async def reward(self, body: Any) -> Dict[str, Any]:
        """slime's remote reward model: one bare ``{"prompt", "response", "label"}`` object (``label`` and other
        fields are not used) -> ``{"reward", "reward_mean"}``, both ``null`` with ``error`` for an unscorable
        sample (``--strict``: 422)."""
        body = _object(body)
        prompt, response = body.get("prompt"), body.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise HTTPError(422, "fields 'prompt' and 'response' must be strings")
        (result,) = await self._queries([(prompt + response, prompt)])
        return {"reward": result.get("reward"), "reward_mean": result.get("reward_mean"),
                **({"error": result["error"]} if "error" in result else {})}

    async def _queries(self, pairs: List[Tuple[str, str]]) -> List[Dict[str, Any]]:
        """(query, prompt) texts, already rendered by the policy's side -> per pair ``{reward, reward_mean}`` or
        ``{error}``. The query is tokenized once (plain, the tokenizer's own special tokens) and split where its
        prompt ends, so the response is the tokens the policy produced, not a separate tokenization of its text."""
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self.encode_pool, self._query_rows, pairs)
        result = (await self._run(rows, self.plain_scorer)).per_row()
        fill = self.options.unscorable_reward
        out = [{"reward": r["reward"], "reward_mean": r["reward_mean"]} if "reason" not in r else
               {"error": r["reason"]} if fill is None else {"reward": fill, "reward_mean": fill, "error": r["reason"]}
               for r in result]
        errors = [(i, r["error"]) for i, r in enumerate(out) if "error" in r]
        self.metrics.rows_done(len(out), len(errors))
        for i, e in errors:
            self.log(f"endokern serve: a sample cannot be scored: {e}")
        if errors and self.options.strict:
            raise HTTPError(422, {"message": f"{len(errors)} of {len(out)} queries cannot be scored",
                                  "errors": [{"index": i, "error": e} for i, e in errors]})
        return out

    def _query_rows(self, pairs: List[Tuple[str, str]]) -> List[Any]:
        rows: List[Any] = []
        for query, prompt in pairs:
            try:
                row = query_row(self.rm.tokenizer, query, prompt, self.bos_text, self.joint)
                if self.settings.append_eos and "response_ids" in row:
                    row["response_ids"].append(self.rm.tokenizer.eos_token_id)
                rows.append(row)
            except ValueError as err:
                rows.append(RowProblem(str(err)))
        return rows

    def health(self) -> Dict[str, Any]:
        # the model's name, not where it lies on this machine: /health answers without the key
        model = os.path.basename(os.path.normpath(self.settings.model)) if os.path.exists(self.settings.model) \
            else self.settings.model
        return {"status": "ok", "model": model, "queue_tokens": self.batcher.queued_tokens,
                "queue_requests": self.batcher.queued_requests}

    def render_metrics(self) -> str:
        return self.metrics.render(self.batcher.queued_tokens, self.batcher.queued_requests)


class RowProblem(str):
    """A request's row that cannot be read, with the reason (it becomes that row's error)."""


def request_chunk(rows: Sequence[Any]) -> list:
    """A request's rows as a chunk of the row path (:func:`endokern.pipeline.rows_chunk`), with the rows JSON lets
    through but no answer can carry as errors in their places: a non-finite number as ``id`` (``1e999``, NaN)."""
    chunk = rows_chunk(rows)
    for i, row in enumerate(rows):
        if isinstance(row, RowProblem):
            chunk[i] = (InputRow(i, None, str(row)), None)
        elif isinstance(row, dict) and isinstance(row.get("id"), float) and not math.isfinite(row["id"]):
            chunk[i] = (InputRow(i, None, f"id {row['id']!r} is not a finite number; give a string or an integer"),
                        None)
    return chunk


def query_row(tokenizer, query: str, prompt: str, bos_text: Optional[str], joint: bool) -> Dict[str, Any]:
    """The row of a (query, prompt) pair whose texts the policy's side rendered: ``prompt_ids`` + ``response_ids``
    from one tokenization of the query, split after the last token that ends within the prompt (a token across the
    boundary belongs to the response); a query that does not start with its prompt (a truncated prompt) is split
    after the longest part of the prompt it starts with (the prompt's start, or its end when the prompt lost its
    first tokens). Without a fast tokenizer (no offsets), the texts are split and tokenized as
    ``template="plain"`` does. ValueError when the pair cannot be scored."""
    from .pipeline import not_unicode

    problem = not_unicode(query, "query") or not_unicode(prompt, "prompt")
    if problem:
        raise ValueError(problem)
    if query.startswith(prompt):
        split = len(prompt)
    else:  # a truncated prompt: the query keeps its start (longest common prefix) or its end (longest suffix of the
        # prompt the query starts with, as OpenRLHF keeps a long prompt's last tokens)
        suffix = next((len(prompt) - i for i in range(1, len(prompt)) if query.startswith(prompt[i:])), 0)
        split = max(len(os.path.commonprefix([query, prompt])), suffix)
    if split == 0 and prompt:
        raise ValueError("the query does not start with its prompt, nor with any part of it")
    # A rendered query that already begins with the BOS text gets the BOS from the tokenizer, not twice.
    if bos_text and query.startswith(bos_text) and split >= len(bos_text):
        query, split = query[len(bos_text):], split - len(bos_text)
    if not joint:
        return {"prompt": query[:split], "response": query[split:]}
    encoded = tokenizer(query, add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    cut = 0
    for k, (start, end) in enumerate(offsets):
        if end > split or (start == end and start >= split and k > 0):
            break
        cut = k + 1
    if cut == 0:
        raise ValueError("the prompt has no tokens (an empty prompt and a tokenizer that adds no BOS)")
    if cut == len(ids):
        raise ValueError("the response has no tokens")
    return {"prompt_ids": ids[:cut], "response_ids": ids[cut:]}


def _adds_bos(tokenizer) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]


def _object(body: Any) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(422, f"the body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------------------------------------ HTTP


def create_app(service: RewardService):
    """The FastAPI application over ``service`` (its scoring thread stops when the application shuts down)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn reaches here after the requests in flight have been answered
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="endokern", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    key = service.options.api_key.encode() if service.options.api_key else None
    limit = service.options.max_body_bytes

    def error(status: int, detail: Any, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.monotonic()
        path = request.url.path
        if key is not None and path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)):
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 {"WWW-Authenticate": "Bearer"})
                service.metrics.request(path, 401, time.monotonic() - start)
                return response
        response = await call_next(request)
        known = path in ("/score", "/get_reward", "/reward", "/health", "/metrics")
        service.metrics.request(path if known else "other", response.status_code, time.monotonic() - start)
        return response

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, f"the body has {length} bytes, more than --max-body-bytes {limit}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise HTTPError(413, f"the body is longer than --max-body-bytes {limit}")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"malformed JSON: {err}") from None
        except RecursionError:
            raise HTTPError(400, "malformed JSON: nested too deeply") from None

    async def until_disconnected(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    async def answer(request: Request, handler) -> JSONResponse:
        """Run ``handler`` on the body within ``--request-timeout`` (504 past it); a request whose client leaves is
        cancelled (its rows leave the queue) and answered 499; every 4xx and 5xx is logged with its reason."""
        try:
            body = await read_json(request)
        except HTTPError as err:
            body, response = None, error(err.status, err.detail, err.headers)
        if body is not None:
            response = await run(request, handler, body)
        if response.status_code >= 400:
            service.log(f"endokern serve: {request.method} {request.url.path} -> {response.status_code}: "
                        f"{response.body.decode(errors='replace')[:300]}")
        return response

    async def run(request: Request, handler, body: Any) -> JSONResponse:
        work = asyncio.ensure_future(handler(body))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=service.options.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                response = JSONResponse(work.result())
            elif gone in done:
                work.cancel()
                response = error(499, "the client closed the connection before its answer")
            else:
                work.cancel()
                response = error(504, f"no answer within --request-timeout {service.options.request_timeout:g} s "
                                      "(the server is busy: retry later, or send fewer rows)")
        except HTTPError as err:
            response = error(err.status, err.detail, err.headers)
        finally:
            gone.cancel()
        return response

    @app.post("/score")
    async def score(request: Request):
        return await answer(request, service.score)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await answer(request, service.get_reward)

    @app.post("/reward")
    async def reward(request: Request):
        return await answer(request, service.reward)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.render_metrics(), media_type="text/plain; version=0.0.4")

    return app


def listening_socket(host: str, port: int):
    """A bound, listening TCP socket (connections made as soon as its address is printed wait in the backlog)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on TCP sockets that say so; without it each answer's second
    # write waited for the client's delayed ACK (about 40 ms per request on a kept-alive connection)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(settings: ModelSettings, options: ServeOptions, log: Callable[[str], None] = print) -> None:
    """Load the model of ``settings`` and serve it until SIGTERM or SIGINT (see the module doc)."""

    import uvicorn

    if options.host not in LOOPBACK and not options.api_key:
        log(f"endokern serve: warning: listening on {options.host} with no API key; anyone who can reach it can use "
            f"it (set --api-key or ${API_KEY_ENV})")
    rm = EndoRM.from_settings(settings)
    service = RewardService(rm, settings, options, log=log)
    app = create_app(service)
    # Bind first, so --port 0 can print the port it got before clients are told where to go.
    sock = listening_socket(options.host, options.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=options.shutdown_grace)
    server = uvicorn.Server(config)
    log(f"endokern serve: {settings.model} on http://{options.host}:{port} (batch tokens {rm.batch_tokens}, "
        f"step tokens {service.batcher.step_tokens}, max wait {options.max_wait_ms:g} ms)")
    sys.stderr.flush()
    # uvicorn raises the signal that stopped it again once it has shut down; a quiet handler makes that a clean exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    log("endokern serve: stopped")


__all__ = ["Batcher", "HTTPError", "Metrics", "RewardService", "ServeOptions", "create_app", "listening_socket",
           "query_row", "serve"]
