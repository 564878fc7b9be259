"""EndoRM: any Hugging Face causal LM as a reward model.

The data flows one way: examples -> token ids (:mod:`endokern.tokenization`) -> batches sorted by length
and filled to a token budget -> the backbone's final hidden states -> only the response rows of the reward
section 1 (``H + 1`` per example) -> one :func:`endokern.soft_values` call per batch (the LM head is never
applied to prompt rows, and no ``N x V`` logits exist) -> :func:`endokern.reward.sequence_rewards` ->
results in input order.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import machine
from .batching import Batch, batches
from .ops import soft_values
from .reward import IGNORE_INDEX, ResponseRows, self_certainty_rows, sequence_rewards
from .settings import ModelSettings, SettingsError, check_reward
from .tokenization import Encoded, EncodeError, Encoder, TextExample, end_of_turn_ids

__all__ = ["DEFAULT_BATCH_TOKENS", "EndoRM", "LMHead", "ScoreResult", "progress_bar"]

# Tokens per forward batch (padding included). On CPU, batches past about a thousand tokens run slower per
# token (SmolLM2-135M, fp32, 2 cores, 16 LLMBar sequences: 12.0 s at 8192 against 5.4 s at 1024);
# GPUs want large batches to fill the device.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}


@dataclass
class ScoreResult:
    """One example's result. ``reward`` follows ``reduce``; the token lists are filled when asked."""

    reward: float
    reward_mean: float
    reward_sum: float
    logprob: float
    num_tokens: int
    token_rewards: Optional[List[float]] = None
    token_logprobs: Optional[List[float]] = None
    token_values: Optional[List[float]] = None
    token_entropies: Optional[List[float]] = None
    final_value: Optional[float] = None  # V(s_{H+1}), the value after the last response token (with per_token)
    # With self_certainty: the mean over the response's states of KL(U || softmax(z)) (endokern/reward.py), and with
    # per_token too, its value at each state.
    self_certainty: Optional[float] = None
    token_self_certainty: Optional[List[float]] = None


