"""Rows per second through each data pipeline integration against `endokern score`, same rows, same model, one run.

Contenders, run in turn for --rounds rounds (interleaved: score, datatrove, datasets, curator, score, ...):

- score: `endokern.run` of `score` on the rows' JSON Lines file, with the model already loaded (as the command's own
  timing line reports it: model load excluded);
- datatrove: a LocalPipelineExecutor pipeline, JsonlReader -> EndoRMFilter (prompt from the `prompt` metadata key, no
  threshold) -> JsonlWriter, one task, in this process;
- datasets: `Dataset.map(EndoRMMapper(...), batched=True, batch_size=512, with_rank=True)` on the same file, the cache
  off;
- curator: Curator's Pipeline with EndoRMStage under its Xenna executor (batch mode) on DocumentBatches of 512 rows,
  in a Ray worker with one CPU: its wall time includes starting Ray and loading the model in the worker, so the stage's
  own process time (Curator's stage stats) is reported beside it.

datatrove and datasets find the model loaded (the integrations keep one model per process and options). Every
contender's rewards are compared with score's (the largest relative difference). Rows are prompt + response pairs of
random words, 512 rows per scoring chunk everywhere.

    python benchmarks/pipelines.py --model smollm2-135m-instruct --rows 512 \\
        --out benchmarks/results/pipelines-smollm2-135m-instruct.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "tests" / "fixtures" / "stories260K"
WORDS = ("the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was went to a in "
         "on with her his they saw").split()
CHUNK = 512


def make_rows(n: int, seed: int):
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"id": f"r{i}", "prompt": sentence(4, 30), "response": " " + sentence(4, 60)} for i in range(n)]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def run_score(model, rows_path, work, rm):
    from endokern import Settings, run

    out = work / "score.jsonl"
    settings = Settings(command="score", model=model, input=[str(rows_path)], output=str(out), overwrite=True,
                        progress=False, chunk_rows=CHUNK)
    started = time.perf_counter()
    run(settings, rm=rm)
    seconds = time.perf_counter() - started
    return seconds, {r["id"]: r["reward"] for r in map(json.loads, out.read_text().splitlines())}, {}


def run_datatrove(model, rows_path, work, rm):
    import shutil

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from endokern.integrations.datatrove import EndoRMFilter

    docs = work / "dt-docs"
    docs.mkdir(exist_ok=True)
    with open(rows_path) as f, open(docs / "rows.jsonl", "w") as out:
        for row in map(json.loads, f):
            out.write(json.dumps({"id": row["id"], "text": row["response"], "prompt": row["prompt"]}) + "\n")
    for folder in ("dt-out", "dt-logs"):
        shutil.rmtree(work / folder, ignore_errors=True)
    started = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(docs)),
        EndoRMFilter(model, prompt_key="prompt", batch_size=CHUNK),
        JsonlWriter(str(work / "dt-out")),
    ], tasks=1, logging_dir=str(work / "dt-logs")).run()
    seconds = time.perf_counter() - started
    rewards = {}
    for name in os.listdir(work / "dt-out"):
        with gzip.open(work / "dt-out" / name, "rt") as f:
            rewards.update((d["id"], d["metadata"]["reward"]) for d in map(json.loads, f))
    return seconds, rewards, {}


def run_datasets(model, rows_path, work, rm):
    import datasets

    from endokern.integrations.datasets import EndoRMMapper

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(rows_path), split="train", cache_dir=str(work / "hf-cache"))
    started = time.perf_counter()
    mapped = ds.map(EndoRMMapper(model), batched=True, batch_size=CHUNK, with_rank=True, load_from_cache_file=False)
    seconds = time.perf_counter() - started
    return seconds, dict(zip(mapped["id"], mapped["reward"])), {}


def run_curator(model, rows_path, work, rm):
    import pandas as pd
    from nemo_curator.backends.xenna import XennaExecutor
    from nemo_curator.pipeline import Pipeline
    from nemo_curator.tasks import DocumentBatch

    from endokern.integrations.curator import EndoRMStage

    frame = pd.read_json(rows_path, lines=True)
    tasks = [DocumentBatch(dataset_name="rows", data=frame.iloc[i : i + CHUNK].reset_index(drop=True))
             for i in range(0, len(frame), CHUNK)]
    pipeline = Pipeline(name="bench", stages=[EndoRMStage(model, fields="prompt=prompt,response=response")])
    started = time.perf_counter()
    out = pipeline.run(XennaExecutor(config={"execution_mode": "batch", "logging_interval": 600}),
                       initial_tasks=tasks)
    seconds = time.perf_counter() - started
    process_s = sum(p.process_time for task in out for p in task._stage_perf if p.stage_name == EndoRMStage.name)
    rewards = {r["id"]: r["reward"] for task in out for r in task.to_pandas().to_dict(orient="records")}
    return seconds, rewards, {"stage_process_s": round(process_s, 3)}


CONTENDERS = {"score": run_score, "datatrove": run_datatrove, "datasets": run_datasets, "curator": run_curator}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = parser.parse_args()

    from endokern.integrations.datasets import load_model
    from endokern.settings import ModelSettings

    names = [n for n in args.contenders.split(",") if n]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = make_rows(args.rows, args.seed)
        rows_path = work / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rm = load_model(ModelSettings(model=args.model, device="cuda" if torch.cuda.is_available() else "cpu"))
        runs = []
        reference = None
        for round_ in range(args.rounds):
            for name in names:
                seconds, rewards, extra = CONTENDERS[name](args.model, rows_path, work, rm)
                if name == "score" and reference is None:
                    reference = rewards
                diff = None
                if reference is not None:
                    assert set(rewards) == set(reference), f"{name}: other rows than score's"
                    diff = max(abs(rewards[k] - reference[k]) / max(1.0, abs(reference[k])) for k in reference)
                runs.append({"contender": name, "round": round_, "rows": len(rewards), "seconds": round(seconds, 3),
                             "rows_per_s": round(len(rewards) / seconds, 2), "max_rel_diff_vs_score": diff, **extra})
                print(f"round {round_} {name:10s} {len(rewards) / seconds:8.2f} rows/s  {seconds:7.2f} s", flush=True)
    after = uptime()

    best = {n: max(r["rows_per_s"] for r in runs if r["contender"] == n) for n in names}
    base = best.get("score")
    lines = [f"# {args.rows} rows, model {args.model}, {args.rounds} rounds interleaved; best round per contender",
             f"# uptime before: {before}", f"# uptime after:  {after}",
             f"{'contender':10s} {'rows/s':>9s} {'vs score':>9s}  note"]
    for name in names:
        ratio = best[name] / base if base else None
        note = ""
        if name == "curator":
            stage_s = min(r["stage_process_s"] for r in runs if r["contender"] == "curator")
            note = f"stage process time alone: {args.rows / stage_s:.2f} rows/s (1 CPU worker)" if stage_s else ""
        lines.append(f"{name:10s} {best[name]:9.2f} {ratio:9.3f}  {note}" if ratio else f"{name:10s} {best[name]:9.2f}")
    print("\n".join(lines))
    if args.out:
        result = {"benchmark": "pipelines", "model": args.model, "rows": args.rows, "rounds": args.rounds,
                  "chunk_rows": CHUNK, "machine": machine, "uptime_before": before, "uptime_after": after,
                  "runs": runs, "best_rows_per_s": best,
                  "ratio_to_score": {n: round(best[n] / base, 3) for n in names} if base else None,
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
