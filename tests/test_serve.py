"""``endokern serve`` (SPEC section 4b): a real server process on a free localhost port, its endpoints, limits,
access, overload, SIGTERM with requests in flight, and rewards equal to offline ``endokern score``; the scheduler
(merging, cancellation, errors) with a recording stand-in model."""

import json
import math
import os
import random
import signal
import threading
import time

import pytest

# CI installs the [serve] extra and sets ENDOKERN_REQUIRE_SERVE=1: a missing server package fails instead of skipping
if os.environ.get("ENDOKERN_REQUIRE_SERVE") != "1":
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from limits import HANG_S
from model_utils import FIXTURE, fixture_model  # noqa: E402
from serve_utils import Server  # noqa: E402

import endokern  # noqa: E402
from endokern import EndoRM, Settings  # noqa: E402
from endokern.model import ScoreResult  # noqa: E402
from endokern.serve import Batcher  # noqa: E402
from endokern.tokenization import Encoded, TextExample  # noqa: E402

WORDS = ("the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was went to "
         "a in on with her his they saw").split()
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LENGTH = 60  # a good row (at most 6 + 6 words of at most 4 tokens, plus a BOS) never reaches it
RTOL = 1e-5  # the batch-composition tolerance of the model tests (SPEC section 3)


def sentence(rng, low=1, high=6):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def good_rows(rng, n):
    return [{"id": f"r{i}-{rng.randrange(10**6)}", "prompt": sentence(rng), "response": " " + sentence(rng)}
            for i in range(n)]


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


@pytest.fixture(scope="module")
def server():
    srv = Server("--max-length", MAX_LENGTH, "--max-body-bytes", 65536, env={"ENDOKERN_API_KEY": KEY})
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def post(url, path, body, headers=AUTH, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=kwargs.pop("timeout", HANG_S), **kwargs)


def offline_score(tmp_path, rows, **options):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    endokern.run(Settings(command="score", model=FIXTURE, input=[str(src)], output=str(out), progress=False,
                          max_length=MAX_LENGTH, **options))
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    errors_path = tmp_path / "scores.errors.jsonl"
    errors = [json.loads(line) for line in errors_path.read_text().splitlines()] if errors_path.exists() else []
    return scored, errors


def assert_close(served, offline):
    assert served["id"] == offline["id"] and served["num_tokens"] == offline["num_tokens"]
    for name in ("reward", "reward_mean", "logprob"):
        assert math.isclose(served[name], offline[name], rel_tol=RTOL, abs_tol=RTOL), (name, served, offline)


def test_concurrent_clients_equal_offline_score(server, tmp_path, rng):
    rows = good_rows(rng, 64)
    bad = {3: {"prompt": "x"}, 17: {"id": "long", "prompt": "the " * 80, "response": " cat"}, 40: 7,
           51: {"prompt": "x", "response": ""}}
    for i, row in bad.items():
        rows.insert(i, row)
    offline, errors = offline_score(tmp_path, rows)
    by_index = {e["row"]: e["reason"] for e in errors}
    assert sorted(by_index) == sorted(bad)
    expected = iter(offline)
    expected = [None if i in by_index else next(expected) for i in range(len(rows))]

    # 17 clients at once, 4 rows each; a row's id defaults to its index in its request, so give every row one
    requests = [list(range(i, min(i + 4, len(rows)))) for i in range(0, len(rows), 4)]
    answers = [None] * len(requests)

    def client(k):
        body = {"rows": [rows[i] if not isinstance(rows[i], dict) or "id" in rows[i] else {**rows[i], "id": i}
                         for i in requests[k]]}
        answers[k] = post(server.url, "/score", body)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, idx in enumerate(requests):
        assert answers[k].status_code == 200, answers[k].text
        results = answers[k].json()["results"]
        assert len(results) == len(idx)
        for i, result in zip(idx, results):
            if i in by_index:
                assert result["error"] == by_index[i] and set(result) == {"id", "error"}
            else:
                assert_close(result, expected[i])


