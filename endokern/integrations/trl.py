"""The endogenous reward as a reward function for TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float]``,
with strings (standard format) or lists of ``{role, content}`` messages (conversational format: the completion is
the assistant's turn). :class:`EndogenousReward` scores each (prompt, completion) with a local
:class:`endokern.EndoRM` or with an ``endokern serve`` server (``url``), through the same rows, tokenization and
checks as ``endokern score``. TRL itself is not imported here::

    from trl import GRPOConfig, GRPOTrainer
    from endokern.integrations.trl import EndogenousReward

    reward = EndogenousReward.from_pretrained("Qwen/Qwen2.5-Math-7B", reduce="mean")   # in process
    reward = EndogenousReward(url="http://127.0.0.1:8000", api_key="...")              # or a server
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts)

A completion that cannot be scored (an empty one under the plain template, one longer than ``max_length``) gets
``None``, which TRL turns into NaN and leaves out of its reward sums; the reason is logged once per distinct reason.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

# Statuses worth retrying: the server's queue is full (503) or a proxy in front of it failed.
RETRY_STATUSES = (502, 503, 504)


class EndogenousReward:
    """A TRL reward function: the endogenous reward of each completion (see the module doc).

    ``rm``: a local :class:`endokern.EndoRM`; or ``url``: an ``endokern serve`` server (``api_key``: its bearer key;
    ``timeout`` seconds per request, ``retries`` more tries on connection errors and 502/503/504, waiting
    ``Retry-After`` or ``backoff * 2**try`` seconds). ``template``, ``system``, ``append_eos``, ``max_length``: the
    text options of ``endokern score`` (local only; a server has its own). ``gamma``, ``terminal``, ``reduce``: a
    reward variant (endokern/reward.py) instead of the model's own options, from the same forward pass. ``name``: the
    ``__name__`` TRL shows in its logs.
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
    ):
        from ..pipeline import RowScorer, ScoreTask
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
        self.options = {k: v for k, v in (("gamma", gamma), ("terminal", terminal), ("reduce", reduce)) if v is not None}
        self.scorer = None
        if rm is not None:
            variant = None
            if self.options:
                g, t, r = self.options.get("gamma", rm.gamma), self.options.get("terminal", rm.terminal), \
                    self.options.get("reduce", rm.reduce)
                check_reward(rm.alpha, g, t, r)
                variant = Variant("trl", "reward", float(g), t, r)
            self.scorer = RowScorer(rm, ScoreTask(variant=variant, alpha=rm.alpha), template=template, system=system,
                                    append_eos=append_eos, max_length=max_length)
        elif (template, system, append_eos, max_length) != ("auto", None, False, None):
            raise ValueError("template, system, append_eos and max_length are the server's own options "
                             "(endokern serve --template ...); leave them out with url")
        self._reported: set = set()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None, batch_tokens: Optional[int] = None,
                        **kwargs) -> "EndogenousReward":
        """Load ``name_or_path`` as an :class:`endokern.EndoRM` (its default options) and wrap it; ``kwargs`` are
        this class's options."""
        from ..model import EndoRM

        return cls(EndoRM.from_pretrained(name_or_path, device=device, dtype=dtype, batch_tokens=batch_tokens),
                   **kwargs)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> List[Optional[float]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [trl_row(p, c) for p, c in zip(prompts, completions)]
        results = self._score_local(rows) if self.rm is not None else self._score_remote(rows)
        rewards: List[Optional[float]] = []
        for result in results:
            if "error" in result:
                if result["error"] not in self._reported:
                    self._reported.add(result["error"])
                    logger.warning("endogenous reward: a completion cannot be scored (reward None): %s", result["error"])
                rewards.append(None)
            else:
                rewards.append(float(result["reward"]))
        return rewards

    # ------------------------------------------------------------------------------------------------ local

    def _score_local(self, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [{"error": r["reason"]} if "reason" in r else r for r in self.scorer.score_rows(rows)]

    # ------------------------------------------------------------------------------------------------ remote

    def _score_remote(self, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        answer = post_json(f"{self.url}/score", {"rows": rows, **self.options}, api_key=self.api_key,
                           timeout=self.timeout, retries=self.retries, backoff=self.backoff)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(rows):
            raise RuntimeError(f"{self.url}/score answered without one result per row: {str(answer)[:200]}")
        return results


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
