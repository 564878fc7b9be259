"""`endokern serve` under load beside offline `endokern score` on the same rows (SPEC section 5, serving).

Writes --rows random rows, scores them offline (`endokern score` in a subprocess: the time of its run, model load
excluded, as it reports it), then starts `endokern serve` (another subprocess, same model options) and for each client
count (1, 4, 16, 64) sends all rows from that many concurrent clients, --rows-per-request rows per request (keep-alive
connections, one per client). Reports rows/s and response tokens/s, the ratio to
offline (and to the faster of two offline runs, one before and one after the server's phases: the machine may be
shared), p50/p99 request latency, errors, and the largest relative difference of a served reward from its offline one.
Then OpenRLHF's pattern: --openrlhf-clients concurrent clients each posting one sample per request to /get_reward
(query = prompt + response text), against offline `endokern score` of the same samples as the server reads them (the
query tokenized once and split at its prompt: endokern.serve.query_row). The load average (/proc/loadavg) is recorded
beside each phase. Then the memory phase: 16 clients send --memory-requests single-row requests; the server's resident set after the
first 1,000 and after all of them (flat: within 10%).

    python benchmarks/serve_load.py                     # stories260K (tests/fixtures), 2048 rows
    python benchmarks/serve_load.py --model smollm2-135m-instruct --rows 512

The goal (SPEC section 5): at 16 clients at least 0.8x the offline throughput, no errors, rewards equal, memory flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from stream_memory import rss_mb  # noqa: E402  (one reader of a process's resident set)

FIXTURE = HERE.parent / "tests" / "fixtures" / "stories260K"
WORDS = ("the cat dog girl boy sun park ran played happy sad big little tree ball home mom said and was went to a in "
         "on with her his they saw").split()


def make_rows(n: int, seed: int):
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"id": i, "prompt": sentence(4, 30), "response": " " + sentence(4, 40)} for i in range(n)]


def offline(rows_path: Path, out: Path, model_args):
    done = subprocess.run([sys.executable, "-m", "endokern", "score", "--input", str(rows_path), "--output", str(out),
                           "--no-progress", "--overwrite", *model_args], capture_output=True, text=True, check=True)
    match = re.search(r"endokern: (\d+) rows .* in ([\d.]+) s", done.stderr)
    if not match:
        raise RuntimeError("no timing line from endokern score:\n" + done.stderr[-2000:])
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return float(match.group(2)), results


class Server:
    def __init__(self, model_args):
        self.proc = subprocess.Popen([sys.executable, "-m", "endokern", "serve", "--port", "0", *model_args],
                                     stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
            if match:
                self.url = match.group(1)
                self.line = line.strip()
                break
        else:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(120)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def load(url, rows, clients, per_request, openrlhf=False):
    """Send every row once from `clients` concurrent clients; the results by id, latencies, errors, seconds. With
    ``openrlhf``, each request is OpenRLHF's: one sample to /get_reward."""
    requests = [rows[i : i + per_request] for i in range(0, len(rows), per_request)]
    lock = threading.Lock()
    cursor = [0]
    results, latencies, errors = {}, [], []

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if cursor[0] >= len(requests):
                        return
                    batch = requests[cursor[0]]
                    cursor[0] += 1
                start = time.perf_counter()
                if openrlhf:
                    body = {"query": [r["prompt"] + r["response"] for r in batch], "prompts": [r["prompt"] for r in batch],
                            "labels": [""] * len(batch)}
                    answer = http.post(url + "/get_reward", json=body)
                else:
                    answer = http.post(url + "/score", json={"rows": batch})
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
                    continue
                if openrlhf:
                    got = answer.json()
                    for r, reward, error in zip(batch, got["rewards"], got["extra_logs"]["errors"]):
                        if error is not None:
                            errors.append(error)
                        else:
                            results[r["id"]] = {"reward": reward}
                    continue
                for result in answer.json()["results"]:
                    if "error" in result:
                        errors.append(result["error"])
                    else:
                        results[result["id"]] = result

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, sorted(latencies), errors, time.perf_counter() - start


