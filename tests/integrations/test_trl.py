"""endokern.integrations.trl: TRL's reward-function contract (both formats, variants, unscorable completions) with a
local model and with a real ``endokern serve`` process; the client's retries; the GRPO example when TRL is installed."""

import http.server
import json
import math
import os
import random
import subprocess
import sys
import threading

import pytest
import torch
from limits import HANG_S
from model_utils import FIXTURE, fixture_model

from endokern import EndoRM
from endokern.integrations.trl import EndogenousReward, async_endogenous_reward, post_json, trl_row

WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was".split()
RTOL = 1e-5  # the batch-composition tolerance of the model tests (SPEC section 3)
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def sentence(rng, low=1, high=8):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def local_rm(chat=False, **options):
    model, tokenizer = fixture_model()
    if chat:
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHAT
    return EndoRM(model, tokenizer, **options)


def close(a, b):
    return a is not None and math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL)


def test_standard_format_and_name(rng):
    prompts = [sentence(rng) for _ in range(7)]
    completions = [" " + sentence(rng) for _ in range(7)]
    reward = EndogenousReward(local_rm(), name="endo")
    assert reward.__name__ == "endo"
    got = reward(prompts=prompts, completions=completions, trainer_state=None)
    want = local_rm().score(prompts, completions)
    assert all(close(g, w.reward) for g, w in zip(got, want))


def test_conversational_format(rng):
    rm = local_rm(chat=True)
    prompts = [[{"role": "user", "content": sentence(rng)}] for _ in range(5)]
    prompts[0] = [{"role": "system", "content": sentence(rng)}] + prompts[0]
    completions = [[{"role": "assistant", "content": sentence(rng)}] for _ in range(5)]
    got = EndogenousReward(rm)(prompts, completions)
    want = rm.score(messages=[p + c for p, c in zip(prompts, completions)])
    assert all(close(g, w.reward) for g, w in zip(got, want))
    assert trl_row(prompts[1], completions[1]) == {"messages": prompts[1] + completions[1]}
    with pytest.raises(TypeError):
        trl_row("a prompt", completions[0])


@pytest.mark.parametrize("variant", ["mean", "bootstrap", "gamma"])
def test_reward_variants_match_a_model_with_those_options(rng, variant):
    options = {"mean": {"reduce": "mean"}, "bootstrap": {"terminal": "bootstrap"},
               "gamma": {"gamma": round(rng.uniform(0.2, 0.99), 3)}}[variant]
    prompts = [sentence(rng) for _ in range(6)]
    completions = [" " + sentence(rng) for _ in range(6)]
    got = EndogenousReward(local_rm(), **options)(prompts, completions)
    want = local_rm(**options).score(prompts, completions)
    assert all(close(g, w.reward) for g, w in zip(got, want)), (options, got, [w.reward for w in want])


def test_unscorable_completions_get_none(rng):
    prompts = [sentence(rng) for _ in range(4)]
    completions = [" " + sentence(rng), "", " " + "the " * 50, " " + sentence(rng)]
    got = EndogenousReward(local_rm(), max_length=40)(prompts, completions)
    assert got[1] is None and got[2] is None and got[0] is not None and got[3] is not None
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        EndogenousReward(local_rm())(prompts[:2], completions[:1])
    with pytest.raises(ValueError):
        EndogenousReward()
    with pytest.raises(ValueError, match="server's own options"):
        EndogenousReward(url="http://127.0.0.1:1", template="plain")


def test_server_gives_the_local_rewards(rng):
    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    from serve_utils import Server

    srv = Server("--max-length", 40, env={"ENDOKERN_API_KEY": "k"})
    try:
        prompts = [sentence(rng) for _ in range(9)]
        completions = [" " + sentence(rng) for _ in range(8)] + [""]
        gamma = round(rng.uniform(0.2, 0.99), 3)
        for options in ({}, {"gamma": gamma, "reduce": "mean"}):
            remote = EndogenousReward(url=srv.url, api_key="k", **options)(prompts, completions)
            local = EndogenousReward(local_rm(), **options)(prompts, completions)
            assert remote[-1] is None and local[-1] is None
            assert all(close(r, l) for r, l in zip(remote[:-1], local[:-1])), (options, remote, local)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            EndogenousReward(url=srv.url, api_key="wrong")(prompts, completions)
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_client_retries_busy_servers_and_reports_errors():
    answers = [(503, {"detail": "full"}), (503, {"detail": "full"}), (200, {"ok": True}), (422, {"detail": "bad rows"})]
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.headers.get("Authorization"), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status, body = answers[len(seen) - 1]
            data = json.dumps(body).encode()
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{stub.server_address[1]}/score"
    try:
        assert post_json(url, {"rows": [1]}, api_key="k", retries=2, backoff=0) == {"ok": True}
        assert len(seen) == 3 and all(s == ("Bearer k", {"rows": [1]}) for s in seen)
        with pytest.raises(RuntimeError, match="HTTP 422.*bad rows"):
            post_json(url, {}, retries=5, backoff=0)
        assert len(seen) == 4  # a client error is not retried
    finally:
        stub.shutdown()
    with pytest.raises(RuntimeError, match="after 2 tries"):
        post_json(url, {}, retries=1, backoff=0, timeout=5)


def test_grpo_example_runs_a_few_steps():
    if os.environ.get("ENDOKERN_REQUIRE_TRL") != "1":
        pytest.importorskip("trl")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "grpo_endogenous.py"), "--steps", "2",
                           "--max-completion-length", "12"], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all(math.isfinite(float(line.split("mean reward ")[1].split()[0])) for line in steps)


