"""Memory of a long `endokern score` run: it must stay flat as rows stream through (SPEC section 3).

Writes --rows short rows to a JSONL file, runs `endokern score` on them in a subprocess with the
stories260K test model, samples the subprocess's resident set every 0.2 s, and prints it against the
rows committed so far (from the run's checkpoint). Flat means the resident set after the first few
chunks does not grow with the number of rows.

    python benchmarks/stream_memory.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "fixtures" / "stories260K"
WORDS = "the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was".split()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rows_done(checkpoint: Path) -> int:
    try:
        return json.loads(checkpoint.read_text())["rows_done"]
    except (OSError, ValueError, KeyError):
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", default=str(HERE / "results" / "stream-memory.json"))
    args = parser.parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "rows.jsonl", Path(tmp) / "scored.jsonl"
        with open(src, "w") as f:
            for _ in range(args.rows):
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
                response = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        cmd = [sys.executable, "-m", "endokern", "score", "--model", str(FIXTURE), "--input", str(src),
               "--output", str(out), "--no-progress"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = []
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - start, rows_done(Path(str(out) + ".progress.json")),
                                rss_mb(proc.pid)))
            except OSError:
                break
            time.sleep(0.2)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"endokern score failed:\n{err}")
        seconds = time.perf_counter() - start
        written = sum(1 for _ in open(out))
    marks = []
    for fraction in (0.05, 0.25, 0.5, 0.75, 1.0):
        target = fraction * args.rows
        hit = next((s for s in samples if s[1] >= target), samples[-1])
        marks.append({"rows_done": hit[1], "rss_mb": round(hit[2], 1), "seconds": round(hit[0], 1)})
    peak = max(s[2] for s in samples)
    print(f"{args.rows} rows scored ({written} written) in {seconds:.1f} s, {args.rows / seconds:,.0f} rows/s")
    print("| rows committed | resident MB | s |\n| ---: | ---: | ---: |")
    for m in marks:
        print(f"| {m['rows_done']} | {m['rss_mb']} | {m['seconds']} |")
    print(f"peak resident set {peak:.1f} MB")
    Path(args.out).write_text(json.dumps({"rows": args.rows, "seconds": seconds, "marks": marks, "peak_rss_mb": peak},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