def openrlhf_reference(rows, model, model_args):
    """Offline `endokern score` of the samples as /get_reward reads them (one tokenization of the query, split at its
    prompt): (seconds, results by id)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE.parent))
    from endokern.serve import _adds_bos, query_row

    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    joint = [dict(query_row(tokenizer, r["prompt"] + r["response"], r["prompt"], bos, True), id=r["id"]) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "joint.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in joint))
        return offline(path, Path(tmp) / "out.jsonl", model_args)


def quantile(values, q):
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--openrlhf-clients", default="64", help="client counts of the OpenRLHF phase ('' to skip)")
    parser.add_argument("--memory-requests", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="the machine's name in the results file name")
    parser.add_argument("--output", default=None)
    args, model_args = parser.parse_known_args()
    model_args = ["--model", args.model, *model_args]
    name = args.name or f"{platform.machine()}-{os.cpu_count()}-threads"

    rows = make_rows(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        offline_s, reference = offline(rows_path, Path(tmp) / "out.jsonl", model_args)
    tokens = sum(r["num_tokens"] for r in reference.values())  # response tokens
    report = {"machine": name, "platform": platform.platform(), "processor": platform.processor(),
              "model": os.path.relpath(args.model, HERE.parent) if os.path.isdir(args.model) else args.model, "rows": args.rows, "rows_per_request": args.rows_per_request,
              "offline": {"seconds": round(offline_s, 3), "rows_per_s": round(args.rows / offline_s, 2)}, "serve": []}
    print(f"offline endokern score: {args.rows} rows in {offline_s:.2f} s, {args.rows / offline_s:.1f} rows/s")

    server = Server(model_args)
    print(server.line)
    try:
        for clients in [int(c) for c in args.clients.split(",")]:
            results, latencies, errors, seconds = load(server.url, rows, clients, args.rows_per_request)
            worst = max((abs(results[i]["reward"] - reference[i]["reward"]) / max(abs(reference[i]["reward"]), 1e-12)
                         for i in results), default=float("nan"))
            entry = {"clients": clients, "endpoint": "/score", "rows_per_request": args.rows_per_request,
                     "loadavg": loadavg(), "seconds": round(seconds, 3), "rows_per_s": round(args.rows / seconds, 2),
                     "response_tokens_per_s": round(tokens / seconds, 1),
                     "ratio_to_offline": round(offline_s / seconds, 3),
                     "p50_ms": round(1000 * quantile(latencies, 0.5), 1),
                     "p99_ms": round(1000 * quantile(latencies, 0.99), 1), "errors": len(errors),
                     "rows_answered": len(results), "max_rel_reward_diff": worst}
            report["serve"].append(entry)
            print(f"{clients:3d} clients: {entry['rows_per_s']:8.1f} rows/s  {entry['ratio_to_offline']:.2f}x offline  "
                  f"p50 {entry['p50_ms']:.0f} ms  p99 {entry['p99_ms']:.0f} ms  errors {len(errors)}  "
                  f"max rel diff {worst:.2e}", flush=True)
        if args.openrlhf_clients:
            joint_path, joint_ref = openrlhf_reference(rows, args.model, model_args)
            report["offline"]["openrlhf_rows_seconds"] = round(joint_path, 3)
            for clients in [int(c) for c in args.openrlhf_clients.split(",")]:
                results, latencies, errors, seconds = load(server.url, rows, clients, 1, openrlhf=True)
                worst = max((abs(results[i]["reward"] - joint_ref[i]["reward"]) / max(abs(joint_ref[i]["reward"]), 1e-12)
                             for i in results), default=float("nan"))
                entry = {"clients": clients, "endpoint": "/get_reward", "rows_per_request": 1, "loadavg": loadavg(),
                         "seconds": round(seconds, 3), "rows_per_s": round(args.rows / seconds, 2),
                         "ratio_to_offline": round(joint_path / seconds, 3),
                         "p50_ms": round(1000 * quantile(latencies, 0.5), 1),
                         "p99_ms": round(1000 * quantile(latencies, 0.99), 1), "errors": len(errors),
                         "rows_answered": len(results), "max_rel_reward_diff": worst}
                report["serve"].append(entry)
                print(f"{clients:3d} OpenRLHF clients (1 sample/request, /get_reward): {entry['rows_per_s']:8.1f} rows/s  "
                      f"{entry['ratio_to_offline']:.2f}x offline  p50 {entry['p50_ms']:.0f} ms  p99 {entry['p99_ms']:.0f} "
                      f"ms  errors {len(errors)}  max rel diff {worst:.2e}  load {entry['loadavg']}", flush=True)
        if args.memory_requests:
            single = make_rows(args.memory_requests, args.seed + 1)
            first, rest = single[:1000], single[1000:]
            load(server.url, first, 16, 1)
            rss_1000 = rss_mb(server.proc.pid)
            _, _, errors, seconds = load(server.url, rest, 16, 1)
            rss_all = rss_mb(server.proc.pid)
            report["memory"] = {"requests": args.memory_requests, "rss_mb_after_1000": round(rss_1000, 1),
                                f"rss_mb_after_{args.memory_requests}": round(rss_all, 1),
                                "growth": round(rss_all / rss_1000 - 1, 4), "errors": len(errors),
                                "requests_per_s": round(len(rest) / seconds, 1)}
            print(f"memory: {rss_1000:.1f} MB after 1,000 requests, {rss_all:.1f} MB after {args.memory_requests:,} "
                  f"({100 * (rss_all / rss_1000 - 1):+.1f}%), {len(errors)} errors")
    finally:
        report["server_exit"] = server.stop()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        again = offline(rows_path, Path(tmp) / "out.jsonl", model_args)[0]
    report["offline"]["seconds_again"] = round(again, 3)
    best = min(offline_s, again)
    for entry in report["serve"]:
        entry["ratio_to_best_offline"] = round(best / entry["seconds"], 3)
    print(f"offline again: {again:.2f} s; ratios to the faster offline run: "
          + ", ".join(f"{e['clients']} clients {e['ratio_to_best_offline']:.2f}x" for e in report["serve"]))
    out = Path(args.output or HERE / "results" / f"{name}-serve.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
