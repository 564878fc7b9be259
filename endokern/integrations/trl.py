"""The endogenous reward as a reward function for TRL's ``GRPOTrainer`` and ``RLOOTrainer``, and the scoring client
the other RL integrations (verl, OpenRLHF, slime) share.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., log_metric=..., **columns) ->
list[float]``, with strings (standard format) or lists of ``{role, content}`` messages (conversational format: the
completion is the assistant's turn). :class:`EndogenousReward` scores each completion with a local
:class:`endokern.EndoRM` or with an ``endokern serve`` server (``url``), through the same rows, tokenization and checks
as ``endokern score``. TRL itself is not imported here::

    from trl import GRPOConfig, GRPOTrainer
    from endokern.integrations.trl import EndogenousReward, async_endogenous_reward

    reward = EndogenousReward.from_pretrained("Qwen/Qwen2.5-Math-7B", reduce="mean")   # in process
    reward = async_endogenous_reward("http://127.0.0.1:8000", api_key="...")            # or a server, async
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts)

When TRL passes ``completion_ids`` (the tokens the policy sampled), those are scored as they are, after the prompt
as TRL tokenized it for the policy: a standard-format prompt by the reward's template (``template="plain"``: the
tokenizer's own special tokens, as TRL does), a conversation by the tokenizer's chat template with the generation
prompt, so a template that pre-fills the assistant turn (``<think>``) is scored as the policy saw it. Give
``completion_ids=False`` when the reward model's tokenizer is not the policy's: the text is scored instead.

``async_endogenous_reward`` (and :meth:`EndogenousReward.as_async`) is a plain ``async def``: TRL runs it on its
own event loop, concurrently with the other async rewards, instead of blocking the step. When TRL passes
``log_metric``, the per-token statistics of the step's completions are logged under ``endogenous/...``.

A completion that cannot be scored (an empty one under the plain template, one longer than ``max_length``, an id
outside the vocabulary) gets ``None``, which TRL turns into NaN and leaves out of its reward sums; the reason is
logged once per distinct reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["EndogenousReward", "RETRY_STATUSES", "async_endogenous_reward", "post_json", "trl_row"]

logger = logging.getLogger(__name__)

# Statuses worth retrying: the server's queue is full (503) or a proxy in front of it failed.
RETRY_STATUSES = (502, 503, 504)
METRIC_PREFIX = "endogenous/"


class EndogenousReward:
    """A TRL reward function: the endogenous reward of each completion (see the module doc), and the scoring client
    of the other integrations (:meth:`score_rows`).

    ``rm``: a local :class:`endokern.EndoRM`; or ``url``: an ``endokern serve`` server (``api_key``: its bearer key;
    ``timeout`` seconds per request, ``retries`` more tries on connection errors and 502/503/504, waiting
    ``Retry-After`` or ``backoff * 2**try`` seconds). ``template``, ``system``, ``append_eos``, ``max_length``: the
    text options of ``endokern score`` (local only; a server has its own). ``gamma``, ``terminal``, ``reduce``: a
    reward variant (endokern/reward.py) instead of the model's own options, from the same forward pass. ``name``: the
    ``__name__`` TRL shows in its logs. ``completion_ids``: score TRL's ``completion_ids`` when it passes them (set
    False when the reward model's tokenizer is not the policy's). ``tokenizer``: with ``url``, the policy's tokenizer
    (an object or a name for ``AutoTokenizer``), which renders conversational prompts for ``completion_ids``; without
    it a conversation is scored as text. ``chat_template_kwargs``: what TRL's config passes to the chat template
    (``enable_thinking=False`` ...). ``token_metrics``: log the per-token statistics through TRL's ``log_metric``.
    """

    def __init__(
        self,
        rm=None,
        *,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        template: str = "auto",
        system: Optional[str] = None,
        append_eos: bool = False,
        max_length: Optional[int] = None,
        gamma: Optional[float] = None,
        terminal: Optional[str] = None,
        reduce: Optional[str] = None,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        name: str = "endogenous_reward",
        completion_ids: bool = True,
        tokenizer: Any = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        token_metrics: bool = True,
    ):
        from ..settings import check_reward
        from ..variants import Variant

        if (rm is None) == (url is None):
            raise ValueError("give either rm (a local EndoRM) or url (an endokern serve server)")
        if retries < 0 or timeout <= 0:
            raise ValueError("need retries >= 0 and timeout > 0")
        self.rm = rm
        self.url = url.rstrip("/") if url else None
        self.api_key = api_key
        self.max_length = max_length
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.__name__ = name
        self.use_completion_ids = completion_ids
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.token_metrics = token_metrics
        self.options = {k: v for k, v in (("gamma", gamma), ("terminal", terminal), ("reduce", reduce)) if v is not None}
        self._text = dict(template=template, system=system, append_eos=append_eos, max_length=max_length)
        self._scorers: Dict[bool, Any] = {}
        self._variant = None
        if rm is not None:
            if tokenizer is not None:
                raise ValueError("tokenizer is the server's client option; a local model has its own")
            self.tokenizer = rm.tokenizer
            if self.options:
                g, t, r = self.options.get("gamma", rm.gamma), self.options.get("terminal", rm.terminal), \
                    self.options.get("reduce", rm.reduce)
                check_reward(rm.alpha, g, t, r)
                self._variant = Variant("trl", "reward", float(g), t, r)
            self._scorer(False)  # checks the template now
        else:
            if (template, system, append_eos, max_length) != ("auto", None, False, None):
                raise ValueError("template, system, append_eos and max_length are the server's own options "
                                 "(endokern serve --template ...); leave them out with url")
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            self.tokenizer = tokenizer
        self._coalesce = _Coalescer(self._score_batch)
        self._reported: set = set()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None, batch_tokens: Optional[int] = None,
                        **kwargs) -> "EndogenousReward":
        """Load ``name_or_path`` as an :class:`endokern.EndoRM` (its default options) and wrap it; ``kwargs`` are
        this class's options."""
        from ..model import EndoRM

        return cls(EndoRM.from_pretrained(name_or_path, device=device, dtype=dtype, batch_tokens=batch_tokens),
                   **kwargs)

    # ------------------------------------------------------------------------------------------------ TRL

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Optional[Sequence] = None,
                 log_metric: Optional[Callable[[str, float], None]] = None, **kwargs: Any) -> List[Optional[float]]:
        rows = self.rows(prompts, completions, completion_ids)
        results = self.score_rows(rows, per_token=self._wants_tokens(log_metric))
        return self._finish(results, log_metric)

    def as_async(self) -> Callable[..., Any]:
        """This reward as a plain ``async def`` (TRL runs those concurrently on its own event loop); the scoring
        itself runs in a worker thread, so the event loop is never blocked."""

        async def endogenous_reward(prompts, completions, completion_ids=None, log_metric=None, **kwargs):
            rows = self.rows(prompts, completions, completion_ids)
            results = await asyncio.to_thread(self.score_rows, rows, per_token=self._wants_tokens(log_metric))
            return self._finish(results, log_metric)

        endogenous_reward.__name__ = endogenous_reward.__qualname__ = self.__name__
        endogenous_reward.reward = self
        return endogenous_reward

    def rows(self, prompts: Sequence[Any], completions: Sequence[Any],
             completion_ids: Optional[Sequence[Sequence[int]]] = None) -> List[Dict[str, Any]]:
        """The ``endokern score`` rows of TRL's arguments: token-id rows when ``completion_ids`` are given and used,
        else text rows (:func:`trl_row`)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if completion_ids is None or not self.use_completion_ids:
            return [trl_row(p, c) for p, c in zip(prompts, completions)]
        if len(completion_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_ids)} completion_ids")
        rows = []
        for prompt, completion, ids in zip(prompts, completions, completion_ids):
            ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
            if isinstance(prompt, str):
                rows.append({"prompt": prompt, "response_ids": ids})
            elif self.tokenizer is not None:
                rows.append({"prompt_ids": self._chat_prompt_ids(prompt), "response_ids": ids})
            else:
                self._report("a conversation with completion_ids needs the policy's tokenizer "
                             "(EndogenousReward(url=..., tokenizer=...)); scoring its text instead")
                rows.append(trl_row(prompt, completion))
        return rows

    def _chat_prompt_ids(self, prompt: Sequence[Mapping[str, Any]]) -> List[int]:
        rendered = self.tokenizer.apply_chat_template([dict(m) for m in prompt], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True, **self.chat_template_kwargs)
        ids = rendered["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _wants_tokens(self, log_metric) -> bool:
        return self.token_metrics and log_metric is not None

    def _finish(self, results: List[Dict[str, Any]], log_metric) -> List[Optional[float]]:
        rewards: List[Optional[float]] = []
        for result in results:
            if "error" in result:
                self._report(f"a completion cannot be scored (reward None): {result['error']}")
                rewards.append(None)
            else:
                rewards.append(float(result["reward"]))
        if log_metric is not None:
            for name, value in token_statistics(results).items():
                log_metric(METRIC_PREFIX + name, value)
        return rewards

    def _report(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            logger.warning("endogenous reward: %s", message)

    # ------------------------------------------------------------------------------------------------ rows

    def score_rows(self, rows: Sequence[Dict[str, Any]], *, per_token: bool = False) -> List[Dict[str, Any]]:
        """``endokern score`` rows (text or token ids) -> one result per row: ``reward``, ``reward_mean``,
        ``logprob``, ``num_tokens`` (and ``token_rewards``, ``token_logprobs`` with ``per_token``), or ``error`` with
        the reason. Safe from many threads at once: a local model scores the rows of concurrent callers together."""
        rows = list(rows)
        if not rows:
            return []
        if self.rm is not None:
            return self._coalesce(per_token, rows)
        return self._score_remote(rows, per_token)

    async def async_score_rows(self, rows: Sequence[Dict[str, Any]], *, per_token: bool = False) -> List[Dict[str, Any]]:
        """:meth:`score_rows` from a coroutine, in a worker thread."""
        return await asyncio.to_thread(self.score_rows, rows, per_token=per_token)

    # ------------------------------------------------------------------------------------------------ local

    def _scorer(self, per_token: bool):
        from ..pipeline import RowScorer, ScoreTask

        if per_token not in self._scorers:
            self._scorers[per_token] = RowScorer(self.rm, ScoreTask(per_token, self._variant, self.rm.alpha),
                                                 **self._text)
        return self._scorers[per_token]

    def _score_batch(self, per_token: bool, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        results = self._scorer(per_token).score_rows(rows)
        return [{"error": r["reason"]} if "reason" in r else r for r in results]

    # ------------------------------------------------------------------------------------------------ remote

    def _score_remote(self, rows: List[Dict[str, Any]], per_token: bool = False) -> List[Dict[str, Any]]:
        body: Dict[str, Any] = {"rows": rows, **self.options}
        if per_token:
            body["per_token"] = True
        answer = post_json(f"{self.url}/score", body, api_key=self.api_key, timeout=self.timeout,
                           retries=self.retries, backoff=self.backoff)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(rows):
            raise RuntimeError(f"{self.url}/score answered without one result per row: {str(answer)[:200]}")
        return results


def async_endogenous_reward(url: Optional[str] = None, rm=None, **options: Any) -> Callable[..., Any]:
    """A plain ``async def`` TRL reward (``inspect.iscoroutinefunction`` is true for it): an ``endokern serve``
    server at ``url`` (or a local ``rm``), with :class:`EndogenousReward`'s ``options``."""
    return EndogenousReward(rm, url=url, **options).as_async()


