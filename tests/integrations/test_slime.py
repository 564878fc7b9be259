"""slime's reward paths. slime is not on the package index (it is installed from its repository with Megatron and
SGLang), so nothing of it is imported: its request is replayed as its source builds it, from slime 0.3.1
(THUDM/slime, commit 624b824a898ab0ec1fcb4d373004c7f3852bf515):

- slime/rollout/rm_hub/__init__.py, ``remote_rm``: ``--rm-type remote_rm`` posts ``{"prompt": sample.prompt,
  "response": sample.response, "label": sample.label}`` with aiohttp to ``args.rm_url`` and takes the JSON answer as
  the reward (a dict: ``--reward-key`` names the number, slime/utils/types.py ``Sample.get_reward_value``);
- the same file, ``async_rm`` / ``batched_async_rm``: ``--custom-rm-path`` is loaded with
  slime/utils/misc.py ``load_function`` (importlib, ``module.attr``) and awaited as ``rm(args, sample)``, or
  ``rm(args, samples)`` with ``--group-rm``;
- slime/utils/types.py ``Sample``: ``tokens`` (the prompt's ids, then the response's), ``response_length``,
  ``prompt`` (text or messages), ``response``, ``label``.

Rewards equal offline scoring of the same tokens within 1e-5 relative."""

import asyncio
import importlib
import os
import random
from types import SimpleNamespace

import pytest
from model_utils import FIXTURE, close, fixture_model, random_examples, sentence

from endokern import EndoRM
from endokern.integrations import slime as endo_slime
from endokern.pipeline import RowScorer


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def load_function(path):
    """slime/utils/misc.py's loader, as it resolves --custom-rm-path: ``module.attr`` through importlib."""
    module_path, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_path), attr)


def samples(gen, count):
    _, tokenizer = fixture_model()
    prompts, responses = random_examples(gen, len(tokenizer), count, max_prompt=10, max_response=12)
    out = [SimpleNamespace(prompt=tokenizer.decode(p), response=tokenizer.decode(r), tokens=p + r,
                           response_length=len(r), label=str(i), reward=None)
           for i, (p, r) in enumerate(zip(prompts, responses))]
    return out, prompts, responses


def offline(rows):
    model, tokenizer = fixture_model()
    return RowScorer(EndoRM(model, tokenizer)).score_rows(rows)


def server():
    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
    import time
    import urllib.request

    from limits import HANG_S
    from serve_utils import Server

    srv = Server()
    deadline = time.monotonic() + HANG_S
    while True:  # listening: slime's client does not retry a refused connection at once
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=HANG_S):
                return srv
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_slime_remote_rm_request_against_endokern_serve(rng):
    aiohttp = pytest.importorskip("aiohttp")
    srv = server()
    try:
        args = SimpleNamespace(rm_url=srv.url + "/reward", reward_key="reward")
        pairs = [(sentence(rng), " " + sentence(rng)) for _ in range(4)] + [("the cat", "")]

        async def remote_rm(sample):  # the request of remote_rm, one sample per request
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
                async with session.post(args.rm_url, json=payload) as resp:
                    resp.raise_for_status()
                    return await resp.json()

        async def run():
            return await asyncio.gather(*(remote_rm(SimpleNamespace(prompt=p, response=r, label=None))
                                          for p, r in pairs))

        answers = asyncio.run(run())
        _, tokenizer = fixture_model()
        rows = []
        for p, r in pairs[:-1]:  # the tokens of prompt + response, tokenized once, split after the prompt's own
            ids, prompt_ids = tokenizer(p + r)["input_ids"], tokenizer(p)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids
            rows.append({"prompt_ids": prompt_ids, "response_ids": ids[len(prompt_ids):]})
        for answer, want in zip(answers, offline(rows)):
            assert close(answer[args.reward_key], want["reward"]) and close(answer["reward_mean"], want["reward_mean"])
        assert answers[-1]["reward"] is None and answers[-1]["error"]
    finally:
        assert srv.stop() == 0, "".join(srv.log)


@pytest.mark.parametrize("mode", ["local", "server"])
def test_custom_rm_scores_the_sample_tokens(gen, monkeypatch, mode):
    for name in ("ENDOKERN_REWARD_URL", "ENDOKERN_REWARD_MODEL", "ENDOKERN_UNSCORABLE_REWARD"):
        monkeypatch.delenv(name, raising=False)
    rm = load_function("endokern.integrations.slime.endogenous_rm")
    assert rm is endo_slime.endogenous_rm
    batch, prompts, responses = samples(gen, 5)
    want = offline([{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, responses)])
    srv = server() if mode == "server" else None
    try:
        if srv:
            args = SimpleNamespace(rm_url=srv.url + "/reward", reward_key=None)
        else:
            monkeypatch.setenv("ENDOKERN_REWARD_MODEL", FIXTURE)
            args = SimpleNamespace(rm_url=None, reward_key=None)

        async def one_by_one():  # slime's async_rm: one awaited call per sample, concurrently
            return await asyncio.gather(*(rm(args, s) for s in batch))

        got = asyncio.run(one_by_one())
        assert all(isinstance(g, float) and close(g, w["reward"]) for g, w in zip(got, want)), (got, want)
        group = asyncio.run(rm(args, batch))  # --group-rm: the whole group in one call
        assert all(close(g, w["reward"]) for g, w in zip(group, want))
        keyed = asyncio.run(rm(SimpleNamespace(**{**vars(args), "reward_key": "reward"}), batch[0]))
        assert close(keyed["reward"], want[0]["reward"]) and keyed["num_tokens"] == want[0]["num_tokens"]
        bad = SimpleNamespace(prompt="a", response="b", tokens=[5, 6, 10**6], response_length=1, label=None)
        with pytest.raises(RuntimeError, match="cannot be scored"):
            asyncio.run(rm(args, bad))
        monkeypatch.setenv("ENDOKERN_UNSCORABLE_REWARD", "-7.5")
        assert asyncio.run(rm(args, bad)) == -7.5
    finally:
        if srv:
            assert srv.stop() == 0, "".join(srv.log)


def test_text_samples_and_a_missing_source(monkeypatch, rng):
    assert endo_slime.sample_row(SimpleNamespace(prompt="p", response="r", tokens=[], response_length=0)) == \
        {"prompt": "p", "response": "r"}
    messages = [{"role": "user", "content": sentence(rng)}]
    assert endo_slime.sample_row(SimpleNamespace(prompt=messages, response="r"))["messages"][-1] == \
        {"role": "assistant", "content": "r"}
    monkeypatch.delenv("ENDOKERN_REWARD_URL", raising=False)
    monkeypatch.delenv("ENDOKERN_REWARD_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="--rm-url"):
        asyncio.run(endo_slime.endogenous_rm(SimpleNamespace(rm_url=None), SimpleNamespace(prompt="a", response="b")))
