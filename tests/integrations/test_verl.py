"""endokern.integrations.verl through verl's own code (verl 0.9.1 from the package index, installed without its
engines: see the ``rl`` extra and .ci/run): the manager is resolved and built by ``verl.trainer.ppo.reward``'s
``load_reward_manager`` from verl's own generated trainer config, fed verl ``DataProto`` rollouts through verl's
``RewardLoopWorker.compute_score_batch`` (the code its Ray reward workers run), and its per-token rewards are placed
by ``assemble_rm_scores``. Rewards equal offline scoring of the same ids (RowScorer id rows) within 1e-5 relative."""

import asyncio
import math
import os

import pytest
from model_utils import FIXTURE, fixture_model, random_examples

if os.environ.get("ENDOKERN_REQUIRE_RL") != "1":
    pytest.importorskip("verl")
    pytest.importorskip("tensordict")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls  # noqa: E402

from endokern import EndoRM  # noqa: E402
from endokern.integrations import verl as endo_verl  # noqa: E402
from endokern.pipeline import RowScorer, ScoreTask  # noqa: E402

RTOL = 1e-5


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL)


def verl_config(**reward_kwargs):
    """verl's own full trainer config (its generated YAML), pointed at the endokern manager."""
    import verl.trainer.config as config_package

    path = os.path.join(os.path.dirname(config_package.__file__), "_generated_ppo_trainer.yaml")
    config = OmegaConf.load(path)
    config.reward.reward_manager.source = "importlib"
    config.reward.reward_manager.name = "EndogenousRewardManager"
    config.reward.reward_manager.module.path = "pkg://endokern.integrations.verl"
    config.actor_rollout_ref.model.path = FIXTURE
    config.reward.reward_kwargs = reward_kwargs
    return config


def rollout_batch(gen, count):
    """A verl batch of rollouts as its trainer holds them: prompts left-padded, responses right-padded, one
    attention mask over both."""
    _, tokenizer = fixture_model()
    prompts, responses = random_examples(gen, len(tokenizer), count, max_prompt=12, max_response=14)
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    pad = 0
    batch = {"prompts": [], "responses": [], "attention_mask": [], "input_ids": []}
    for p, r in zip(prompts, responses):
        left = [pad] * (p_len - len(p)) + p
        right = r + [pad] * (r_len - len(r))
        batch["prompts"].append(left)
        batch["responses"].append(right)
        batch["input_ids"].append(left + right)
        batch["attention_mask"].append([0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_len - len(r)))
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    non_tensors = {"data_source": np.array(["endo"] * count, dtype=object),
                   "reward_model": np.array([{"ground_truth": None}] * count, dtype=object)}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors), prompts, responses


def offline(prompts, responses, per_token=False):
    model, tokenizer = fixture_model()
    rows = [{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, responses)]
    return RowScorer(EndoRM(model, tokenizer), ScoreTask(per_token=per_token)).score_rows(rows)


def run_worker(config, data):
    """verl's reward worker (the class its Ray actors wrap) computing the batch: one run_single task per rollout."""
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    worker = RewardLoopWorker(config)
    assert isinstance(worker.reward_manager, endo_verl.EndogenousRewardManager)
    return asyncio.run(worker.compute_score_batch(data))


def test_verl_loads_the_manager_and_its_rewards_equal_offline(gen):
    data, prompts, responses = rollout_batch(gen, 6)
    config = verl_config(model=FIXTURE)
    assert resolve_reward_manager_cls(config) is endo_verl.EndogenousRewardManager
    outputs = run_worker(config, data)
    want = offline(prompts, responses)
    for out, w in zip(outputs, want):
        assert close(out["reward_score"], w["reward"]), (out, w)
        assert close(out["reward_extra_info"]["endokern_reward_mean"], w["reward_mean"])
        assert out["reward_extra_info"]["endokern_num_tokens"] == w["num_tokens"]
    # verl's own assembly: the sequence reward at each rollout's last response token
    scores = [o["reward_score"] for o in outputs]
    tensor = resolve_reward_manager_cls(config).assemble_rm_scores(data, scores)
    assert tensor.shape == data.batch["responses"].shape
    for i, (r, w) in enumerate(zip(responses, want)):
        assert close(float(tensor[i, len(r) - 1]), w["reward"]) and float(tensor[i].abs().sum()) == pytest.approx(
            abs(w["reward"]), rel=RTOL)