def token_statistics(results: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Statistics of one step's scored completions: the per-token reward (mean over every token, spread, lowest),
    the mean token log-probability (``logprob / num_tokens``: ``alpha`` times the log-probability), the mean length,
    and the share of completions that could not be scored."""
    scored = [r for r in results if "error" not in r]
    out: Dict[str, float] = {"unscorable_fraction": (len(results) - len(scored)) / max(len(results), 1)}
    tokens = sum(int(r["num_tokens"]) for r in scored)
    if not tokens:
        return out
    out["num_tokens_mean"] = tokens / len(scored)
    out["token_logprob_mean"] = sum(float(r["logprob"]) for r in scored) / tokens
    per_token = [float(x) for r in scored for x in (r.get("token_rewards") or ())]
    if per_token:
        mean = sum(per_token) / len(per_token)
        out["token_reward_mean"] = mean
        out["token_reward_std"] = math.sqrt(sum((x - mean) ** 2 for x in per_token) / len(per_token))
        out["token_reward_min"] = min(per_token)
    return out


class _Coalescer:
    """Runs ``fn(key, rows)`` for the rows of concurrent callers together: a caller queues its rows, waits for its
    turn, and the one whose turn comes scores every queued row of its key at once (one model call per key)."""

    def __init__(self, fn: Callable[[Any, List[Dict[str, Any]]], List[Dict[str, Any]]]):
        self.fn = fn
        self._mutex = threading.Lock()
        self._turn = threading.Lock()
        self._pending: List[Dict[str, Any]] = []

    def __call__(self, key: Any, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        slot: Dict[str, Any] = {"key": key, "rows": rows}
        with self._mutex:
            self._pending.append(slot)
        with self._turn:
            if "results" not in slot and "error" not in slot:
                with self._mutex:
                    batch = [s for s in self._pending if s["key"] == key]
                    self._pending = [s for s in self._pending if s["key"] != key]
                try:
                    results = self.fn(key, [row for s in batch for row in s["rows"]])
                    start = 0
                    for s in batch:
                        s["results"] = results[start:start + len(s["rows"])]
                        start += len(s["rows"])
                except BaseException as err:  # every waiting caller gets the failure, not only this one
                    for s in batch:
                        s["error"] = err
        if "error" in slot:
            raise slot["error"]
        return slot["results"]


Message = Mapping[str, Any]


def trl_row(prompt: Union[str, Sequence[Message]], completion: Union[str, Sequence[Message]]) -> Dict[str, Any]:
    """One ``endokern score`` row from a TRL (prompt, completion): strings -> ``prompt`` + ``response``;
    conversations -> ``messages`` (the prompt's turns, then the completion's, whose last is the assistant's)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    if isinstance(prompt, str) or isinstance(completion, str):
        raise TypeError("prompt and completion must both be strings (standard format) or both lists of messages "
                        "(conversational format)")
    return {"messages": [dict(m) for m in prompt] + [dict(m) for m in completion]}


def post_json(url: str, body: Dict[str, Any], *, api_key: Optional[str] = None, timeout: float = 300.0,
              retries: int = 3, backoff: float = 0.5) -> Any:
    """POST ``body`` as JSON and return the decoded answer; retry connection errors and 502/503/504 (waiting the
    server's ``Retry-After`` when it gives one), raise at once on any other error status with the server's reason."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if err.code not in RETRY_STATUSES or attempt == retries:
                raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from None
            wait = _retry_after(err.headers.get("Retry-After"), backoff * 2 ** attempt)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            if attempt == retries:
                raise RuntimeError(f"{url}: {getattr(err, 'reason', err)} (after {retries + 1} tries)") from None
            wait = backoff * 2 ** attempt
        time.sleep(wait)
    raise AssertionError("unreachable")


def _retry_after(value: Optional[str], default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default
