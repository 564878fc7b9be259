"""The endogenous reward inside verl: a reward manager that scores each rollout's token ids, and an async
``compute_score`` for verl's reward-function path.

verl (0.9) computes rewards in its reward loop: a reward-manager class (base
``verl.experimental.reward_loop.reward_manager.base.RewardManagerBase``) whose async ``run_single`` gets one rollout
as a ``DataProto`` (``prompts``, ``responses``, ``attention_mask``) and returns ``{"reward_score",
"reward_extra_info"}``. verl loads a class outside its registry from the config::

    reward.reward_manager.source=importlib
    reward.reward_manager.name=EndogenousRewardManager
    reward.reward_manager.module.path=pkg://endokern.integrations.verl
    +reward.reward_kwargs.url=http://127.0.0.1:8000          # an endokern serve server; or, in each reward worker:
    +reward.reward_kwargs.model=Qwen/Qwen2.5-Math-7B          # a local model (with reward.num_workers=1)

:class:`EndogenousRewardManager` scores the prompt and response **token ids** the policy produced, as they are (no
decoding, no template, no second tokenization): through ``endokern serve``'s ``/score`` id rows, or a local
:class:`endokern.EndoRM` (the rows of concurrent ``run_single`` calls are scored together). Its options, under
``reward.reward_kwargs`` (each also read from ``ENDOKERN_REWARD_<NAME>`` in the worker's environment): ``url``,
``api_key`` (else ``ENDOKERN_API_KEY``), ``model``, ``device``, ``dtype``, ``batch_tokens``, ``max_length``,
``gamma``, ``terminal``, ``reduce``, ``per_token``, ``timeout``, ``unscorable_reward``.

With ``per_token=true`` each response token gets its own endogenous reward (a process reward): where verl assembles
the batch's reward tensor itself (:meth:`EndogenousRewardManager.assemble_rm_scores`, its colocated reward path),
token ``h``'s reward is placed at response position ``h``; verl's streaming agent-loop path places one number per
sequence at its last token, and gets the sequence reward there. A rollout that cannot be scored (longer than
``max_length``, an id outside the vocabulary, an empty response) raises with the reason unless
``unscorable_reward`` is set, which it then gets (with ``endokern_unscorable`` = 1 in the extra info).

:func:`compute_score` is verl's other way in, a reward *function* (``reward.custom_reward_function``): it gets the
decoded response only, so the prompt must come from the sample's ``extra_info`` (key ``prompt_key``, default
``prompt``); it posts the text to a server and returns ``{"score", "reward_mean", "num_tokens"}``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from .trl import EndogenousReward

__all__ = ["EndogenousRewardManager", "SequenceReward", "compute_score", "manager_options", "rollout_row"]

logger = logging.getLogger(__name__)

OPTIONS = ("url", "api_key", "model", "device", "dtype", "batch_tokens", "max_length", "gamma", "terminal", "reduce",
           "per_token", "timeout", "unscorable_reward")
EXTRA_KEYS = ("endokern_reward_mean", "endokern_logprob", "endokern_num_tokens", "endokern_unscorable")
# One client per option set and process: a reward worker makes one manager, tests make many.
_CLIENTS: Dict[tuple, EndogenousReward] = {}


class SequenceReward(float):
    """A sequence's reward (the number verl sums and places) that also carries its per-token rewards, so that
    :meth:`EndogenousRewardManager.assemble_rm_scores` can place them token by token. Pickles as itself (verl sends
    it between Ray actors)."""

    def __new__(cls, value: float, token_rewards: Optional[Sequence[float]] = None):
        obj = super().__new__(cls, value)
        obj.token_rewards = None if token_rewards is None else tuple(float(x) for x in token_rewards)
        return obj

    def __reduce__(self):
        return (SequenceReward, (float(self), self.token_rewards))


class EndogenousRewardManager(RewardManagerBase):
    """verl's reward manager of the endogenous reward (see the module doc). ``config``: verl's trainer config (its
    options under ``config.reward.reward_kwargs``); ``tokenizer`` and ``compute_score`` are verl's and not used
    (the rollout's ids are scored as they are); ``options`` override the config's (for use outside verl)."""

    def __init__(self, config, tokenizer=None, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None, **options: Any):
        super().__init__(config, tokenizer, compute_score)
        self.options = manager_options(config, options)
        self.per_token = _flag(self.options.get("per_token", False))
        fill = self.options.get("unscorable_reward")
        self.unscorable_reward = None if fill in (None, "") else float(fill)
        self.client = _client(self.options)

    async def run_single(self, data: DataProto) -> dict:
        """One rollout (the last sequence of a multi-sequence trajectory) -> ``{"reward_score",
        "reward_extra_info"}``."""
        row = rollout_row(data)
        (result,) = await self.client.async_score_rows([row], per_token=self.per_token)
        if "error" in result:
            if self.unscorable_reward is None:
                raise RuntimeError(f"endogenous reward: the rollout cannot be scored: {result['error']} (set "
                                   "reward.reward_kwargs.unscorable_reward to give such rollouts a fixed reward)")
            logger.warning("endogenous reward: a rollout cannot be scored (reward %s): %s", self.unscorable_reward,
                           result["error"])
            info = dict(zip(EXTRA_KEYS, (float("nan"), float("nan"), 0, 1)))
            return {"reward_score": SequenceReward(self.unscorable_reward), "reward_extra_info": info}
        tokens = result.get("token_rewards") if self.per_token else None
        info = dict(zip(EXTRA_KEYS, (float(result["reward_mean"]), float(result["logprob"]),
                                     int(result["num_tokens"]), 0)))
        return {"reward_score": SequenceReward(result["reward"], tokens), "reward_extra_info": info}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: List[float]) -> torch.Tensor:
        """verl's reward tensor (``[batch, response length]``): each sequence's reward at its last response token, as
        verl's own managers do, or, for rewards scored per token, token ``h``'s reward at response position ``h``."""
        rm_scores = super().assemble_rm_scores(data, [float(s) for s in scores])
        prompt_length = data.batch["prompts"].size(1)
        for i, score in enumerate(scores):
            tokens = getattr(score, "token_rewards", None)
            if tokens is None:
                continue
            positions = data.batch["attention_mask"][i, prompt_length:].nonzero().flatten()[: len(tokens)]
            rm_scores[i].zero_()
            rm_scores[i, positions] = torch.tensor(tokens[: len(positions)], dtype=rm_scores.dtype,
                                                   device=rm_scores.device)
        return rm_scores


def rollout_row(data: DataProto) -> Dict[str, List[int]]:
    """The ``{"prompt_ids", "response_ids"}`` row of a rollout: its last sequence's prompt and response tokens
    without padding (verl pads prompts on the left and responses on the right; ``attention_mask`` marks the real
    tokens, and ``prompt_len`` / ``response_len``, where the agent loop gives them, the lengths)."""
    item = data[len(data) - 1]
    prompts, responses = item.batch["prompts"], item.batch["responses"]
    extra = item.non_tensor_batch
    if "prompt_len" in extra and "response_len" in extra:
        prompt_ids = prompts[: int(extra["prompt_len"])]
        response_ids = responses[: int(extra["response_len"])]
    else:
        mask = item.batch["attention_mask"].bool()
        prompt_ids = prompts[mask[: prompts.size(-1)]]
        response_ids = responses[mask[prompts.size(-1):][: responses.size(-1)]]
    return {"prompt_ids": prompt_ids.tolist(), "response_ids": response_ids.tolist()}


def manager_options(config: Any = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manager's options: ``ENDOKERN_REWARD_<NAME>`` environment variables, then ``config.reward.reward_kwargs``,
    then ``overrides``; names outside :data:`OPTIONS` are refused."""
    options: Dict[str, Any] = {}
    for name in OPTIONS:
        value = os.environ.get("ENDOKERN_REWARD_" + name.upper())
        if value not in (None, ""):
            options[name] = value
    if "api_key" not in options and os.environ.get("ENDOKERN_API_KEY"):
        options["api_key"] = os.environ["ENDOKERN_API_KEY"]
    kwargs = None
    if config is not None:
        reward = config.get("reward") if hasattr(config, "get") else getattr(config, "reward", None)
        if reward is not None:
            kwargs = reward.get("reward_kwargs") if hasattr(reward, "get") else getattr(reward, "reward_kwargs", None)
    for source in (kwargs or {}, overrides or {}):
        unknown = set(source) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown endokern reward option(s) {sorted(unknown)}; the options are {list(OPTIONS)}")
        options.update({k: v for k, v in dict(source).items() if v is not None})
    if ("url" in options) == ("model" in options):
        raise ValueError("give the endokern reward either url (an endokern serve server) or model (a local model): "
                         "reward.reward_kwargs.url / .model, or ENDOKERN_REWARD_URL / ENDOKERN_REWARD_MODEL")
    return options


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _client(options: Dict[str, Any]) -> EndogenousReward:
    """The scoring client of ``options`` (one per process and option set: a local model loads once)."""
    key = tuple(sorted((k, str(v)) for k, v in options.items() if k not in ("per_token", "unscorable_reward")))
    if key in _CLIENTS:
        return _CLIENTS[key]
    variant = {k: (float(options[k]) if k == "gamma" else options[k]) for k in ("gamma", "terminal", "reduce")
               if k in options}
    if "url" in options:
        client = EndogenousReward(url=str(options["url"]), api_key=options.get("api_key"),
                                  timeout=float(options.get("timeout", 300.0)), **variant)
    else:
        from ..model import EndoRM

        batch_tokens = options.get("batch_tokens")
        # the options become the model's own: per-token rewards then follow them too
        rm = EndoRM.from_pretrained(str(options["model"]), device=options.get("device"), dtype=options.get("dtype"),
                                    batch_tokens=None if batch_tokens is None else int(batch_tokens), **variant)
        max_length = options.get("max_length")
        client = EndogenousReward(rm, max_length=None if max_length is None else int(max_length))
    _CLIENTS[key] = client
    return client


async def compute_score(data_source: Any = None, solution_str: str = "", ground_truth: Any = None,
                        extra_info: Optional[Dict[str, Any]] = None, *, url: Optional[str] = None,
                        api_key: Optional[str] = None, prompt_key: str = "prompt", timeout: float = 300.0,
                        **kwargs: Any) -> Dict[str, Any]:
    """verl's reward-function path (``reward.custom_reward_function.path=<this file>``,
    ``.name=compute_score``, ``+reward.custom_reward_function.reward_kwargs.url=...``): the endogenous reward of
    ``solution_str`` after the prompt text ``extra_info[prompt_key]`` (a string, or a list of ``{role, content}``
    messages), from an ``endokern serve`` server (``url``, else ``ENDOKERN_REWARD_URL``) -> ``{"score",
    "reward_mean", "num_tokens"}``. ``ground_truth`` and verl's other arguments are not used. Prefer
    :class:`EndogenousRewardManager`, which scores the rollout's own token ids."""
    url = url or os.environ.get("ENDOKERN_REWARD_URL")
    if not url:
        raise ValueError("compute_score needs the server: reward_kwargs.url or ENDOKERN_REWARD_URL")
    prompt = (extra_info or {}).get(prompt_key)
    if isinstance(prompt, str):
        row: Dict[str, Any] = {"prompt": prompt, "response": solution_str}
    elif isinstance(prompt, (list, tuple)) and prompt:
        row = {"messages": [dict(m) for m in prompt] + [{"role": "assistant", "content": solution_str}]}
    else:
        raise ValueError(f"compute_score needs the prompt in extra_info[{prompt_key!r}] (verl passes the response "
                         "only); add it to the dataset's extra_info, or use EndogenousRewardManager")
    client = _CLIENTS.get(("fn", url, api_key, timeout))
    if client is None:
        client = _CLIENTS[("fn", url, api_key, timeout)] = EndogenousReward(
            url=url, api_key=api_key or os.environ.get("ENDOKERN_API_KEY"), timeout=timeout)
    (result,) = await client.async_score_rows([row])
    if "error" in result:
        raise RuntimeError(f"endogenous reward: the response cannot be scored: {result['error']}")
    return {"score": float(result["reward"]), "reward_mean": float(result["reward_mean"]),
            "num_tokens": int(result["num_tokens"])}
