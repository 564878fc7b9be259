"""OpenRLHF's reward paths through its own code (openrlhf 0.11.2 from the package index, installed with
``--no-deps``: see the ``rl`` extra and .ci/run): its ``SingleTurnAgentExecutor`` (openrlhf/utils/agent.py) runs a
rollout with a stand-in engine, tokenizing and decoding as it does, and fetches the reward from a real
``endokern serve`` (``--reward.remote_url http://.../get_reward``) or from endokern's ``reward_func`` file, which it
loads itself (``--reward.remote_url path/to/openrlhf.py``). Rewards equal offline scoring of the same tokens.

What does not import here: openrlhf/trainer/ppo_utils/samples_generator.py (the experience maker that turns the
reward into tensors) imports vllm, a GPU engine; its conversion, ``torch.tensor([value])`` of each reward, score and
``extra_logs`` value, is replayed on the answers instead."""

import asyncio
import math
import os
import random
from types import SimpleNamespace

import pytest
from model_utils import FIXTURE, close, fixture_model, sentence

if os.environ.get("ENDOKERN_REQUIRE_RL") != "1":
    pytest.importorskip("openrlhf")
    pytest.importorskip("aiohttp")

import torch  # noqa: E402
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

import endokern.integrations.openrlhf as endo_openrlhf  # noqa: E402
from endokern import EndoRM  # noqa: E402
from endokern.pipeline import RowScorer  # noqa: E402


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


class Engine:
    """A stand-in for OpenRLHF's vLLM engine: ``generate`` answers the next prepared response ids."""

    def __init__(self, responses):
        self.responses = list(responses)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids = self.responses.pop(0)
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)])


def rollouts(rng, count):
    """Prompts and sampled response ids the way a policy makes them (words, so ids from the real tokenizer)."""
    _, tokenizer = fixture_model()
    prompts = [sentence(rng) for _ in range(count)]
    responses = [tokenizer(" " + sentence(rng), add_special_tokens=False)["input_ids"] for _ in range(count)]
    return prompts, responses


def run_executor(remote_url, prompts, responses):
    """OpenRLHF's own single-turn executor: tokenize the prompt, generate, stitch, decode the query, fetch the
    reward (over HTTP or through the loaded reward_func), as in its training loop."""
    _, tokenizer = fixture_model()
    executor = SingleTurnAgentExecutor(remote_url)
    engine = Engine(responses)
    params = SimpleNamespace(max_tokens=64, logprobs=None)

    async def run():
        return [await executor.execute(p, f"label {i}", params, 1024, tokenizer, engine) for i, p in enumerate(prompts)]

    return asyncio.run(run())


