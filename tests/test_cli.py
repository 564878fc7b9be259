"""The command line end to end with the stories260K fixture (SPEC section 4)."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from limits import HANG_S
from model_utils import FIXTURE, fixture_model

from endokern import EndoRM
from endokern.cli import main
from endokern.layouts import grid_accuracy, summarize_preferences

WORDS = ("the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was went to "
         "a in on with her his they saw").split()


def sentence(rng, low=2, high=14):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(*args):
    assert main([*map(str, args), "--model", FIXTURE, "--no-progress"]) == 0


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def library_rewards(prompts, responses, **kwargs):
    model, tokenizer = fixture_model()
    return EndoRM(model, tokenizer, **kwargs).score(prompts, responses, per_token=True)


def test_score_fields_ids_and_values(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(23)]
    for i in range(0, 23, 3):
        rows[i]["id"] = f"row-{i}"
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_cli("score", "--input", src, "--output", out, "--per-token", "--alpha", "0.8", "--gamma", "0.95",
            "--terminal", "bootstrap", "--reduce", "mean", "--chunk-rows", "7")
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [row.get("id", i) for i, row in enumerate(rows)]
    expected = library_rewards([r["prompt"] for r in rows], [r["response"] for r in rows], alpha=0.8, gamma=0.95,
                               terminal="bootstrap", reduce="mean")
    for r, e in zip(got, expected):
        assert set(r) == {"id", "reward", "reward_mean", "logprob", "num_tokens", "token_rewards", "token_logprobs"}
        assert r["num_tokens"] == e.num_tokens == len(r["token_rewards"]) == len(r["token_logprobs"])
        # The command batches rows differently from the library call, which rounds Q and V apart by about 1e-5
        # relative (see SPEC's batching note); r_h = Q_h - gamma V(s_{h+1}) cancels, so its error is bounded by
        # that share of |Q_h| + gamma |V(s_{h+1})|, not of |r_h|.
        following = e.token_values[1:] + [e.final_value]
        scale = [abs(q) + 0.95 * abs(v) for q, v in
                 zip((t + 0.95 * v for t, v in zip(e.token_rewards, following)), following)]
        log_scale = [abs(lp * 0.8 + v) + abs(v) for lp, v in zip(e.token_logprobs, e.token_values)]  # |Q| + |V(s_h)|
        for got_r, want_r, bound in zip(r["token_rewards"], e.token_rewards, scale):
            assert abs(got_r - want_r) <= 1e-5 * bound
        assert abs(r["reward"] - e.reward) <= 1e-5 * sum(scale) / len(scale)  # reduce="mean"
        assert abs(r["reward_mean"] - e.reward_mean) <= 1e-5 * sum(scale) / len(scale)
        assert abs(r["logprob"] - e.logprob) <= 1e-5 * sum(log_scale)
    assert not os.path.exists(tmp_path / "out.errors.jsonl") or not read_jsonl(tmp_path / "out.errors.jsonl")


def test_malformed_rows_go_to_the_errors_file_and_the_run_goes_on(tmp_path, rng):
    # a good row never reaches --max-length 60: at most 6 + 6 words of at most 4 tokens, plus a BOS
    good = [{"prompt": sentence(rng, 2, 6), "response": " " + sentence(rng, 2, 6)} for _ in range(6)]
    rows = good[:2] + [{"prompt": "x"}, {"prompt": "x", "response": ""}, {"id": "long", "prompt": "the " * 80,
                                                                         "response": " cat"}] + good[2:]
    src = write_jsonl(tmp_path / "in.jsonl", rows, raw_lines=["{not json", "[1, 2]", json.dumps(good[0])])
    out = tmp_path / "out.jsonl"
    run_cli("score", "--input", src, "--output", out, "--max-length", "60", "--chunk-rows", "4")
    scored, errors = read_jsonl(out), read_jsonl(tmp_path / "out.errors.jsonl")
    assert len(scored) + len(errors) == len(rows) + 3
    reasons = {e["row"]: e["reason"] for e in errors}
    assert set(reasons) == {2, 3, 4, 9, 10}
    assert "missing field 'response'" in reasons[2]
    assert "empty" in reasons[3]
    assert "more than --max-length 60" in reasons[4] and errors[2]["id"] == "long"
    assert "bad JSON" in reasons[9]
    assert "not a JSON object" in reasons[10]
    assert [r["id"] for r in scored] == [0, 1, 5, 6, 7, 8, 11]


def test_parquet_and_gzip_in_and_out(tmp_path, rng):
    rows = [{"id": i, "prompt": sentence(rng), "response": " " + sentence(rng)} for i in range(9)]
    import pyarrow as pa

    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    run_cli("score", "--input", src, "--output", tmp_path / "pq.parquet", "--chunk-rows", "4")
    run_cli("score", "--input", src, "--output", tmp_path / "gz.jsonl.gz", "--chunk-rows", "4")
    from_parquet = pq.read_table(tmp_path / "pq.parquet").to_pylist()
    from_gz = read_jsonl(tmp_path / "gz.jsonl.gz")
    assert [r["id"] for r in from_parquet] == list(range(9)) == [r["id"] for r in from_gz]
    assert [r["reward"] for r in from_parquet] == [r["reward"] for r in from_gz]
    assert not os.path.exists(tmp_path / "pq.parquet.parts")


def test_standard_streams(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in rows) + "oops\n"
    done = subprocess.run(
        [sys.executable, "-m", "endokern", "score", "--model", FIXTURE, "--input", "-", "--output", "-"],
        input=lines, capture_output=True, text=True, timeout=HANG_S,
    )
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in out] == [0, 1, 2, 3, 4]
    assert '"row": 5' in done.stderr and "bad JSON" in done.stderr


def test_compare_layouts_margins_and_summary(tmp_path, rng):
    def resp():
        return " " + sentence(rng)

    pair = {"id": "p", "prompt": sentence(rng), "chosen": resp(), "rejected": resp()}
    grid = {"id": "g", "subset": "grid", "prompt": sentence(rng), "chosen": [resp() for _ in range(3)],
            "rejected": [resp() for _ in range(3)]}
    llmbar = {"input": sentence(rng), "output_1": resp(), "output_2": resp(), "label": 2}
    hh_head = f"\n\nHuman: {sentence(rng)}\n\nAssistant: {sentence(rng)}\n\nHuman: {sentence(rng)}\n\nAssistant:"
    hh = {"chosen": hh_head + resp(), "rejected": hh_head + resp()}
    src = write_jsonl(tmp_path / "pairs.jsonl", [pair, grid, llmbar, hh, {"chosen": "a", "rejected": "b"}])
    out = tmp_path / "cmp.jsonl"
    run_cli("compare", "--input", src, "--output", out)
    rows = read_jsonl(out)
    errors = read_jsonl(tmp_path / "cmp.errors.jsonl")
    assert len(rows) == 4 and [e["row"] for e in errors] == [4] and "Assistant" in errors[0]["reason"]
    rewards = library_rewards(
        [pair["prompt"]] * 2 + [grid["prompt"]] * 6 + [llmbar["input"]] * 2 + [hh_head] * 2,
        [pair["chosen"], pair["rejected"], *grid["chosen"], *grid["rejected"], llmbar["output_2"],
         llmbar["output_1"], hh["chosen"][len(hh_head):], hh["rejected"][len(hh_head):]],
    )
    r = [x.reward for x in rewards]
    assert rows[0]["id"] == "p" and rows[0]["margin"] == pytest.approx(r[0] - r[1], rel=1e-5, abs=1e-5)
    margins = [[r[2 + i] - r[5 + j] for j in range(3)] for i in range(3)]
    flat = [m for line in rows[1]["margins"] for m in line]
    assert flat == pytest.approx([m for line in margins for m in line], rel=1e-5, abs=1e-5)
    for name, value in grid_accuracy(margins).items():
        assert rows[1][name] == value
    assert rows[2]["id"] == 2 and rows[2]["margin"] == pytest.approx(r[8] - r[9], rel=1e-5, abs=1e-5)
    assert rows[3]["margin"] == pytest.approx(r[10] - r[11], rel=1e-5, abs=1e-5)
    summary = json.loads((tmp_path / "cmp.summary.json").read_text())
    assert summary["rows"] == 4 and summary["errors"] == 1
    assert summary["accuracy"] == pytest.approx(summarize_preferences(rows)["accuracy"])
    assert summary["subsets"]["grid"]["rows"] == 1 and "easy" in summary["subsets"]["grid"]
    assert summary["run"]["rows"] == 5 and summary["run"]["tokens_per_s"] > 0


def test_summary_counts_ties_half_and_splits_the_grid():
    rows = [{"margin": 1.0}, {"margin": 0.0}, {"margin": -2.0}, {"margin": 0.5, "subset": "a"}]
    s = summarize_preferences(rows)
    assert s["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and s["ties"] == 1
    assert s["subsets"] == {"a": {"rows": 1, "accuracy": 1.0, "ties": 0}}
    # chosen style i (rows) against rejected style j (columns): below the diagonal is easy, above is hard
    margins = [[1.0, -1.0, -1.0], [1.0, 0.0, -1.0], [1.0, 1.0, -1.0]]
    assert grid_accuracy(margins) == {"easy": 1.0, "normal": 0.5, "hard": 0.0}


def test_rank_picks_the_best(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "responses": [" " + sentence(rng) for _ in range(rng.randint(1, 5))]}
            for _ in range(6)]
    rows.append({"prompt": "a", "responses": []})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("rank", "--input", src, "--output", tmp_path / "ranked.jsonl")
    ranked = read_jsonl(tmp_path / "ranked.jsonl")
    assert len(ranked) == 6 and read_jsonl(tmp_path / "ranked.errors.jsonl")[0]["row"] == 6
    for row, out in zip(rows, ranked):
        expected = [x.reward for x in library_rewards([row["prompt"]] * len(row["responses"]), row["responses"])]
        assert out["rewards"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert out["best"] == max(range(len(expected)), key=lambda i: expected[i])
        assert out["best_reward"] == out["rewards"][out["best"]]


def test_filter_by_min_reward_and_top_fraction(tmp_path, rng):
    rows = [{"id": i, "prompt": sentence(rng), "response": " " + sentence(rng), "meta": i * 2} for i in range(20)]
    src = write_jsonl(tmp_path / "in.jsonl", rows + [{"id": 99, "prompt": "a"}])
    rewards = sorted(x.reward for x in library_rewards([r["prompt"] for r in rows], [r["response"] for r in rows]))
    cut = (rewards[9] + rewards[10]) / 2
    run_cli("filter", "--input", src, "--output", tmp_path / "kept.jsonl", "--min-reward", cut)
    kept, rejected = read_jsonl(tmp_path / "kept.jsonl"), read_jsonl(tmp_path / "kept.rejected.jsonl")
    assert len(kept) == 10 and len(rejected) == 10 and len(read_jsonl(tmp_path / "kept.errors.jsonl")) == 1
    assert all(r["reward"] >= cut for r in kept) and all(r["reward"] < cut for r in rejected)
    assert all("min-reward" in r["reason"] for r in rejected) and kept[0]["meta"] == kept[0]["id"] * 2
    run_cli("filter", "--input", src, "--output", tmp_path / "top.jsonl", "--top-fraction", "0.25")
    top, rest = read_jsonl(tmp_path / "top.jsonl"), read_jsonl(tmp_path / "top.rejected.jsonl")
    assert len(top) == 5 and len(rest) == 15
    assert min(r["reward"] for r in top) > max(r["reward"] for r in rest)
    assert all("top-fraction" in r["reason"] for r in rest)


def test_shards_partition_the_rows(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(17)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("score", "--input", src, "--output", tmp_path / "all.jsonl")
    full = {r["id"]: r for r in read_jsonl(tmp_path / "all.jsonl")}
    seen = []
    for k in range(3):
        out = tmp_path / f"shard{k}.jsonl"
        run_cli("score", "--input", src, "--output", out, "--num-shards", 3, "--shard-index", k)
        part = read_jsonl(out)
        assert all(r["id"] % 3 == k for r in part)
        for r in part:
            assert r["reward"] == pytest.approx(full[r["id"]]["reward"], rel=1e-5, abs=1e-5)
        seen += [r["id"] for r in part]
    assert sorted(seen) == list(range(17))
    with pytest.raises(SystemExit, match="shard-index"):  # a usage error, said before the model loads
        run_cli("score", "--input", src, "--output", tmp_path / "bad.jsonl", "--num-shards", 2, "--shard-index", 2)
    assert not (tmp_path / "bad.jsonl").exists()


def test_rerun_of_a_finished_run_changes_nothing_and_other_arguments_are_refused(tmp_path, rng, capsys):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng)} for _ in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_cli("score", "--input", src, "--output", out)
    before = out.read_bytes()
    run_cli("score", "--input", src, "--output", out)
    assert out.read_bytes() == before and "already complete" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="alpha") as refused:  # a usage error: exit 2, one line
        run_cli("score", "--input", src, "--output", out, "--alpha", "2")
    assert refused.value.code == 2
    run_cli("score", "--input", src, "--output", out, "--alpha", "2", "--overwrite")
    assert out.read_bytes() != before


def test_a_run_killed_mid_way_resumes_to_the_same_output(tmp_path, rng):
    rows = [{"prompt": sentence(rng), "response": " " + sentence(rng, 20, 60)} for _ in range(1500)]
    rows[700] = {"prompt": "no response"}
    src = write_jsonl(tmp_path / "in.jsonl", rows, raw_lines=["{broken"])
    cmd = [sys.executable, "-m", "endokern", "score", "--model", FIXTURE, "--input", src, "--chunk-rows", "50",
           "--per-token", "--no-progress"]
    reference = tmp_path / "reference.jsonl"
    subprocess.run(cmd + ["--output", str(reference)], check=True, capture_output=True, timeout=HANG_S)
    out = tmp_path / "out.jsonl"
    checkpoint = str(out) + ".progress.json"
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(cmd + ["--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + HANG_S  # it waits for 300 more committed rows, however slow the machine is
        start_rows = _rows_done(checkpoint)
        while time.time() < deadline and proc.poll() is None and _rows_done(checkpoint) < start_rows + 300:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # no clean-up of any kind
            kills += 1
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed; give it more rows"
    assert 0 < _rows_done(checkpoint) < len(rows) + 1
    done = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert "resuming after" in done.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert (tmp_path / "out.errors.jsonl").read_bytes() == (tmp_path / "reference.errors.jsonl").read_bytes()
    assert len(read_jsonl(out)) + len(read_jsonl(tmp_path / "out.errors.jsonl")) == len(rows) + 1


def _rows_done(checkpoint):
    try:
        with open(checkpoint) as f:
            return json.load(f)["rows_done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("command", [[], ["score"], ["compare"], ["rank"], ["filter"], ["explain"], ["eval"], ["backends"]])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: endokern" in capsys.readouterr().out