# A chat template whose generation prompt pre-fills the assistant turn (as reasoning models' templates open <think>).
PREFILL = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|><think>{% endif %}")


def sampled_ids(gen, tokenizer, count, low=3, high=12):
    return [torch.randint(low, len(tokenizer), (int(torch.randint(1, high, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(count)]


def test_completion_ids_are_scored_as_the_policy_sampled_them(rng, gen):
    rm = local_rm()
    prompts = [sentence(rng) for _ in range(5)]
    ids = sampled_ids(gen, rm.tokenizer, 5)
    texts = [rm.tokenizer.decode(i) for i in ids]
    metrics = {}
    got = EndogenousReward(rm, template="plain")(prompts, texts, completion_ids=ids,
                                                 log_metric=lambda k, v: metrics.setdefault(k, v))
    want = rm.score_ids([rm.tokenizer(p)["input_ids"] for p in prompts], ids, per_token=True)
    assert all(close(g, w.reward) for g, w in zip(got, want)), (got, [w.reward for w in want])
    tokens = [x for w in want for x in w.token_rewards]
    assert close(metrics["endogenous/token_reward_mean"], sum(tokens) / len(tokens))
    assert close(metrics["endogenous/token_reward_min"], min(tokens))
    assert metrics["endogenous/unscorable_fraction"] == 0.0
    # the text instead, when the reward model's tokenizer is not the policy's
    text = EndogenousReward(rm, template="plain", completion_ids=False)(prompts, texts, completion_ids=ids)
    assert text == EndogenousReward(rm, template="plain")(prompts, texts)


def test_conversations_with_a_prefilled_assistant_turn(rng, gen):
    model, tokenizer = fixture_model()
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = PREFILL
    rm = EndoRM(model, tokenizer)
    prompts = [[{"role": "user", "content": sentence(rng)}] for _ in range(4)]
    ids = sampled_ids(gen, tokenizer, 4)
    completions = [[{"role": "assistant", "content": tokenizer.decode(i)}] for i in ids]
    got = EndogenousReward(rm)(prompts, completions, completion_ids=ids)
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"] for p in prompts]
    assert all(tokenizer.decode(p).endswith("<think>") for p in prompt_ids)
    want = rm.score_ids(prompt_ids, ids)
    assert all(close(g, w.reward) for g, w in zip(got, want))


def test_async_server_reward_is_a_coroutine_function(rng, gen):
    import asyncio
    import inspect

    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
    from serve_utils import Server

    srv = Server()
    try:
        reward = async_endogenous_reward(srv.url, name="endo_async")
        assert inspect.iscoroutinefunction(reward) and reward.__name__ == "endo_async"
        rm = local_rm()
        prompts = [sentence(rng) for _ in range(6)]
        ids = sampled_ids(gen, rm.tokenizer, 6)
        metrics = []
        got = asyncio.run(reward(prompts=prompts, completions=[rm.tokenizer.decode(i) for i in ids],
                                 completion_ids=ids, log_metric=lambda k, v: metrics.append(k)))
        # the server renders the text prompt by its template (plain here: the tokenizer's own BOS)
        want = rm.score_ids([rm.tokenizer(p)["input_ids"] for p in prompts], ids)
        assert all(close(g, w.reward) for g, w in zip(got, want)), (got, [w.reward for w in want])
        assert "endogenous/token_reward_std" in metrics
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_grpo_trainer_with_the_async_server_reward_and_completion_ids(rng):
    """TRL's GRPOTrainer, a few steps: the async server reward and the local reward side by side, each seeing
    TRL's completion_ids; every reward TRL got equals offline scoring of those ids."""
    if os.environ.get("ENDOKERN_REQUIRE_TRL") != "1":
        pytest.importorskip("trl")
    if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
        pytest.importorskip("fastapi")
    import tempfile

    from datasets import Dataset
    from serve_utils import Server
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    srv = Server("--template", "plain")
    try:
        seen = {"async": [], "local": []}
        server_reward = async_endogenous_reward(srv.url)
        local_reward = EndogenousReward(local_rm(), template="plain")

        async def endo_server(prompts, completions, completion_ids, **kwargs):
            rewards = await server_reward(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                          **kwargs)
            seen["async"].append((list(prompts), [list(i) for i in completion_ids], rewards))
            return rewards

        def endo_local(prompts, completions, completion_ids, **kwargs):
            rewards = local_reward(prompts, completions, completion_ids=completion_ids, **kwargs)
            seen["local"].append((list(prompts), [list(i) for i in completion_ids], rewards))
            return rewards

        model, tokenizer = fixture_model()
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32)
        config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo-endo-"), max_steps=2, learning_rate=1e-4,
                            per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                            seed=rng.randrange(2**31), disable_tqdm=True)
        prompts = [sentence(rng) for _ in range(4)]
        trainer = GRPOTrainer(model=policy, reward_funcs=[endo_server, endo_local], args=config,
                              processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": prompts}))
        trainer.train()
        assert seen["async"] and len(seen["async"]) == len(seen["local"])
        rm = EndoRM(model, tokenizer)
        for calls in seen.values():
            for ps, ids, rewards in calls:
                want = rm.score_ids([tokenizer(p)["input_ids"] for p in ps], ids)
                assert all(close(g, w.reward) for g, w in zip(rewards, want)), (rewards, [w.reward for w in want])
        assert any(k.startswith("endogenous/") for row in trainer.state.log_history for k in row)
    finally:
        assert srv.stop() == 0, "".join(srv.log)
