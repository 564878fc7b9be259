"""The endogenous reward as OpenRLHF's in-process reward function: this file is a ``reward_func`` file.

OpenRLHF (0.11) takes a Python file in place of a reward server's URL and calls its
``reward_func(queries, prompts, labels)`` once per sample, in a worker thread of its rollout engine::

    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url "$(python -m endokern.integrations.openrlhf)"

(``python -m endokern.integrations.openrlhf`` prints this file's path.) It is set up by environment variables, which
the Ray job must carry (``--runtime-env-json='{"env_vars": {...}}'``):

- ``ENDOKERN_REWARD_URL``: an ``endokern serve`` server (its ``/get_reward``; ``ENDOKERN_API_KEY``: its key), or
- ``ENDOKERN_REWARD_MODEL``: a model to load in each rollout worker (``ENDOKERN_REWARD_DEVICE``,
  ``ENDOKERN_REWARD_DTYPE``, ``ENDOKERN_REWARD_MAX_LENGTH``); the samples of concurrent calls are scored together;
- ``ENDOKERN_SCORE_SCALE`` (default 1; a server uses its own ``--score-scale``): ``scores = sigmoid(reward_mean /
  scale)``, in (0, 1) as OpenRLHF's dynamic filtering expects; ``rewards`` are the raw endogenous rewards (summed over the response);
- ``ENDOKERN_UNSCORABLE_REWARD``: the reward (and score) of a sample that cannot be scored; without it such a
  sample's reward is ``None`` and the reason is logged as a warning.

Both ways score the same tokens: the query (prompt + response text, as OpenRLHF decoded it) is tokenized once and
split where its prompt ends (at the longest common prefix when OpenRLHF truncated the prompt), so the response is
the tokens the policy produced; with a server this is ``/get_reward``'s own rule, locally the same function.

OpenRLHF turns every value of ``extra_logs`` into a tensor, so only numbers go there: ``endokern_unscorable`` (0 or 1)
and, with a local model, ``endokern_reward_mean`` and ``endokern_num_tokens`` (NaN and 0 for an unscorable sample). Note that OpenRLHF
0.11's experience maker needs a number for every sample: a ``None`` reward stops its step, so set
``ENDOKERN_UNSCORABLE_REWARD`` for long runs.
"""

import logging
import math
import os
import threading
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger("endokern.integrations.openrlhf")

__all__ = ["reward_func", "score_of"]

_lock = threading.Lock()
_state: Dict[str, Any] = {}


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Optional[Sequence[Any]] = None,
                **kwargs: Any) -> Dict[str, Any]:
    """OpenRLHF's reward function: ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``, one entry per query
    (``labels`` are not used)."""
    queries, prompts = list(queries), list(prompts)
    if len(queries) != len(prompts):
        raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
    scale = float(os.environ.get("ENDOKERN_SCORE_SCALE") or 1.0)
    fill = os.environ.get("ENDOKERN_UNSCORABLE_REWARD")
    fill = float(fill) if fill not in (None, "") else None
    results = _score(queries, prompts)
    local = not os.environ.get("ENDOKERN_REWARD_URL")
    rewards: List[Optional[float]] = []
    scores: List[Optional[float]] = []
    logs: Dict[str, List[float]] = {"endokern_unscorable": []}
    if local:
        logs.update(endokern_reward_mean=[], endokern_num_tokens=[])
    for result in results:
        bad = "error" in result
        if bad:
            logger.warning("endogenous reward: a sample cannot be scored (reward %s): %s", fill, result["error"])
            rewards.append(fill)
            scores.append(fill)
        else:
            rewards.append(float(result["reward"]))
            scores.append(float(result["score"]) if "score" in result else score_of(result["reward_mean"], scale))
        logs["endokern_unscorable"].append(float(bad))
        if local:
            logs["endokern_reward_mean"].append(float("nan") if bad else float(result["reward_mean"]))
            logs["endokern_num_tokens"].append(0.0 if bad else float(result["num_tokens"]))
    return {"rewards": rewards, "scores": scores, "extra_logs": logs}


def score_of(reward_mean: float, scale: float = 1.0) -> float:
    """``sigmoid(reward_mean / scale)``, the bounded score of ``endokern serve --score-scale``."""
    x = max(-700.0, min(700.0, float(reward_mean) / scale))
    return 1.0 / (1.0 + math.exp(-x))


def _score(queries: List[str], prompts: List[str]) -> List[Dict[str, Any]]:
    url = os.environ.get("ENDOKERN_REWARD_URL")
    model = os.environ.get("ENDOKERN_REWARD_MODEL")
    if bool(url) == bool(model):
        raise RuntimeError("set ENDOKERN_REWARD_URL (an endokern serve server) or ENDOKERN_REWARD_MODEL (a local "
                           "model) for endokern's OpenRLHF reward_func, not both")
    if url:
        return _score_remote(url.rstrip("/"), queries, prompts)
    return _score_local(model, queries, prompts)


def _score_remote(url: str, queries: List[str], prompts: List[str]) -> List[Dict[str, Any]]:
    from endokern.integrations.trl import post_json

    body = post_json(f"{url}/get_reward", {"query": queries, "prompts": prompts},
                     api_key=os.environ.get("ENDOKERN_API_KEY") or None,
                     timeout=float(os.environ.get("ENDOKERN_REWARD_TIMEOUT") or 300.0))
    rewards, scores = body.get("rewards"), body.get("scores")
    errors = body.get("errors") or [None] * len(queries)
    if not isinstance(rewards, list) or len(rewards) != len(queries):
        raise RuntimeError(f"{url}/get_reward answered without one reward per query: {str(body)[:200]}")
    out = []
    for i, reward in enumerate(rewards):
        if reward is None:
            out.append({"error": errors[i] or "the server gave no reward"})
        else:  # the server's score is sigmoid(reward_mean / its --score-scale)
            out.append({"reward": reward, "score": scores[i]})
    return out


def _score_local(model: str, queries: List[str], prompts: List[str]) -> List[Dict[str, Any]]:
    from endokern.integrations.trl import EndogenousReward
    from endokern.serve import query_row

    with _lock:
        if _state.get("model") != model:
            from endokern.model import EndoRM

            max_length = os.environ.get("ENDOKERN_REWARD_MAX_LENGTH")
            rm = EndoRM.from_pretrained(model, device=os.environ.get("ENDOKERN_REWARD_DEVICE") or None,
                                        dtype=os.environ.get("ENDOKERN_REWARD_DTYPE") or None)
            tokenizer = rm.tokenizer
            bos_id = getattr(tokenizer, "bos_token_id", None)
            adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
            _state.update(model=model, tokenizer=tokenizer, bos_text=tokenizer.bos_token if adds_bos else None,
                          joint=bool(getattr(tokenizer, "is_fast", False)),
                          client=EndogenousReward(rm, template="plain",
                                                  max_length=int(max_length) if max_length else None))
        state = dict(_state)
    rows: List[Any] = []
    problems: Dict[int, str] = {}
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        try:
            rows.append(query_row(state["tokenizer"], query, prompt, state["bos_text"], state["joint"]))
        except ValueError as err:
            problems[i] = str(err)
    results = iter(state["client"].score_rows(rows) if rows else [])
    return [{"error": problems[i]} if i in problems else next(results) for i in range(len(queries))]


if __name__ == "__main__":
    print(os.path.abspath(__file__))
