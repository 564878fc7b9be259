"""The endogenous reward as slime's custom reward function.

slime (0.3) calls the function named by ``--custom-rm-path`` as ``await rm(args, sample)`` for one rollout, or
``await rm(args, samples)`` for a group with ``--group-rm``, and uses what it returns as ``sample.reward``::

    python train.py ... --custom-rm-path endokern.integrations.slime.endogenous_rm \\
        --rm-url http://127.0.0.1:8000            # an endokern serve server (or ENDOKERN_REWARD_URL)
    ENDOKERN_REWARD_MODEL=Qwen/Qwen2.5-Math-7B python train.py ... --custom-rm-path endokern.integrations.slime.endogenous_rm

:func:`endogenous_rm` scores the tokens the policy produced: slime's ``sample.tokens`` are the prompt's ids followed
by the ``sample.response_length`` response ids, scored as they are (``/score`` id rows on a server; a local model
scores the rows of concurrent calls together). A sample without tokens is scored by its text (``prompt`` a string or
a list of messages, then ``response``). It returns the endogenous reward (a float), or, when slime's
``--reward-key`` is set, ``{"reward", "reward_mean", "logprob", "num_tokens"}`` for it to pick from.

Options, from the environment: ``ENDOKERN_REWARD_URL`` (else slime's ``--rm-url``, its base URL) or
``ENDOKERN_REWARD_MODEL`` (``ENDOKERN_REWARD_DEVICE``, ``ENDOKERN_REWARD_DTYPE``, ``ENDOKERN_REWARD_MAX_LENGTH``);
``ENDOKERN_API_KEY``; ``ENDOKERN_UNSCORABLE_REWARD``: the reward of a sample that cannot be scored (without it that
raises, with the reason).

slime's built-in remote reward model (``--rm-type remote_rm --rm-url http://HOST:PORT/reward``) needs no code:
``endokern serve``'s ``/reward`` answers its one bare ``{"prompt", "response", "label"}`` object with ``{"reward",
"reward_mean"}`` (a dict, so slime needs ``--reward-key reward``); it scores the text, not the tokens.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, List, Optional, Union

from .trl import EndogenousReward

__all__ = ["endogenous_rm", "sample_row"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: Dict[tuple, EndogenousReward] = {}


async def endogenous_rm(args: Any, sample: Any, **kwargs: Any) -> Union[float, Dict[str, Any], List[Any]]:
    """slime's custom reward: the endogenous reward of ``sample`` (or of each of a list of samples)."""
    samples = list(sample) if isinstance(sample, (list, tuple)) else [sample]
    client = _client(args)
    results = await client.async_score_rows([sample_row(s) for s in samples])
    key = getattr(args, "reward_key", None)
    out = [_reward(result, key) for result in results]
    return out if isinstance(sample, (list, tuple)) else out[0]


def sample_row(sample: Any) -> Dict[str, Any]:
    """The ``endokern score`` row of a slime ``Sample``: ``prompt_ids`` + ``response_ids`` from ``tokens`` and
    ``response_length``, else its text."""
    tokens = list(getattr(sample, "tokens", None) or [])
    length = int(getattr(sample, "response_length", 0) or 0)
    if tokens and 0 < length <= len(tokens):
        return {"prompt_ids": [int(t) for t in tokens[: len(tokens) - length]],
                "response_ids": [int(t) for t in tokens[len(tokens) - length:]]}
    prompt, response = getattr(sample, "prompt", ""), getattr(sample, "response", "")
    if isinstance(prompt, list):
        return {"messages": [dict(m) for m in prompt] + [{"role": "assistant", "content": response}]}
    return {"prompt": prompt, "response": response}


def _reward(result: Dict[str, Any], key: Optional[str]) -> Union[float, Dict[str, Any]]:
    if "error" in result:
        fill = os.environ.get("ENDOKERN_UNSCORABLE_REWARD")
        if fill in (None, ""):
            raise RuntimeError(f"endogenous reward: the sample cannot be scored: {result['error']} (set "
                               "ENDOKERN_UNSCORABLE_REWARD to give such samples a fixed reward)")
        logger.warning("endogenous reward: a sample cannot be scored (reward %s): %s", fill, result["error"])
        value = float(fill)
        return {"reward": value, "reward_mean": value, "logprob": None, "num_tokens": 0} if key else value
    if key:
        return {k: result[k] for k in ("reward", "reward_mean", "logprob", "num_tokens")}
    return float(result["reward"])


def _client(args: Any) -> EndogenousReward:
    url = os.environ.get("ENDOKERN_REWARD_URL")
    model = os.environ.get("ENDOKERN_REWARD_MODEL")
    if not url and not model and getattr(args, "rm_url", None):
        url = str(args.rm_url).rstrip("/")
        for tail in ("/reward", "/score", "/get_reward"):
            url = url[: -len(tail)] if url.endswith(tail) else url
    if bool(url) == bool(model):
        raise RuntimeError("set ENDOKERN_REWARD_URL or slime's --rm-url (an endokern serve server), or "
                           "ENDOKERN_REWARD_MODEL (a local model), for endokern's slime reward")
    key = ("url", url.rstrip("/")) if url else ("model", model)
    with _lock:
        if key not in _clients:
            if url:
                _clients[key] = EndogenousReward(url=url, api_key=os.environ.get("ENDOKERN_API_KEY") or None)
            else:
                from ..model import EndoRM

                max_length = os.environ.get("ENDOKERN_REWARD_MAX_LENGTH")
                rm = EndoRM.from_pretrained(model, device=os.environ.get("ENDOKERN_REWARD_DEVICE") or None,
                                            dtype=os.environ.get("ENDOKERN_REWARD_DTYPE") or None)
                _clients[key] = EndogenousReward(rm, max_length=int(max_length) if max_length else None)
        return _clients[key]