def test_per_token_and_reward_variant_from_the_same_pass(server, rng):
    rows = good_rows(rng, 5)
    gamma = round(rng.uniform(0.3, 0.95), 3)
    model, tokenizer = fixture_model()
    for options in ({}, {"gamma": gamma, "terminal": "bootstrap"}, {"reduce": "mean"}):
        answer = post(server.url, "/score", {"rows": rows, "per_token": True, **options})
        assert answer.status_code == 200, answer.text
        rm = EndoRM(model, tokenizer, **options)
        expected = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows], per_token=True)
        for got, want in zip(answer.json()["results"], expected):
            assert math.isclose(got["reward"], want.reward, rel_tol=RTOL, abs_tol=RTOL), (options, got, want)
            assert len(got["token_rewards"]) == got["num_tokens"] == want.num_tokens
            for a, b in zip(got["token_logprobs"], want.token_logprobs):
                assert math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL)
        if not options:  # the server's own options: per-token rewards as offline
            for got, want in zip(answer.json()["results"], expected):
                for a, b in zip(got["token_rewards"], want.token_rewards):
                    assert math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL)


def test_self_certainty_variant_by_name(server, rng):
    """``variant`` names a reward variant: self-certainty equals the library's; an unknown name is a 422 listing them."""
    rows = good_rows(rng, 4)
    answer = post(server.url, "/score", {"rows": rows, "variant": "self-certainty"})
    assert answer.status_code == 200, answer.text
    model, tokenizer = fixture_model()
    expected = EndoRM(model, tokenizer).score([r["prompt"] for r in rows], [r["response"] for r in rows],
                                              self_certainty=True)
    for got, want in zip(answer.json()["results"], expected):
        assert math.isclose(got["reward"], want.self_certainty, rel_tol=RTOL, abs_tol=RTOL), (got, want)
        assert got["reward_mean"] == got["reward"]
    bad = post(server.url, "/score", {"rows": rows, "variant": "certainty"})
    assert bad.status_code == 422 and "self-certainty" in bad.text
    assert post(server.url, "/score", {"rows": rows, "variant": "mean", "gamma": 0.5}).status_code == 422


def joint_rows(queries, prompts):
    """What the policy produced, read independently of the server: the query tokenized once, its first tokens the
    prompt's own tokens (the prompts here end in a word and the responses start with a space)."""
    _, tokenizer = fixture_model()
    rows = []
    for q, p in zip(queries, prompts):
        full, head = tokenizer(q)["input_ids"], tokenizer(p)["input_ids"]
        assert full[: len(head)] == head
        rows.append({"prompt_ids": head, "response_ids": full[len(head):]})
    return rows


