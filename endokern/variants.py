"""Reward variants and likelihood baselines, all from one forward pass.

With ``alpha`` fixed, one scoring pass with ``per_token=True`` gives ``log pi_h``, ``V(s_h)`` and
``V(s_{H+1})`` (``ScoreResult.final_value``) for every response token. Since ``Q_h = alpha * log pi_h + V(s_h)``,
every choice of ``gamma``, terminal value and reduction follows from them with no second forward:

    r_h = Q_h - gamma * V(s_{h+1}),   V(s_{H+1}) -> 0 for terminal "zero"

Names (``parse_variants``):

- ``paper``: the paper's reward: sum over tokens, terminal zero, gamma 1
- ``mean``: the same, averaged over the response tokens
- ``bootstrap``: sum, the terminal state keeps its value ``V(s_{H+1})``, gamma 1
- ``gamma=G``: sum, terminal zero, discount ``G`` (e.g. ``gamma=0.93``)
- ``loglik``: summed log-likelihood ``sum_h log pi_h`` (of the alpha-tempered policy; alpha 1: the model's)
- ``loglik-mean``: its mean over the response tokens
- ``self-certainty``: the mean over the response's states of ``KL(U || softmax(z)) = LSE(z) - mean(z) - log V``
  (Kang et al., arXiv 2502.18581; the reward Intuitor trains with): how far the model's next-token distribution is
  from uniform, i.e. its confidence, whichever token the response took; at temperature 1 whatever alpha. The other
  variants depend on the tokens taken (``Q_h = z[x_{p+h}]``); this one only on the states. It needs
  ``self_certainty=True`` in the scoring pass (:attr:`Variant.needs_self_certainty`), not the per-token values.
- ``judge``: the generative-verifier baseline (see :mod:`endokern.evaluation`): a separate pass that scores one
  answer token per example, so it is not computed here

With gamma 1 and terminal zero the sum telescopes: ``sum_h r_h = alpha * sum_h log pi_h + V(s_1)``. ``V(s_1)`` is the
value of the prompt alone, the same for every response to one prompt, so ``paper`` and ``loglik`` order the responses
to one prompt the same way. ``mean`` does not: ``V(s_1) / H`` favours short responses when ``V(s_1) > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

from .model import ScoreResult
from .settings import check_reward

__all__ = ["DEFAULT_VARIANTS", "NAMES", "ONE_PASS", "Variant", "parse_variant", "parse_variants", "variant_score"]

ONE_PASS = ("paper", "mean", "bootstrap", "gamma=0.93", "loglik", "loglik-mean", "self-certainty")
# every name parse_variant takes (gamma=G for any G in [0, 1]), for usage errors
NAMES = ("paper", "mean", "bootstrap", "bootstrap-mean", "gamma=G", "loglik", "loglik-mean", "self-certainty", "judge")
DEFAULT_VARIANTS = ONE_PASS + ("judge",)


@dataclass(frozen=True)
class Variant:
    """One way to turn a response's tokens into one number."""

    name: str
    kind: str  # "reward", "loglik", "self-certainty" or "judge"
    gamma: float = 1.0
    terminal: str = "zero"
    reduce: str = "sum"

    @property
    def needs_self_certainty(self) -> bool:
        """Whether its score reads ``ScoreResult.self_certainty`` (score with ``self_certainty=True``)."""
        return self.kind == "self-certainty"

    @property
    def needs_per_token(self) -> bool:
        """Whether its score reads the per-token values (score with ``per_token=True``)."""
        return self.kind in ("reward", "loglik")

    @property
    def description(self) -> str:
        if self.kind == "self-certainty":
            return "self-certainty: mean KL(uniform || next-token distribution) over the response (confidence)"
        if self.kind == "judge":
            return "generative verifier: log-probability of the answer 'Yes' to a judge prompt"
        if self.kind == "loglik":
            return f"log-likelihood, {'summed' if self.reduce == 'sum' else 'mean'} over response tokens"
        return f"endogenous reward: {self.reduce}, terminal {self.terminal}, gamma {self.gamma:g}"


def parse_variant(name: str) -> Variant:
    name = name.strip()
    fixed = {
        "paper": Variant("paper", "reward"),
        "mean": Variant("mean", "reward", reduce="mean"),
        "bootstrap": Variant("bootstrap", "reward", terminal="bootstrap"),
        "bootstrap-mean": Variant("bootstrap-mean", "reward", terminal="bootstrap", reduce="mean"),
        "loglik": Variant("loglik", "loglik"),
        "loglik-mean": Variant("loglik-mean", "loglik", reduce="mean"),
        "self-certainty": Variant("self-certainty", "self-certainty", reduce="mean"),
        "judge": Variant("judge", "judge"),
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("gamma="):
        try:
            gamma = float(name[len("gamma="):])
        except ValueError:
            gamma = float("nan")
        if not 0 <= gamma <= 1:
            raise ValueError(f"variant {name!r}: gamma must be a number in [0, 1]")
        return Variant(f"gamma={gamma:g}", "reward", gamma=gamma)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(NAMES)}")


def parse_variants(spec: str) -> List[Variant]:
    """``"paper,mean,gamma=0.93"`` -> variants, in order, without repeats; ``"all"`` -> the default list."""
    names = DEFAULT_VARIANTS if spec.strip() == "all" else [s for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("no variant given")
    out: List[Variant] = []
    for n in names:
        v = parse_variant(n)
        if v.name not in [o.name for o in out]:
            out.append(v)
    return out


def variant_score(result: ScoreResult, variant: Variant, alpha: float = 1.0) -> float:
    """One response's score under ``variant``, from a result scored with ``per_token=True`` at ``alpha`` (with
    ``self_certainty=True`` for the self-certainty variant, whose score is that mean whatever the reduction)."""
    if variant.kind == "judge":
        raise ValueError("the judge variant needs its own pass (endokern.evaluation.JudgeTask)")
    if variant.kind == "self-certainty":
        if result.self_certainty is None:
            raise ValueError("the self-certainty variant needs a result scored with self_certainty=True")
        return result.self_certainty
    check_reward(alpha, variant.gamma, variant.terminal, variant.reduce)
    lp, values = result.token_logprobs, result.token_values
    if lp is None or values is None or result.final_value is None:
        raise ValueError("variant_score needs a result scored with per_token=True")
    n = len(lp)
    if variant.kind == "loglik":
        total = math.fsum(lp)
    else:
        nxt: Sequence[float] = list(values[1:]) + [0.0 if variant.terminal == "zero" else result.final_value]
        # left to right, as endokern.reward sums a sequence
        total = 0.0
        for h in range(n):
            total += (alpha * lp[h] + values[h]) - variant.gamma * nxt[h]
    return total / n if variant.reduce == "mean" else total