def test_per_token_rewards_land_at_the_response_positions(gen):
    data, prompts, responses = rollout_batch(gen, 5)
    config = verl_config(model=FIXTURE, per_token=True)
    manager = load_reward_manager(config, fixture_model()[1])

    async def score_all():
        return await asyncio.gather(*(manager.run_single(data[i:i + 1]) for i in range(len(data))))

    outputs = asyncio.run(score_all())
    tensor = type(manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    want = offline(prompts, responses, per_token=True)
    for i, (r, w) in enumerate(zip(responses, want)):
        got = tensor[i].tolist()
        assert all(close(g, t) for g, t in zip(got[: len(r)], w["token_rewards"])), (got, w["token_rewards"])
        assert all(g == 0.0 for g in got[len(r):])
        assert close(outputs[i]["reward_score"], w["reward"])


def test_agent_loop_rollouts_and_a_server(gen):
    """The agent loop's layout (one trajectory, prompt and response lengths given, right padding) against a real
    ``endokern serve`` through /score id rows, and verl's reward-function path (compute_score) on text."""
    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
    from serve_utils import Server

    _, tokenizer = fixture_model()
    prompts, responses = random_examples(gen, len(tokenizer), 4, max_prompt=10, max_response=12)
    srv = Server()
    try:
        config = verl_config(url=srv.url)
        manager = load_reward_manager(config, tokenizer)
        want = offline(prompts, responses)
        for p, r, w in zip(prompts, responses, want):
            tensors = {"prompts": torch.tensor([p + [0] * 3]), "responses": torch.tensor([r + [0] * 2]),
                       "attention_mask": torch.tensor([[1] * (len(p) + len(r)) + [0] * 5])}
            data = DataProto.from_dict(tensors=tensors, non_tensors={"prompt_len": np.array([len(p)]),
                                                                     "response_len": np.array([len(r)])})
            out = asyncio.run(manager.run_single(data))
            assert close(out["reward_score"], w["reward"]), (out, w)
        # the function path: the response text after the prompt text from extra_info, under the server's template
        text_p = tokenizer.decode(prompts[0], skip_special_tokens=True)
        text_r = " " + tokenizer.decode(responses[0], skip_special_tokens=True)
        got = asyncio.run(endo_verl.compute_score("endo", text_r, None, {"prompt": text_p}, url=srv.url))
        model, tok = fixture_model()
        (w,) = RowScorer(EndoRM(model, tok)).score_rows([{"prompt": text_p, "response": text_r}])
        assert close(got["score"], w["reward"]) and got["num_tokens"] == w["num_tokens"]
        with pytest.raises(ValueError, match="extra_info"):
            asyncio.run(endo_verl.compute_score("endo", text_r, None, {}, url=srv.url))
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_unscorable_rollouts_and_options(gen):
    _, tokenizer = fixture_model()
    bad = DataProto.from_dict(tensors={"prompts": torch.tensor([[5, 6]]), "responses": torch.tensor([[7, 10**6]]),
                                       "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    manager = load_reward_manager(verl_config(model=FIXTURE), tokenizer)
    with pytest.raises(RuntimeError, match="cannot be scored"):
        asyncio.run(manager.run_single(bad))
    fill = round(float(torch.rand((), generator=gen)) * -10, 3)
    manager = load_reward_manager(verl_config(model=FIXTURE, unscorable_reward=fill), tokenizer)
    out = asyncio.run(manager.run_single(bad))
    assert out["reward_score"] == fill and out["reward_extra_info"]["endokern_unscorable"] == 1
    with pytest.raises(ValueError, match="unknown endokern reward option"):
        load_reward_manager(verl_config(model=FIXTURE, temperature=2), tokenizer)
    with pytest.raises(ValueError, match="either url"):
        load_reward_manager(verl_config(), tokenizer)
    import pickle

    value = endo_verl.SequenceReward(1.5, [0.5, 1.0])
    again = pickle.loads(pickle.dumps(value))
    assert again == 1.5 and again.token_rewards == (0.5, 1.0)