def test_get_reward_openrlhf_layout(server, rng):
    rows = good_rows(rng, 6)
    prompts = [r["prompt"] for r in rows]
    queries = [r["prompt"] + r["response"] for r in rows]
    answer = post(server.url, "/get_reward", {"query": queries, "prompts": prompts, "labels": [""] * len(rows)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rewards = body["rewards"]
    # the tokens the policy produced (one tokenization of the query) through /score give the same rewards
    scored = post(server.url, "/score", {"rows": joint_rows(queries, prompts)}).json()["results"]
    assert rewards == pytest.approx([s["reward"] for s in scored], rel=RTOL, abs=RTOL)
    # scores: sigmoid of the mean token reward (--score-scale 1), strictly inside (0, 1)
    expected = [1 / (1 + math.exp(-s["reward_mean"])) for s in scored]
    assert body["scores"] == pytest.approx(expected, rel=RTOL, abs=RTOL) and all(0 < x < 1 for x in body["scores"])
    assert body["errors"] == [None] * len(rows) and body["extra_logs"] == {"unscorable": [0.0] * len(rows)}
    # a rendered prompt that starts with the BOS text is not given a second BOS
    with_bos = post(server.url, "/get_reward", {"query": ["<s>" + q for q in queries], "prompts": ["<s>" + p for p in prompts]})
    assert with_bos.json()["rewards"] == pytest.approx(rewards, rel=RTOL, abs=RTOL)
    # one sample that cannot be scored is null with its reason; the others are scored (status 200: OpenRLHF drops
    # a sample's reward silently on any other status)
    broken = post(server.url, "/get_reward", {"query": [queries[0], "something else", prompts[1]],
                                              "prompts": [prompts[0], "zzz", prompts[1]], "labels": [1, 2, 3]})
    assert broken.status_code == 200, broken.text
    got = broken.json()
    assert got["rewards"][0] == pytest.approx(rewards[0], rel=RTOL, abs=RTOL) and got["rewards"][1:] == [None, None]
    assert got["scores"][1:] == [None, None]
    errors = got["errors"]
    assert errors[0] is None and "does not start with its prompt" in errors[1] and "no tokens" in errors[2]
    assert got["extra_logs"] == {"unscorable": [0.0, 1.0, 1.0]}  # numbers only: OpenRLHF makes each a tensor


def test_a_truncated_prompt_splits_at_the_common_prefix(server, rng):
    """OpenRLHF cuts long prompts: the query then starts with only part of its prompt text."""
    row = good_rows(rng, 1)[0]
    query = row["prompt"] + row["response"]
    cut = row["prompt"] + "\n" + sentence(rng)  # the prompt as sent: longer than what the query kept
    got = post(server.url, "/get_reward", {"query": [query], "prompts": [cut]}).json()
    assert got["rewards"][0] == pytest.approx(
        post(server.url, "/get_reward", {"query": [query], "prompts": [row["prompt"]]}).json()["rewards"][0],
        rel=RTOL, abs=RTOL)


def test_a_prompt_that_lost_its_first_words_splits_after_its_end(server, rng):
    """OpenRLHF keeps a long prompt's last tokens: the query starts inside its prompt."""
    row = good_rows(rng, 1)[0]
    head = sentence(rng)
    full_prompt = head + " " + row["prompt"]
    query = row["prompt"] + row["response"]  # the prompt's first words are gone
    got = post(server.url, "/get_reward", {"query": [query], "prompts": [full_prompt]}).json()
    expected = post(server.url, "/get_reward", {"query": [query], "prompts": [row["prompt"]]}).json()
    assert got["errors"] == [None] and got["rewards"][0] == pytest.approx(expected["rewards"][0], rel=RTOL, abs=RTOL)


def test_slime_reward_one_bare_object(server, rng):
    """slime's remote reward model posts one {prompt, response, label} object and reads the reward key."""
    row = good_rows(rng, 1)[0]
    answer = post(server.url, "/reward", {"prompt": row["prompt"], "response": row["response"], "label": "x"})
    assert answer.status_code == 200, answer.text
    expected = post(server.url, "/get_reward", {"query": [row["prompt"] + row["response"]],
                                                "prompts": [row["prompt"]]}).json()["rewards"][0]
    assert answer.json()["reward"] == pytest.approx(expected, rel=RTOL, abs=RTOL)
    empty = post(server.url, "/reward", {"prompt": row["prompt"], "response": ""}).json()
    assert empty["reward"] is None and "no tokens" in empty["error"]
    assert post(server.url, "/reward", {"prompt": 1, "response": "a"}).status_code == 422


def test_inputs_json_lets_through_are_answered_not_crashed(server, rng):
    """Deep nesting, a non-finite id and a lone surrogate: 400 or a per-row error, never a 500."""
    deep = b'{"rows": ' + b"[" * 20000 + b"]" * 20000 + b"}"  # far past the parser's recursion limit
    assert post(server.url, "/score", deep).status_code == 400
    rows = good_rows(rng, 2)
    odd = [{"id": float("inf"), "prompt": "a", "response": " b"}, {"id": float("nan"), "prompt": "a", "response": " b"},
           {"id": "s", "prompt": "a \udc00", "response": " b"}]
    content = json.dumps({"rows": [rows[0], *odd, rows[1]]})  # Infinity and NaN as Python's JSON writes them
    answer = post(server.url, "/score", content)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [("error" in r) for r in results] == [False, True, True, True, False]
    assert "finite" in results[1]["error"] and "lone surrogate" in results[3]["error"]
    surrogate = post(server.url, "/get_reward", json.dumps({"query": ["a \udc00 b"], "prompts": ["a"]})).json()
    assert surrogate["rewards"] == [None] and "lone surrogate" in surrogate["errors"][0]


def test_health_names_the_model_not_its_path(server):
    health = httpx.get(server.url + "/health", timeout=HANG_S).json()
    assert health["model"] == os.path.basename(FIXTURE) and "/" not in health["model"]


@pytest.mark.parametrize("body, status, words", [
    (b'{"rows": [', 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    ([1, 2], 422, "JSON object"),
    ({"row": []}, 422, "unknown field"),
    ({"rows": {"prompt": "a"}}, 422, "'rows' must be a list"),
    ({"rows": [], "per_token": "yes"}, 422, "per_token"),
    ({"rows": [], "gamma": "high"}, 422, "gamma"),
    ({"rows": [], "terminal": "end"}, 422, "terminal"),
    ({"query": "a b", "prompts": ["a"]}, 422, "'query' must be a list"),
    ({"query": ["a b"], "prompts": ["a", "b"]}, 422, "1 queries but 2 prompts"),
    ({"prompt": "a", "response": ["b"]}, 422, "must be strings"),
])
def test_bad_requests_name_the_problem(server, body, status, words):
    path = "/get_reward" if isinstance(body, dict) and "query" in body else "/score"
    path = "/reward" if isinstance(body, dict) and "response" in body else path
    answer = post(server.url, path, body)
    assert answer.status_code == status and words in answer.text, answer.text


def test_body_size_limit(server, rng):
    rows = good_rows(rng, 1)
    rows[0]["padding"] = "x" * 70000
    answer = post(server.url, "/score", {"rows": rows})
    assert answer.status_code == 413 and "--max-body-bytes" in answer.text
    # without a Content-Length (chunked), the limit holds while reading
    chunks = iter([json.dumps({"rows": rows}).encode()])
    answer = httpx.post(server.url + "/score", content=chunks, headers=AUTH, timeout=HANG_S)
    assert answer.status_code == 413


def test_access_needs_the_key_but_health(server, rng):
    body = {"rows": good_rows(rng, 1)}
    assert post(server.url, "/score", body, headers={}).status_code == 401
    wrong = post(server.url, "/score", body, headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert post(server.url, "/score", body, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(server.url + "/metrics", timeout=HANG_S).status_code == 401
    assert httpx.get(server.url + "/health", timeout=HANG_S).json()["status"] == "ok"
    assert post(server.url, "/score", body).status_code == 200


def test_metrics_count_requests_rows_and_errors(server, rng):
    def read():
        text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=HANG_S).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = read()
    n = rng.randint(2, 6)
    post(server.url, "/score", {"rows": good_rows(rng, n) + [{"prompt": "x"}]})
    post(server.url, "/score", b"{")
    after = read()
    assert after["endokern_rows_total"] - before["endokern_rows_total"] == n + 1
    assert after["endokern_row_errors_total"] - before["endokern_row_errors_total"] == 1
    key = 'endokern_requests_total{path="/score",code="400"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["endokern_tokens_total"] > before["endokern_tokens_total"]
    assert after["endokern_request_duration_seconds_count"] >= before["endokern_request_duration_seconds_count"] + 2
    assert after["endokern_queue_tokens"] == 0


def test_a_client_that_goes_away_does_not_stall_the_others(server, rng):
    rows = good_rows(rng, 3)
    with pytest.raises(httpx.TimeoutException):
        post(server.url, "/score", {"rows": good_rows(rng, 40)}, timeout=0.001)
    answer = post(server.url, "/score", {"rows": rows})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 3
    assert httpx.get(server.url + "/health", timeout=HANG_S).json()["status"] == "ok"


def encoded_length(rows):
    model, tokenizer = fixture_model()
    encoder = EndoRM(model, tokenizer, verify_head=False).encoder("auto")
    return sum(e.length for e in encoder.encode([TextExample(r["prompt"], r["response"]) for r in rows]))


def wait_queued(srv, condition, timeout=HANG_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(srv.url + "/health", timeout=HANG_S).json()
        if condition(health):
            return health
        time.sleep(0.02)
    raise AssertionError("the server's queue never reached the expected state")


def test_full_queue_answers_503_then_recovers(rng):
    # The oldest request waits (up to 60 s) for company until a step's worth of tokens is queued: the queue can be
    # filled on purpose, then a filler that reaches the step releases it.
    queue, step = 400, 380
    srv = Server("--max-queue-tokens", queue, "--step-tokens", step, "--max-wait-ms", 60000)
    try:
        first = good_rows(rng, 8)
        a = encoded_length(first)
        assert a < step
        results = {}
        thread = threading.Thread(target=lambda: results.setdefault("first", post(srv.url, "/score", {"rows": first})))
        thread.start()
        wait_queued(srv, lambda h: h["queue_tokens"] == a)
        over = []
        while encoded_length(over) <= queue - a:
            over += good_rows(rng, 1)
        full = post(srv.url, "/score", {"rows": over})
        assert full.status_code == 503 and full.headers["Retry-After"] == "1" and "queue is full" in full.text
        huge = post(srv.url, "/score", {"rows": good_rows(rng, 200)})
        assert huge.status_code == 413 and "--max-queue-tokens" in huge.text
        filler = []
        while encoded_length(filler) < step - a:
            filler.append({"prompt": "a", "response": " " + rng.choice(WORDS)})
        assert a + encoded_length(filler) <= queue
        assert post(srv.url, "/score", {"rows": filler}).status_code == 200
        thread.join(60)
        assert results["first"].status_code == 200 and len(results["first"].json()["results"]) == len(first)
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_sigterm_finishes_requests_in_flight_then_exits(tmp_path, rng):
    srv = Server("--max-wait-ms", 3000)  # requests wait in the queue long enough to be in flight at SIGTERM
    rows = [good_rows(rng, 3) for _ in range(4)]
    answers = [None] * len(rows)
    try:
        threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, post(srv.url, "/score", {"rows": rows[k]},
                                                                                  headers={})))
                   for k in range(len(rows))]
        for t in threads:
            t.start()
        wait_queued(srv, lambda h: h["queue_requests"] == len(rows))
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert srv.proc.wait(60) == 0, "".join(srv.log)
    finally:
        srv.stop()
    flat = [r for request in rows for r in request]
    offline, _ = offline_score(tmp_path, flat)
    served = [r for answer in answers for r in answer.json()["results"]]
    assert all(a.status_code == 200 for a in answers)
    for got, want in zip(served, offline):
        assert_close(got, want)
    assert "stopped" in "".join(srv.log)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)


class RecordingModel:
    """A stand-in for EndoRM.score_encoded: records each call's examples; reward = the example's length."""

    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def score_encoded(self, encoded, per_token=False, self_certainty=False):
        self.calls.append([e.length for e in encoded])
        if self.fail:
            raise RuntimeError("the model failed")
        return [ScoreResult(e.length, 0.0, e.length, 0.0, len(e.response_ids)) for e in encoded]


def test_batcher_merges_requests_up_to_the_step(rng):
    model = RecordingModel()
    requests = [[Encoded([1] * rng.randint(1, 9), [2] * rng.randint(1, 9)) for _ in range(4)] for _ in range(16)]
    total = sum(e.length for r in requests for e in r)
    # The oldest request waits for company until the step's tokens are queued: all 16 requests run as one call.
    batcher = Batcher(model, max_wait_s=120, step_tokens=total, max_queue_tokens=total)
    done = threading.Semaphore(0)
    results = [None] * len(requests)

    def deliver(k):
        def f(res, err):
            results[k] = (res, err)
            done.release()
        return f

    for k, r in enumerate(requests):
        assert batcher.submit(r, False, deliver(k)) is not None
    for _ in requests:
        assert done.acquire(timeout=HANG_S)
    assert model.calls == [[e.length for r in requests for e in r]]
    for r, (res, err) in zip(requests, results):
        assert err is None and [x.reward for x in res] == [e.length for e in r]
    # past the queue's limit: refused, nothing queued
    assert batcher.submit([Encoded([1] * total, [2])], False, deliver(0)) is None
    assert batcher.queued_tokens == 0 and batcher.queued_requests == 0
    batcher.close()

    # A step holds whole requests up to step_tokens; a cancelled request is dropped; a failure reaches every request
    model = RecordingModel()
    sizes = [rng.randint(5, 20) for _ in range(12)]
    step = max(sizes) + rng.randint(0, 30)
    batcher = Batcher(model, max_wait_s=0, step_tokens=step, max_queue_tokens=10**6)
    with batcher._cond:  # hold the scorer while queueing, so the steps are decided by the sizes alone
        items = [batcher.submit([Encoded([1], [2] * (s - 1))], False, deliver(0)) for s in sizes]
        items[5].cancelled = True
    for _ in range(len(sizes) - 1):
        assert done.acquire(timeout=HANG_S)
    batcher.close()
    kept = [s for i, s in enumerate(sizes) if i != 5]
    assert [s for call in model.calls for s in call] == kept
    assert all(sum(call) <= step for call in model.calls)
    for a, b in zip(model.calls, model.calls[1:]):  # greedy: the next request did not fit
        assert sum(a) + b[0] > step

    failing = Batcher(RecordingModel(fail=True), max_wait_s=0, step_tokens=100, max_queue_tokens=100)
    errors = []
    failing.submit([Encoded([1], [2])], False, lambda res, err: (errors.append(err), done.release()))
    assert done.acquire(timeout=HANG_S)
    failing.close()
    assert isinstance(errors[0], RuntimeError) and "the model failed" in str(errors[0])


def test_a_large_request_shares_the_steps_with_a_small_one_behind_it(rng):
    """A request is queued in pieces of at most a step: a 1-row request that arrives behind a large one is scored in
    the second step, not after all of the large one."""
    model = RecordingModel()
    step = rng.randint(20, 40)
    big = [Encoded([1], [2] * rng.randint(3, 9)) for _ in range(rng.randint(30, 60))]
    small = [Encoded([1], [3])]  # 2 tokens: no piece of the large request has that length
    batcher = Batcher(model, max_wait_s=0, step_tokens=step, max_queue_tokens=10**6)
    order, done = [], threading.Semaphore(0)
    with batcher._cond:  # hold the scorer while queueing
        batcher.submit(big, False, lambda res, err: (order.append(("big", res)), done.release()))
        batcher.submit(small, False, lambda res, err: (order.append(("small", res)), done.release()))
    for _ in range(2):
        assert done.acquire(timeout=HANG_S)
    batcher.close()
    assert [name for name, _ in order] == ["small", "big"]
    assert len(model.calls) >= 3 and small[0].length in model.calls[0] + model.calls[1]
    assert all(sum(call) <= step or len(call) == 1 for call in model.calls)
    assert [r.reward for r in dict(order)["big"]] == [e.length for e in big]  # in order, every piece


def _byte_level_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2's scheme), trained here on the test words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>"],
                                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>")


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_a_query_is_split_from_one_tokenization(rng, kind):
    """The response is the query's own tokens after the prompt's: prompt_ids + response_ids is the one tokenization
    of the query (SentencePiece, where a separate tokenization of the response adds a word-start piece, and
    byte-level BPE)."""
    from endokern.serve import query_row

    tokenizer = fixture_model()[1] if kind == "sentencepiece" else _byte_level_tokenizer()
    for _ in range(20):
        prompt = sentence(rng)
        response = rng.choice([" ", "", "\n"]) + sentence(rng)
        row = query_row(tokenizer, prompt + response, prompt, None, joint=True)
        full = tokenizer(prompt + response)["input_ids"]
        assert row["prompt_ids"] + row["response_ids"] == full
        decoded = tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
        assert prompt.startswith(decoded.strip()) or decoded.strip().startswith(prompt.strip())
        assert row["response_ids"]
    with pytest.raises(ValueError, match="no tokens"):
        query_row(tokenizer, "a cat", "a cat", None, joint=True)


def test_strict_refuses_and_request_timeout_answers_504(tmp_path, rng):
    srv = Server("--strict", "--request-timeout", "0.001", "--max-length", MAX_LENGTH, env={"ENDOKERN_API_KEY": KEY})
    try:
        rows = good_rows(rng, 30)
        slow = post(srv.url, "/score", {"rows": rows})
        assert slow.status_code == 504 and "request-timeout" in slow.text
        assert any("504" in line for line in srv.log)  # answers past 400 are logged with their reason
    finally:
        assert srv.stop() == 0, "".join(srv.log)
    srv = Server("--unscorable-reward=-1e4", "--max-length", MAX_LENGTH, env={"ENDOKERN_API_KEY": KEY})
    try:  # a fixed reward for what cannot be scored (OpenRLHF fails on null), the reason still given
        got = post(srv.url, "/get_reward", {"query": ["x"], "prompts": ["zzz"]}).json()
        assert got["rewards"] == [-1e4] and got["extra_logs"] == {"unscorable": [1.0]} and got["errors"][0]
        assert post(srv.url, "/reward", {"prompt": "a", "response": ""}).json()["reward"] == -1e4
    finally:
        assert srv.stop() == 0, "".join(srv.log)
    srv = Server("--strict", "--max-length", MAX_LENGTH, env={"ENDOKERN_API_KEY": KEY})
    try:
        row = good_rows(rng, 1)[0]
        refused = post(srv.url, "/get_reward", {"query": [row["prompt"] + row["response"], "x"],
                                                "prompts": [row["prompt"], "zzz"]})
        assert refused.status_code == 422 and refused.json()["detail"]["errors"][0]["index"] == 1
        assert post(srv.url, "/reward", {"prompt": row["prompt"], "response": ""}).status_code == 422
    finally:
        assert srv.stop() == 0, "".join(srv.log)


def test_answers_go_out_without_waiting_for_a_delayed_ack():
    """The server's connections have TCP_NODELAY (an answer's headers and body are two writes: without it the body
    waited for the client's delayed ACK, about 40 ms a request on a kept-alive connection)."""
    import asyncio
    import socket

    from endokern.serve import listening_socket

    async def check():
        seen = []

        async def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        return seen

    assert asyncio.run(asyncio.wait_for(check(), HANG_S)) == [1]