def offline(outputs):
    """Offline scoring of the tokens OpenRLHF's query carries: the query tokenized once (the tokenizer's own BOS),
    its prompt part being the prompt's own tokens, scored as id rows."""
    model, tokenizer = fixture_model()
    rows = []
    for out in outputs:
        query = tokenizer.decode(out["observation_tokens"], skip_special_tokens=False)
        ids = tokenizer(query)["input_ids"]
        prompt_ids = tokenizer(out["prompt"])["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        rows.append({"prompt_ids": prompt_ids, "response_ids": ids[len(prompt_ids):]})
    return RowScorer(EndoRM(model, tokenizer)).score_rows(rows)


def as_experience(out):
    """openrlhf/trainer/ppo_utils/samples_generator.py (0.11.2), _process_response_into_experience: every reward,
    score and extra_logs value becomes ``torch.tensor([value])``."""
    tensors = {"reward": torch.tensor([out["reward"]]), "scores": torch.tensor([out["scores"]])}
    for key, value in out["extra_logs"].items():
        tensors[key] = torch.tensor([value])
    return tensors


def server(*args):
    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
    from serve_utils import Server

    return Server(*args)


def test_openrlhf_client_against_endokern_serve(rng):
    prompts, responses = rollouts(rng, 5)
    scale = round(rng.uniform(0.5, 4.0), 3)
    srv = server("--score-scale", scale)
    try:
        outputs = run_executor(srv.url + "/get_reward", prompts, responses)
        want = offline(outputs)
        for out, w in zip(outputs, want):
            (reward,), (score,) = out["reward"], out["scores"]
            assert close(reward, w["reward"]), (out, w)
            assert close(score, 1 / (1 + math.exp(-w["reward_mean"] / scale))) and 0 < score < 1
        # OpenRLHF's own HTTP client, one sample per request: an empty response gives a 200 with null and the
        # reason, never a lost request
        executor = SingleTurnAgentExecutor(srv.url + "/get_reward")
        (empty,) = asyncio.run(executor._fetch_rewards_via_http([prompts[1]], [prompts[1]], [None]))
        assert empty["rewards"] == [None] and empty["errors"][0] and empty["extra_logs"] == {"unscorable": [1.0]}
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_a_prompt_openrlhf_truncated_is_scored(rng):
    prompts, responses = rollouts(rng, 1)
    srv = server()
    try:
        _, tokenizer = fixture_model()
        long_prompt = " ".join(sentence(rng) for _ in range(6))
        keep = len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) - 3
        executor = SingleTurnAgentExecutor(srv.url + "/get_reward")
        params = SimpleNamespace(max_tokens=len(responses[0]), logprobs=None)
        out = asyncio.run(executor.execute(long_prompt, None, params, keep + len(responses[0]), tokenizer,
                                           Engine(responses[:1])))
        query = tokenizer.decode(out["observation_tokens"], skip_special_tokens=False)
        assert not query.startswith(long_prompt)
        assert out["reward"] is not None and out["reward"][0] is not None, out
    finally:
        assert srv.stop() == 0, "".join(srv.log)


@pytest.mark.parametrize("mode", ["local", "server"])
def test_reward_func_file_loaded_by_openrlhf(rng, monkeypatch, mode):
    prompts, responses = rollouts(rng, 4)
    for name in ("ENDOKERN_REWARD_URL", "ENDOKERN_REWARD_MODEL", "ENDOKERN_UNSCORABLE_REWARD", "ENDOKERN_SCORE_SCALE"):
        monkeypatch.delenv(name, raising=False)
    srv = server() if mode == "server" else None
    try:
        if srv:
            monkeypatch.setenv("ENDOKERN_REWARD_URL", srv.url)
        else:
            monkeypatch.setenv("ENDOKERN_REWARD_MODEL", FIXTURE)
        path = endo_openrlhf.__file__
        outputs = run_executor(path, prompts, responses)
        want = offline(outputs)
        for out, w in zip(outputs, want):
            (reward,), (score,) = out["reward"], out["scores"]
            assert close(reward, w["reward"]) and close(score, 1 / (1 + math.exp(-w["reward_mean"]))), (out, w)
            tensors = as_experience(out)
            assert tensors["reward"].dtype == torch.float32 and float(tensors["endokern_unscorable"]) == 0.0
        # an unscorable sample (no response tokens): None with a warning, or the configured reward
        executor = SingleTurnAgentExecutor(path)
        ((body,),) = [asyncio.run(executor._fetch_rewards_via_func([prompts[0]], [prompts[0]], [None]))]
        assert body["rewards"] == [None] and body["extra_logs"]["endokern_unscorable"] == [1.0]
        fill = round(rng.uniform(-9, -1), 3)
        monkeypatch.setenv("ENDOKERN_UNSCORABLE_REWARD", str(fill))
        ((body,),) = [asyncio.run(executor._fetch_rewards_via_func([prompts[0]], [prompts[0]], [None]))]
        assert body["rewards"] == [fill] and body["scores"] == [fill]
        as_experience({"reward": body["rewards"], "scores": body["scores"], "extra_logs": body["extra_logs"]})
    finally:
        if srv:
            assert srv.stop() == 0, "".join(srv.log)


def test_reward_func_needs_one_source(monkeypatch):
    monkeypatch.delenv("ENDOKERN_REWARD_URL", raising=False)
    monkeypatch.delenv("ENDOKERN_REWARD_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="ENDOKERN_REWARD_URL"):
        endo_openrlhf.reward_func(["a b"], ["a"], [None])
    assert endo_openrlhf.score_of(0.0) == 0.5 and 0 < endo_openrlhf.score_of(-1e6) < 1e-300 + 1e-200
