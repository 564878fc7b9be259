"""Golden outputs of the command line: record every command's files with one version of the code, compare with another.

    python scripts/golden.py record /tmp/golden-before      # with the code checked out in this folder
    python scripts/golden.py record /tmp/golden-after       # after a change
    python scripts/golden.py compare /tmp/golden-before /tmp/golden-after

Each run works in one fixed folder (so that the absolute paths a checkpoint records are the same) and copies what
the commands wrote to the destination: score (JSON Lines, gzip, Parquet, shards, several inputs, standard output,
malformed rows), compare (RM-Bench, LLMBar, HH-RLHF samples), rank, filter (--min-reward, --top-fraction, --plot
skipped), eval, and the Ray engine (score, compare, filter --top-fraction). The inputs are fixed (seeded), the model
is the stories260K test fixture. ``compare`` prints every file that differs; the timing fields of summaries and
reports, and the times in messages, are masked first.
"""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/tmp/endokern-golden-work"  # fixed: checkpoints and reports record absolute paths
MODEL = os.path.join(WORK, "stories260K")  # copies, so that two checkouts record the same paths
EXAMPLES = os.path.join(WORK, "examples")
HH = os.path.join(os.environ.get("ENDOKERN_DATA", os.path.join(ROOT, "..", "shared", "data")), "hh-rlhf",
                  "harmless-base_test.jsonl.gz")
WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was went".split()
TIMING = re.compile(r"\d[\d,]*(\.\d+)? (s\b|rows/s|responses/s|tokens/s)")
SPEED_ROW = re.compile(r"^(\| [^|]+ \| (variants|judge) \|.*?)(\|[^|]*){3}\|$")  # eval's speed table: s, rows/s, tok/s
NOISE = ("Loading weights", "\x1b[", "core_worker", "it/s]", "authentication_token")  # loading bars, Ray logs
TIMING_KEYS = ("seconds", "rows_per_s", "examples_per_s", "tokens_per_s", "first_chunk_s", "s", "time_s", "wall_s")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_inputs(folder):
    rng = random.Random(13)
    os.makedirs(folder)
    lines = []
    for i in range(40):
        row = {"prompt": sentence(rng, rng.randint(1, 8)), "response": sentence(rng, rng.randint(1, 12))}
        if i % 5 == 0:
            row["id"] = f"r{i}"
        lines.append(json.dumps(row))
    lines[3] = "{not json"
    lines[8] = json.dumps({"prompt": "a"})
    lines[12] = json.dumps({"prompt": "a", "response": ""})
    lines[17] = json.dumps({"prompt": sentence(rng, 80), "response": "the end"})
    lines[21] = json.dumps([1, 2])
    lines[25] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    with open(os.path.join(folder, "rows.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "plain.jsonl"), "w") as f:  # no ids: Parquet needs one type per column
        f.write("\n".join(re.sub(r', "id": "r\d+"', "", line) for line in lines) + "\n")
    with open(os.path.join(folder, "more.jsonl"), "w") as f:
        for i in range(9):
            f.write(json.dumps({"prompt": sentence(rng, 3), "response": sentence(rng, 5)}) + "\n")
    with open(os.path.join(folder, "rank.jsonl"), "w") as f:
        for i in range(12):
            row = {"prompt": sentence(rng, 4), "responses": [sentence(rng, rng.randint(1, 9)) for _ in range(3)]}
            f.write(json.dumps(row if i != 5 else {"prompt": "x", "responses": []}) + "\n")
    with gzip.open(HH, "rt") as src, open(os.path.join(folder, "hh.jsonl"), "w") as f:
        for _ in range(6):
            f.write(src.readline())


def commands(inp, out):
    rows, plain, more, rank, hh = (os.path.join(inp, n) for n in ("rows.jsonl", "plain.jsonl", "more.jsonl",
                                                                   "rank.jsonl", "hh.jsonl"))
    prefs = [os.path.join(EXAMPLES, n) for n in ("rm-bench-sample.json", "LLMBar__Natural-sample.json",
                                                   "LLMBar__Adversarial__Neighbor-sample.json")] + [hh]
    o = lambda name: os.path.join(out, name)  # noqa: E731
    return {
        "score": ["score", "--input", rows, "--output", o("score.jsonl"), "--per-token", "--max-length", "60",
                  "--chunk-rows", "7"],
        "score-gz-shard": ["score", "--input", rows, "--output", o("shard1.jsonl.gz"), "--num-shards", "2",
                           "--shard-index", "1", "--chunk-rows", "5", "--alpha", "0.7", "--reduce", "mean"],
        "score-parquet-files": ["score", "--input", plain, more, "--output", o("two.parquet"), "--chunk-rows", "8",
                                "--terminal", "bootstrap", "--gamma", "0.9", "--limit", "45"],
        "score-stdout": ["score", "--input", more, "--output", "-"],
        "score-upper": ["score", "--input", more, "--output", o("UP.JSONL")],
        "compare": ["compare", "--input", *prefs, "--output", o("compare.jsonl"), "--chunk-rows", "9"],
        "rank": ["rank", "--input", rank, "--output", o("rank.jsonl"), "--chunk-rows", "5"],
        "filter-min": ["filter", "--input", rows, "--output", o("kept.jsonl"), "--min-reward", "-40",
                       "--chunk-rows", "10"],
        "filter-top": ["filter", "--input", rows, "--output", o("top.jsonl"), "--top-fraction", "0.4",
                       "--min-reward", "-60", "--chunk-rows", "10"],
        "eval": ["eval", "--suite", prefs[1], prefs[0], "--output", o("eval"), "--max-rows", "6", "--bootstrap", "50",
                 "--chunk-rows", "4"],
        "ray-score": ["score", "--input", plain, "--output", o("ray-score"), "--chunk-rows", "10", "--engine", "ray",
                      "--per-token"],
        "ray-compare": ["compare", "--input", *prefs[:2], "--output", o("ray-compare"), "--chunk-rows", "10",
                        "--engine", "ray"],
        "ray-filter-top": ["filter", "--input", plain, "--output", o("ray-top"), "--top-fraction", "0.5",
                           "--chunk-rows", "10", "--engine", "ray"],
    }


def record(dest):
    if os.path.exists(dest):
        raise SystemExit(f"{dest} exists")
    shutil.rmtree(WORK, ignore_errors=True)
    inp, out = os.path.join(WORK, "in"), os.path.join(WORK, "out")
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "stories260K"), MODEL)
    shutil.copytree(os.path.join(ROOT, "examples", "data"), EXAMPLES)
    write_inputs(inp)
    os.makedirs(out)
    logs = {}
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for name, args in commands(inp, out).items():
        proc = subprocess.run([sys.executable, "-m", "endokern", *args, "--model", MODEL, "--no-progress"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        logs[name] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        print(f"{name}: rc {proc.returncode}", file=sys.stderr)
    shutil.copytree(out, os.path.join(dest, "out"))
    with open(os.path.join(dest, "logs.json"), "w") as f:
        json.dump(logs, f, indent=1, sort_keys=True)


def _mask(text):
    text = re.sub(r"[\d,]*<n>", "<n>", TIMING.sub(lambda m: "<n> " + m.group(2), text))
    lines = [SPEED_ROW.sub(lambda m: m.group(1) + "| <speed> |", line) for line in text.splitlines()]
    return "\n".join(line for line in lines if not any(n in line for n in NOISE))


def _masked_json(value):
    if isinstance(value, dict):
        return {k: "<time>" if k in TIMING_KEYS or k.endswith("_per_s") else _masked_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked_json(v) for v in value]
    return value


def _same(a, b):
    if a.endswith(".json") and not a.endswith("progress.json"):
        with open(a) as fa, open(b) as fb:
            return _masked_json(json.load(fa)) == _masked_json(json.load(fb))
    if a.endswith("progress.jsonl"):  # the Ray journal: chunks in the order they finished
        with open(a) as fa, open(b) as fb:
            return sorted(fa) == sorted(fb)
    if a.endswith("report.md"):
        with open(a) as fa, open(b) as fb:
            return _mask(fa.read()) == _mask(fb.read())
    return filecmp.cmp(a, b, shallow=False)


def _flat(value, at=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{at}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flat(v, f"{at}[{i}]")
    else:
        yield at, value


def _what_differs(a, b):
    """For JSON and JSON Lines files, the first fields that differ; for text, the first lines."""
    try:
        with open(a) as fa, open(b) as fb:
            ta, tb = fa.read(), fb.read()
    except UnicodeDecodeError:
        return ""
    try:
        va = [_masked_json(json.loads(x)) for x in ta.splitlines()] if a.endswith(".jsonl") else _masked_json(
            json.loads(ta))
        vb = [_masked_json(json.loads(x)) for x in tb.splitlines()] if b.endswith(".jsonl") else _masked_json(
            json.loads(tb))
        if a.endswith("progress.jsonl"):  # the Ray journal, in the order chunks finished
            va, vb = (sorted(v, key=lambda e: e["chunk"]) for v in (va, vb))
        fa_, fb_ = dict(_flat(va)), dict(_flat(vb))
        keys = [k for k in sorted(set(fa_) | set(fb_), key=str) if fa_.get(k) != fb_.get(k)]
        return "; ".join(f"{k}: {fa_.get(k)!r} -> {fb_.get(k)!r}" for k in keys[:3]) + (" ..." if len(keys) > 3 else "")
    except ValueError:
        la, lb = _mask(ta).splitlines(), _mask(tb).splitlines()
        pairs = [(x, y) for x, y in zip(la, lb) if x != y][:2]
        return "; ".join(f"{x[:90]!r} -> {y[:90]!r}" for x, y in pairs)


def compare(a, b):
    differ = []
    files = set()
    for top in (a, b):
        for folder, _, names in os.walk(os.path.join(top, "out")):
            files.update(os.path.relpath(os.path.join(folder, n), top) for n in names)
    for rel in sorted(files):
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            differ.append(f"{rel}: only in {'the first' if os.path.exists(pa) else 'the second'}")
        elif not _same(pa, pb):
            differ.append(f"{rel}: {_what_differs(pa, pb) or 'differs'}")
    with open(os.path.join(a, "logs.json")) as fa, open(os.path.join(b, "logs.json")) as fb:
        la, lb = json.load(fa), json.load(fb)
    for name in sorted(set(la) | set(lb)):
        for key in ("rc", "stdout", "stderr"):
            xa, xb = _mask(str(la.get(name, {}).get(key))), _mask(str(lb.get(name, {}).get(key)))
            if xa != xb:
                lines = [(x, y) for x, y in zip(xa.splitlines(), xb.splitlines()) if x != y][:1]
                differ.append(f"log {name} {key}: " + "; ".join(f"{x[:80]!r} -> {y[:80]!r}" for x, y in lines))
    print(f"{len(files)} files compared; {len(differ)} differences")
    for line in differ:
        print("  " + line)
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
