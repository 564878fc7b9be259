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
from limits import HANG_S
from model_utils import FIXTURE, fixture_model

from endokern import EndoRM
from endokern.integrations.trl import EndogenousReward, post_json, trl_row

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
    got = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 7, trainer_state=None)
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