@dataclass(frozen=True)
class LMHead:
    """The LM head as ``soft_values`` sees it: ``z = softcap(scale * (W h + b))``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def from_model(cls, model) -> "LMHead":
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to score with")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3
        return cls(head.weight, getattr(head, "bias", None), scale, float(softcap) if softcap else None)


class EndoRM:
    """Score (prompt, response) pairs with a causal LM's endogenous reward (the quantities of endokern/reward.py).

    Options: ``alpha``, ``gamma``, ``terminal``, ``reduce`` (the reward's options, checked by
    :func:`endokern.settings.check_reward`), ``backend`` (of ``soft_values``), ``packing`` and ``share_prompts``
    (``"auto"``, True or False: padding-free batches, one forward per shared prompt), ``batch_tokens`` (tokens per
    forward batch), ``verify_head`` (the load-time probe of the LM head), ``threads`` (CPU threads of torch and the
    C++ kernel: a count, ``"all"``, or ``"auto"``/None: see :func:`endokern.machine.resolve_threads`).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        alpha: float = 1.0,
        gamma: float = 1.0,
        terminal: str = "zero",
        reduce: str = "sum",
        backend: str = "auto",
        packing: Union[str, bool] = "auto",
        batch_tokens: Optional[int] = None,
        share_prompts: Union[str, bool] = "auto",
        verify_head: bool = True,
        threads: Optional[Union[int, str]] = None,
    ):
        check_reward(alpha, gamma, terminal, reduce)
        try:
            machine.parse_threads(threads)
        except ValueError as err:
            raise SettingsError(f"threads: {err}") from None
        if packing not in ("auto", True, False):
            raise SettingsError(f"packing must be 'auto', True or False, got {packing!r}")
        if batch_tokens is not None and batch_tokens < 1:
            raise SettingsError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.backbone = model.base_model
        self.head = LMHead.from_model(model)
        self.alpha, self.gamma, self.terminal, self.reduce = float(alpha), float(gamma), terminal, reduce
        self.backend = backend
        device_type = self.head.weight.device.type
        self.batch_tokens = int(batch_tokens or DEFAULT_BATCH_TOKENS.get(device_type, DEFAULT_BATCH_TOKENS["cuda"]))
        self.attn_implementation = getattr(model.config, "_attn_implementation", None) or ""
        # Padding-free packing pays only where attention runs varlen (flash-attn); elsewhere transformers
        # would build a dense block-diagonal mask over the whole pack, so padded batches are faster there.
        self.packing = self.attn_implementation.startswith("flash") if packing == "auto" else bool(packing)
        # Responses to one prompt share its forward pass through a tree mask (sdpa and eager attention take
        # a custom 4D mask; flash-attn's varlen path does not).
        if share_prompts not in ("auto", True, False):
            raise ValueError(f"share_prompts must be 'auto', True or False, got {share_prompts!r}")
        can_share = not self.packing and self.attn_implementation in ("sdpa", "eager")
        if share_prompts is True and not can_share:
            raise ValueError(f"share_prompts needs padded batches with sdpa or eager attention, not "
                             f"{self.attn_implementation!r}{' with packing' if self.packing else ''}")
        self.share_prompts = can_share if share_prompts == "auto" else bool(share_prompts)
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        # CPU threads: torch's intra-op pool and the C++ kernel (which takes torch's count) use one number, set
        # before each batch (process-wide, as torch.set_num_threads is); None off the CPU.
        self.threads: Optional[int] = None
        self.threads_reason = ""
        self._thread_policy: Optional[machine.ThreadPolicy] = None
        self._pid = os.getpid()
        if device_type == "cpu":
            count, adaptive, self.threads_reason = machine.resolve_threads(threads)
            usable = machine.usable_cpus()[0] if adaptive else count
            self._thread_policy = machine.ThreadPolicy(usable, adaptive)
            if adaptive:
                self._thread_policy._seen = [usable - count]
            self.threads = count
            self._apply_threads()
        if verify_head:
            self._verify_head()

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        cache_dir: Optional[str] = None,
        **kwargs,
    ) -> "EndoRM":
        """Load a causal LM (a local folder, a hub id, a ``.gguf`` file, or a name of :mod:`endokern.assets`).

        ``kwargs`` holds this class's options (``alpha``, ``gamma``, ``terminal``, ``reduce``, ``backend``,
        ``packing``, ``batch_tokens``, ``share_prompts``, ``verify_head``: see :class:`EndoRM`); any other keyword
        goes to ``AutoModelForCausalLM.from_pretrained``. ``dtype`` defaults to bfloat16 on CUDA and float32
        elsewhere; ``"auto"`` takes bfloat16 on a CPU with native bf16 dot products (AVX512_BF16, AMX) and float32
        on one without (:func:`endokern.machine.auto_dtype`), and says which on standard error; an explicit bfloat16
        on a CPU without them warns in one line (it is emulated, and slower than float32). A ``.gguf`` file is dequantized once and cached as safetensors (``cache_dir``, default
        ``$ENDOKERN_CACHE`` or ``~/.cache/endokern``).
        """
        options = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "tokenizer"}
        rm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in options}
        hf_kwargs = kwargs
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .assets import resolve_model

        path = resolve_model(name_or_path, cache_dir=cache_dir)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        if "attn_implementation" not in hf_kwargs and device.type == "cuda" and dtype != torch.float32:
            from transformers.utils import is_flash_attn_2_available

            if is_flash_attn_2_available():
                hf_kwargs["attn_implementation"] = "flash_attention_2"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hf_kwargs).to(device)
        return cls(model, tokenizer, **rm_kwargs)

    @classmethod
    def from_settings(cls, settings: ModelSettings, **hf_kwargs) -> "EndoRM":
        """Load the model of :class:`endokern.settings.ModelSettings` (or of a run's
        :class:`~endokern.settings.Settings`) with its model and reward options."""
        return cls.from_pretrained(settings.model, **settings.model_kwargs(), **hf_kwargs)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _apply_threads(self) -> None:
        """Set torch's thread count to the policy's (on CPU; before each batch)."""
        if self._thread_policy is None:
            return
        if os.getpid() != self._pid:  # a forked copy (datasets' num_proc): the parent's OpenMP pool did not survive
            self.threads = 1       # the fork, and more threads than one deadlock there
        else:
            self.threads = self._thread_policy.threads()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _verify_head(self) -> None:
        """Check on a short probe that the backbone's hidden states and :class:`LMHead` give the model's logits.

        A model with a logit transform this wrapper does not know would otherwise score silently wrong.
        """
        vocab = self.head.weight.shape[0]
        probe = torch.arange(1, 9, device=self.device).remainder(vocab).unsqueeze(0)
        with torch.inference_mode():
            expected = self.model(input_ids=probe, use_cache=False).logits[0].float()
            hidden = self.backbone(input_ids=probe, use_cache=False).last_hidden_state[0].float()
            ours = torch.nn.functional.linear(hidden * self.head.scale, self.head.weight.float(),
                                              None if self.head.bias is None else self.head.bias.float() * self.head.scale)
            if self.head.softcap is not None:
                ours = self.head.softcap * torch.tanh(ours / self.head.softcap)
        tolerance = (1e-4 if self.head.weight.dtype == torch.float32 else 5e-2) * max(1.0, float(expected.abs().max()))
        error = float((ours - expected).abs().max())
        if not error <= tolerance:
            raise ValueError(
                f"{type(self.model).__name__}: the LM head applied to the backbone's hidden states differs from the "
                f"model's logits by {error:.3g} (> {tolerance:.3g}); it applies a logit transform endokern does not "
                "know, so its rewards would be wrong"
            )

    # ----------------------------------------------------------------------------------------- scoring
    def encoder(self, template: str = "auto", *, system: Optional[str] = None, append_eos: bool = False) -> Encoder:
        if self.tokenizer is None:
            raise ValueError("this EndoRM has no tokenizer; score token ids with score_ids")
        generation_config = getattr(self.model, "generation_config", None)
        return Encoder(
            self.tokenizer, template, system=system, append_eos=append_eos,
            end_of_turn=end_of_turn_ids(self.tokenizer, generation_config),
        )

    def score(
        self,
        prompts: Optional[Sequence[str]] = None,
        responses: Optional[Sequence[str]] = None,
        *,
        messages: Optional[Sequence[Sequence[Dict[str, Any]]]] = None,
        template: str = "auto",
        system: Optional[str] = None,
        append_eos: bool = False,
        per_token: bool = False,
        entropy: bool = False,
        progress: bool = False,
        self_certainty: bool = False,
    ) -> List[ScoreResult]:
        """Score texts: ``prompts`` with ``responses`` (equal lengths), or ``messages`` conversations whose last
        turn is the assistant's response. Tokenized by endokern/tokenization.py (``template``: auto, plain, chat).
        ``self_certainty``: also fill ``result.self_certainty`` (see :meth:`score_encoded`)."""
        if messages is not None:
            if prompts is not None or responses is not None:
                raise ValueError("give either messages or prompts and responses, not both")
            examples = [TextExample(messages=m) for m in messages]
        else:
            if prompts is None or responses is None:
                raise ValueError("give prompts and responses (or messages)")
            if isinstance(prompts, str) or isinstance(responses, str):
                raise TypeError("prompts and responses must be lists of strings")
            if len(prompts) != len(responses):
                raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
            examples = [TextExample(prompt=p, response=r) for p, r in zip(prompts, responses)]
        encoded = self.encoder(template, system=system, append_eos=append_eos).encode(examples)
        for i, item in enumerate(encoded):
            if isinstance(item, EncodeError):
                raise EncodeError(f"example {i}: {item}")
        return self.score_encoded(encoded, per_token=per_token, entropy=entropy, progress=progress,
                                  self_certainty=self_certainty)

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        per_token: bool = False,
        entropy: bool = False,
        progress: bool = False,
        self_certainty: bool = False,
    ) -> List[ScoreResult]:
        """Score lists of token ids (each prompt ``p >= 1`` tokens, each response ``H >= 1``)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        vocab = self.head.weight.shape[0]
        encoded = []
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            p, r = [int(t) for t in p], [int(t) for t in r]
            if not p or not r:
                raise ValueError(f"example {i}: the {'prompt' if not p else 'response'} has no tokens")
            if min(p + r) < 0 or max(p + r) >= vocab:
                raise ValueError(f"example {i}: a token id is outside the vocabulary [0, {vocab})")
            encoded.append(Encoded(p, r))
        return self.score_encoded(encoded, per_token=per_token, entropy=entropy, progress=progress,
                                  self_certainty=self_certainty)

    def score_encoded(
        self,
        encoded: Sequence[Encoded],
        *,
        per_token: bool = False,
        entropy: bool = False,
        progress: Union[bool, Callable[[int, int], None]] = False,
        self_certainty: bool = False,
    ) -> List[ScoreResult]:
        """Score encoded examples; results in input order. ``progress``: a tqdm bar, or a callback
        ``(examples, forward_tokens)`` called after each batch (the tokens the model ran: a shared prompt once).
        ``self_certainty``: also the mean over the response's states of ``KL(U || softmax(z)) = LSE(z) - mean(z) -
        log V`` (endokern/reward.py), at temperature 1 whatever ``alpha``: with ``alpha = 1`` from the same kernel pass
        (one more running sum), otherwise from a second pass over the vocabulary at alpha 1."""
        if self.max_positions:
            for i, ex in enumerate(encoded):
                if ex.length > self.max_positions:
                    raise ValueError(f"example {i}: {ex.length} tokens, more than the model's {self.max_positions} positions")
        results: List[Optional[ScoreResult]] = [None] * len(encoded)
        bar = None
        if progress is True:
            bar = progress_bar(len(encoded), "scoring")
            report = bar.report
        else:
            report = progress if callable(progress) else None
        try:
            for batch in batches(encoded, batch_tokens=self.batch_tokens, packing=self.packing,
                                 share_prompts=self.share_prompts):
                for slot, result in zip(batch.order, self._score_batch(batch, per_token, entropy, self_certainty)):
                    results[slot] = result
                if report is not None:
                    report(len(batch.order), batch.forward_tokens)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, batch: Batch, per_token: bool, entropy: bool, self_certainty: bool = False
                     ) -> List[ScoreResult]:
        device = self.device
        self._apply_threads()
        mask = batch.attention_mask
        if mask is not None:
            mask = mask.to(device)
            if self.attn_implementation == "eager":  # eager attention adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=self.head.weight.dtype, device=device).masked_fill(
                    ~mask, torch.finfo(self.head.weight.dtype).min
                )
        # Lines are right-padded: causal attention never lets a real token see the pads after it, so without a
        # tree mask no padding mask is needed and the mask-free (is_causal) attention path runs.
        hidden = self.backbone(
            input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), attention_mask=mask,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        rows = ResponseRows(batch.row_index.to(device), batch.row_targets.to(device), batch.cu_rows.to(device))
        states = hidden.index_select(0, rows.index)
        bias = self.head.bias
        if self.head.scale != 1.0:
            states = states * self.head.scale
            bias = None if bias is None else bias * self.head.scale
        out = soft_values(
            states, self.head.weight, rows.targets, alpha=self.alpha, bias=bias, softcap=self.head.softcap,
            ignore_index=IGNORE_INDEX, return_entropy=entropy, backend=self.backend,
            return_logit_sum=self_certainty and self.alpha == 1.0,
        )
        certainty = None
        if self_certainty:  # LSE(z) is the value at alpha 1: this pass's, else one more pass at alpha 1
            at_one = out if self.alpha == 1.0 else soft_values(
                states, self.head.weight, None, alpha=1.0, bias=bias, softcap=self.head.softcap,
                return_logit_sum=True, backend=self.backend)
            certainty = self_certainty_rows(at_one.value, at_one.logit_sum, self.head.weight.shape[0])
        rewards = sequence_rewards(
            out.value, out.target_logit, rows.cu_rows, alpha=self.alpha, gamma=self.gamma,
            terminal=self.terminal, reduce=self.reduce, entropy=out.entropy, self_certainty=certainty,
        )
        return _to_results(rewards, per_token, entropy)


def _to_results(rewards, per_token: bool, entropy: bool) -> List[ScoreResult]:
    cols = {k: getattr(rewards, k).cpu().tolist() for k in ("reward", "reward_mean", "reward_sum", "logprob", "num_tokens")}
    tokens: Dict[str, List[List[float]]] = {}
    if rewards.self_certainty is not None:
        cols["self_certainty"] = rewards.self_certainty.cpu().tolist()
    if per_token or entropy:
        bounds = rewards.cu_tokens.cpu().tolist()
        names = ["token_rewards", "token_logprobs", "token_values"] if per_token else []
        names += ["token_entropies"] if entropy else []
        names += ["token_self_certainty"] if per_token and rewards.token_self_certainty is not None else []
        for name in names:
            flat = getattr(rewards, name).cpu().tolist()
            tokens[name] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if per_token:
            tokens["final_value"] = rewards.final_value.cpu().tolist()
    return [
        ScoreResult(
            reward=cols["reward"][b], reward_mean=cols["reward_mean"][b], reward_sum=cols["reward_sum"][b],
            logprob=cols["logprob"][b], num_tokens=int(cols["num_tokens"][b]),
            self_certainty=cols["self_certainty"][b] if "self_certainty" in cols else None,
            **{name: values[b] for name, values in tokens.items()},
        )
        for b in range(len(cols["reward"]))
    ]


def _resolve_dtype(dtype: Optional[Union[str, torch.dtype]], device: torch.device) -> torch.dtype:
    """The model dtype of :meth:`EndoRM.from_pretrained` (None: bf16 on CUDA, fp32 elsewhere; ``auto``: by the
    hardware), with its line on standard error: the choice of ``auto``, or the warning for emulated bf16."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype == "auto":
        name, reason = machine.auto_dtype(device.type)
        if device.type == "cpu":
            print(f"endokern: --dtype auto: {name} ({reason})", file=sys.stderr)
        return _parse_dtype(name)
    parsed = _parse_dtype(dtype)
    if parsed == torch.bfloat16 and device.type == "cpu":
        warning = machine.emulated_bf16_warning()
        if warning is not None:
            print(warning, file=sys.stderr)
    return parsed


def _parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


class _Progress:
    """A tqdm bar over examples that also shows tokens per second."""

    def __init__(self, total: Optional[int], desc: str, disable: Optional[bool] = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, disable=disable)
        self.tokens = 0
        self.start = time.perf_counter()

    def report(self, examples: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(examples)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: Optional[int], desc: str, disable: Optional[bool] = None) -> _Progress:
    return _Progress(total, desc, disable)
