"""Rows per second of one local process against `--engine ray` with 1 and 2 workers, on the same input.

Each contender is the real command in a fresh subprocess (`endokern score` on generated rows with the stories260K
test model by default; `endokern compare` on a seeded sample of a preference file with --data), timed from the
start of the process. While it runs, its committed rows are sampled every 0.05 s (the local run's checkpoint, the
Ray run's journal), which splits the time in two:

- startup: from the process start to the first committed chunk (imports, model load; for Ray also starting the
  cluster unless --address, scanning the input, starting the actors and loading one model per actor);
- steady: rows per second from the first committed chunk to the last.

The Ray overhead is reported as the extra startup seconds and the extra seconds per row of `ray-1` (one actor)
over `local`; `ray-2` shows what a second worker buys. On a CPU machine each Ray actor reserves
--num-cpus-per-worker CPUs and runs that many torch threads, while the local process uses every core: compare
`ray-2` with `local` on a two-core machine, `ray-1` with `local` per core. Measure on a quiet machine: beside another
busy process a multi-threaded local run loses far more than one-thread actors do. The outputs of all contenders are
read back and compared (the same ids; rewards within 1e-5 relative).

    python benchmarks/ray_scaling.py --rows 4000 --out benchmarks/results/ray-scaling.json
    python benchmarks/ray_scaling.py --model smollm2-135m-instruct --data ../shared/data/llmbar/LLMBar__Natural.json \\
        --rows 100 --chunk-rows 10 --out benchmarks/results/ray-scaling-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "fixtures" / "stories260K"
WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was".split()


def write_rows(path: Path, args) -> str:
    """The input file; returns the command that reads it."""
    rng = random.Random(args.seed)
    if args.data:
        with open(args.data) as f:
            rows = json.load(f) if args.data.endswith(".json") else [json.loads(line) for line in f if line.strip()]
        rows = rng.sample(rows, min(args.rows, len(rows)))
        command = "compare"
    else:
        rows = []
        for _ in range(args.rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            response = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
            rows.append({"prompt": prompt, "response": response})
        command = "score"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return command


def committed(name: str, out: Path) -> int:
    """Rows committed so far by a run (0 before its first chunk)."""
    try:
        if name == "local":
            return json.loads(Path(str(out) + ".progress.json").read_text())["rows_done"]
        with open(out / "_endokern" / "progress.jsonl") as f:
            return sum(json.loads(line)["rows"] for line in f if line.endswith("\n"))
    except (OSError, ValueError, KeyError):
        return 0


def read_output(name: str, out: Path) -> list:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    if name == "local":
        return pq.read_table(out).to_pylist()
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def run_one(name: str, command: str, src: Path, tmp: Path, args, total: int) -> dict:
    out = tmp / (f"{name}.parquet" if name == "local" else name)
    cmd = [sys.executable, "-m", "endokern", command, "--model", args.model, "--input", str(src), "--output", str(out),
           "--chunk-rows", str(args.chunk_rows), "--no-progress", *args.extra]
    if name != "local":
        cmd += ["--engine", "ray", "--num-workers", name.split("-")[1],
                "--num-cpus-per-worker", str(args.num_cpus_per_worker)]
        if args.address:
            cmd += ["--address", args.address]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = last = None
    rows_at_first = 0
    while proc.poll() is None:
        n = committed(name, out)
        now = time.perf_counter() - start
        if n and first is None:
            first, rows_at_first = now, n
        if n >= total and last is None:
            last = now
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    n = committed(name, out)
    if first is None:  # finished between two samples
        first, rows_at_first = wall, n
    last = last if last is not None else wall
    steady = (n - rows_at_first) / (last - first) if last > first and n > rows_at_first else None
    result = {
        "contender": name, "rows": n, "wall_s": round(wall, 3), "rows_per_s_wall": round(n / wall, 2),
        "startup_s": round(first, 3), "rows_in_first_sample": rows_at_first, "steady_s": round(last - first, 3),
        "steady_rows_per_s": None if steady is None else round(steady, 2),
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="generated rows (or rows sampled from --data)")
    parser.add_argument("--model", default=str(FIXTURE), help="default: the stories260K test model")
    parser.add_argument("--data", help="a preference file (JSON array or JSONL) to sample --rows rows from (compare)")
    parser.add_argument("--chunk-rows", type=int, default=128, help="rows per chunk (several chunks per worker)")
    parser.add_argument("--contenders", default="local,ray-1,ray-2", help="local and ray-N, comma-separated")
    parser.add_argument("--num-cpus-per-worker", type=float, default=1)
    parser.add_argument("--address", help="an existing Ray cluster (default: each Ray run starts a local one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("extra", nargs="*", help="more options for every run, after --, e.g. -- --device cpu")
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "rows.jsonl"
        command = write_rows(src, args)
        total = sum(1 for line in open(src) if line.strip())
        runs = [run_one(name, command, src, tmp, args, total) for name in contenders]
        outputs = {name: read_output(name, tmp / (f"{name}.parquet" if name == "local" else name))
                   for name in contenders}
    key = "margin" if command == "compare" else "reward"
    base = outputs[contenders[0]]
    agree = {}
    for name in contenders[1:]:
        other = outputs[name]
        same_ids = [r["id"] for r in other] == [r["id"] for r in base]
        worst = max((abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(base, other)), default=0.0)
        agree[name] = {"same_ids": same_ids, "max_rel_diff": worst}
        if not same_ids or worst > 1e-5:
            raise RuntimeError(f"{name} disagrees with {contenders[0]}: {agree[name]}")
    by_name = {r["contender"]: r for r in runs}
    overhead = {}
    if "local" in by_name:
        local = by_name["local"]
        for name, r in by_name.items():
            if name == "local":
                continue
            entry = {"extra_startup_s": round(r["startup_s"] - local["startup_s"], 3),
                     "wall_ratio_to_local": round(r["wall_s"] / local["wall_s"], 3)}
            if r["steady_rows_per_s"] and local["steady_rows_per_s"]:
                entry["extra_ms_per_row"] = round(1000 / r["steady_rows_per_s"] - 1000 / local["steady_rows_per_s"], 4)
                entry["steady_speedup_vs_local"] = round(r["steady_rows_per_s"] / local["steady_rows_per_s"], 3)
            overhead[name] = entry
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    import torch

    result = {
        "benchmark": "ray_scaling", "command": command, "model": args.model, "data": args.data, "rows": total,
        "chunk_rows": args.chunk_rows, "num_cpus_per_worker": args.num_cpus_per_worker, "address": args.address,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "ray": ray_version},
        "runs": runs, "overhead_vs_local": overhead, "agreement_with_first": agree,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
