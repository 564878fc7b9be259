"""The GPU check's steps, in order, each in its own process under its own cap, within one overall budget.

    python benchmarks/gpu/run_steps.py --out DIR [--dry-run] [--budget S] [--steps a,b] [--commit-file F]

(benchmarks/gpu_check.sh sets up the environment and calls this.) Steps, with their caps in seconds (GPU / dry run):

  preflight    preflight.py          preflight.json     versions, device, clocks, compiler, commit
  compile      precompile.py         compile.jsonl      every kernel variant, in parallel processes
  correctness  correctness.py        correctness.jsonl  the CUDA kernel tests as plain Python
  decisive     kernel_rows.py        kernels.jsonl      N=32768 D=4096 V=128256: matmul, kernel, probes, CCE, Liger
  ablation     kernel_rows.py        kernels.jsonl      every GPU_CANDIDATES launch config at that shape
  l2           l2_probe.py           probes.jsonl       HBM and L2 read bandwidth, copy, the matmul ceiling
  sweep        kernel_rows.py        kernels.jsonl      the SPEC shapes x contenders
  e2e          end_to_end.py         e2e.jsonl          random-weight Qwen2.5-0.5B, EndoRM vs Hugging Face naive

then summary.md (summarize.py) and log.txt (every step's output): eight files. A step that exits asking for a
restart (a lost CUDA context, an item past its own cap) is started again while its cap lasts and resumes after the
rows it wrote; when a step ends, each planned item without a row gets a failed row saying why (the cap, or how
the process ended, with its last output). The exit status is the number of steps that did not end cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jsonrows import EXIT_CONTEXT_LOST, EXIT_ITEM_HUNG, Rows, read_rows  # noqa: E402

# name, script and arguments, result file, cap on the GPU, cap in a dry run (seconds)
STEPS = [
    ("preflight", ["preflight.py"], "preflight.json", 25, 40),
    ("compile", ["precompile.py"], "compile.jsonl", 90, 90),
    ("correctness", ["correctness.py"], "correctness.jsonl", 50, 150),
    ("decisive", ["kernel_rows.py", "--part", "decisive"], "kernels.jsonl", 75, 45),
    ("ablation", ["kernel_rows.py", "--part", "ablation"], "kernels.jsonl", 45, 45),
    ("l2", ["l2_probe.py"], "probes.jsonl", 20, 30),
    ("sweep", ["kernel_rows.py", "--part", "sweep"], "kernels.jsonl", 100, 60),
    ("e2e", ["end_to_end.py"], "e2e.jsonl", 75, 60),
]
GPU_BUDGET = 500  # seconds for all steps: the device call's timeout_s is 540
DRY_BUDGET = 520  # the dry run's caps on a busy 2-core machine; it usually takes 2 to 4 minutes
FILES = ["preflight.json", "compile.jsonl", "correctness.jsonl", "kernels.jsonl", "probes.jsonl", "e2e.jsonl",
         "summary.md", "log.txt"]
MIN_STEP = 8  # a step is not started with fewer seconds than this left in the budget


def describe(rc):
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return {EXIT_CONTEXT_LOST: "exit 75 (CUDA context lost)", EXIT_ITEM_HUNG: "exit 76 (an item hung)"}.get(
        rc, f"exit {rc}")


def tail_of(path, lines=12, start=0):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def item_rows(path, step):
    return {r["item"]: r for r in read_rows(path) if r.get("step") == step and r.get("kind") == "item"}


def last_plan(path, step):
    plans = [r for r in read_rows(path) if r.get("step") == step and r.get("kind") == "plan"]
    return plans[-1]["items"] if plans else None


def run_step(name, cmd, path, cap, log, env=None, cwd=None, max_restarts=5):
    """Runs one step under ``cap`` seconds (restarting it on request), then fills the rows it did not write.

    Returns the step's row: status "ok" (exit 0), "capped" (killed at its cap) or "failed" (any other end)."""
    path = Path(path)
    start = time.monotonic()
    attempts, rc, timed_out = 0, None, False
    log_start = log.stat().st_size if log.exists() else 0
    while True:
        attempts += 1
        before = len(item_rows(path, name))
        with open(log, "a") as logf:
            logf.write(f"\n## {name} (cap {cap:.0f} s), attempt {attempts}: {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
            left = cap - (time.monotonic() - start)
            try:
                rc = proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the step and the workers it started
                except ProcessLookupError:
                    pass
                rc = proc.wait()
        if timed_out or rc == 0:
            break
        progressed = len(item_rows(path, name)) > before
        left = cap - (time.monotonic() - start)
        restartable = rc in (EXIT_CONTEXT_LOST, EXIT_ITEM_HUNG) or (rc < 0 and progressed)
        if not (restartable and attempts <= max_restarts and left > MIN_STEP):
            break
    seconds = time.monotonic() - start
    output = tail_of(log, 12, log_start)
    rows = Rows(path, name) if path.suffix == ".jsonl" else None
    plan = last_plan(path, name) if rows else None
    done = item_rows(path, name) if rows else {}
    missing = [item for item in (plan or []) if item not in done]
    if rows is not None:
        for i, item in enumerate(missing):
            if i == 0 and timed_out:
                reason = f"the step reached its cap of {cap:.0f} s while this item ran (or was about to start)"
            elif i == 0 and rc != 0:
                reason = f"the step process ended ({describe(rc)}) before this item's row was written; its last " \
                         f"output: {output[-800:]}"
            elif timed_out:
                reason = f"not reached: the step reached its cap of {cap:.0f} s before this item"
            else:
                reason = f"not reached: the step process ended ({describe(rc)}) before this item"
            rows.write({"kind": "item", "item": item, "status": "failed", "reason": reason, "filled": True})
    status = "ok" if rc == 0 and not timed_out else ("capped" if timed_out else "failed")
    row = {"kind": "step", "item": "(step)", "status": status, "rc": rc, "exit": describe(rc), "attempts": attempts,
           "seconds": round(seconds, 2), "cap_s": cap, "planned": len(plan) if plan is not None else None,
           "filled": len(missing)}
    if status != "ok":
        row["reason"] = (f"reached its cap of {cap:.0f} s" if timed_out else f"ended with {describe(rc)}") + \
            (f"; no plan row: its items are unknown; last output: {output[-800:]}" if plan is None and rows else "")
    if rows is not None:
        rows.write(row)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds for all steps ({GPU_BUDGET} on the GPU, "
                        f"{DRY_BUDGET} dry)")
    parser.add_argument("--steps", default=None, help="comma list of steps to run (default: all)")
    parser.add_argument("--scratch", default=None, help="references and caches (default: a temporary folder)")
    parser.add_argument("--commit-file", default=None)
    args = parser.parse_args(argv)
    wall = time.monotonic()
    chosen = args.steps.split(",") if args.steps else [s[0] for s in STEPS]
    unknown = [s for s in chosen if s not in [x[0] for x in STEPS]]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(s[0] for s in STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="endokern-gpu-check-"))
    budget = args.budget or (DRY_BUDGET if args.dry_run else GPU_BUDGET)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("TRITON_CACHE_DIR", str(scratch / "triton-cache"))
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = out / "log.txt"
    print(f"# gpu check ({'dry run' if args.dry_run else 'GPU'}): budget {budget:.0f} s, results in {out}", flush=True)
    failed = 0
    for name, script, file, gpu_cap, dry_cap in STEPS:
        if name not in chosen:
            continue
        left = budget - (time.monotonic() - wall)
        cap = min(dry_cap if args.dry_run else gpu_cap, left)
        cmd = [sys.executable, str(HERE / script[0]), *script[1:], "--out", str(out), "--scratch", str(scratch)]
        cmd += ["--dry-run"] if args.dry_run else []
        if name == "preflight" and args.commit_file:
            cmd += ["--commit-file", args.commit_file]
        if cap < MIN_STEP:
            row = {"kind": "step", "item": "(step)", "status": "failed", "seconds": 0, "cap_s": cap,
                   "reason": f"not started: {left:.0f} s left of the {budget:.0f} s budget"}
            if file.endswith(".jsonl"):
                Rows(out / file, name).write(row)
        else:
            row = run_step(name, cmd, out / file, cap, log, env=env)
        if name == "preflight" and not (out / "preflight.json").exists():
            (out / "preflight.json").write_text(json.dumps({"status": "failed", "reason": row.get("reason") or
                                                            f"preflight.py wrote nothing ({row.get('exit')})",
                                                            "output": tail_of(log, 20)}, indent=1) + "\n")
        counts = {}
        for r in item_rows(out / file, name).values() if file.endswith(".jsonl") else []:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        failed += row["status"] != "ok"
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        print(f"## {name}: {row['status']} in {row.get('seconds', 0):.1f} s of {cap:.0f}"
              + (f" ({summary})" if summary else "") + (f": {row['reason'][:300]}" if row.get("reason") else ""),
              flush=True)
        if row["status"] != "ok":
            print(tail_of(log, 8), flush=True)
    try:
        import summarize

        text = summarize.summarize(out)
        (out / "summary.md").write_text(text)
        print("\n" + text, flush=True)
    except Exception as exc:  # noqa: BLE001 - the rows are what matters
        (out / "summary.md").write_text(f"summary failed: {type(exc).__name__}: {exc}\n")
        print(f"# summary failed: {type(exc).__name__}: {exc}", flush=True)
    if not args.scratch:  # references and the Triton cache of this run only
        shutil.rmtree(scratch, ignore_errors=True)
    extra = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    print(f"# gpu check: {failed} step(s) not clean; {time.monotonic() - wall:.0f} s; files: "
          f"{' '.join(f for f in FILES if (out / f).exists())}" + (f"; unexpected: {' '.join(extra)}" if extra else ""),
          flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
