"""Threads on a busy CPU: end-to-end scoring with one thread and with all, on an idle and on a loaded machine.

Each configuration runs in a fresh process (OpenMP reads its environment once, when torch is imported), scores the
same LLMBar responses with ``EndoRM.score_encoded`` after one warm-up batch, and reports the wall time, the CPU
seconds of the process (all its threads), and how much of the wall time the fused head (``soft_values``) took; the
rest is the backbone (torch's intra-op pool) plus a little Python. The load is started by this script: one busy-loop
process per CPU this process may use (``--load``), killed when the loaded runs end.

Configurations (``--configs``):
  one          OMP_NUM_THREADS=1, ENDOKERN_THREADS=1: one thread everywhere
  all-spin     every CPU, OMP_WAIT_POLICY=ACTIVE (threads spin at barriers)
  all-passive  every CPU, OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers)
  before       what a run got before endokern sized its threads: torch's default threads (the CPU count) and
               libgomp's default wait (a spin of about 300000 iterations, then sleep); ENDOKERN_THREADS=all
  default      endokern's default now: threads from endokern.machine (affinity, cgroup quota, load)

    python benchmarks/cpu_threads.py                                   # stories260K fixture, idle and loaded
    python benchmarks/cpu_threads.py --model smollm2-135m-instruct --pairs 30
    python benchmarks/cpu_threads.py --precision --model smollm2-135m-instruct --pairs 20

``--precision`` instead times float32 against bfloat16 on one thread, natively and with the CPU held to AVX2 (oneDNN
``ONEDNN_MAX_CPU_ISA=AVX2``, ATen ``ATEN_CPU_CAPABILITY=avx2``, the C++ kernel ``ENDOKERN_CPU_SIMD=avx2``): what bf16
costs on a CPU without native bf16 dot products, and the drift of bf16 rewards and margins from float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURE = ROOT / "tests" / "fixtures" / "stories260K"
SHARED = ROOT.parent / "shared" / "data" / "llmbar"
LOCAL = ROOT / "examples" / "data"

CONFIGS = {
    "one": {"OMP_NUM_THREADS": "1", "ENDOKERN_THREADS": "1"},
    "all-spin": {"OMP_WAIT_POLICY": "ACTIVE", "ENDOKERN_THREADS": "all"},
    "all-passive": {"OMP_WAIT_POLICY": "PASSIVE", "ENDOKERN_THREADS": "all"},
    "before": {"ENDOKERN_THREADS": "all"},
    "default": {},
}
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ENDOKERN_CPU_SIMD": "avx2"}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ENDOKERN_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------------------ the child

def child(args) -> None:
    import torch

    t_start = time.perf_counter()
    from endokern import EndoRM
    from endokern import model as model_module
    from endokern.layouts import preference_examples
    from endokern.tokenization import EncodeError

    rm = EndoRM.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    rows = []
    for path in args.data:
        rows += json.loads(Path(path).read_text())
    encoder = rm.encoder("auto")
    examples = []
    for row in rows:
        examples += preference_examples(row, encoder.template).examples
    encoded = [e for e in encoder.encode(examples) if not isinstance(e, EncodeError)]
    if rm.max_positions:
        encoded = [e for e in encoded if e.length <= rm.max_positions]
    encoded = encoded[: 2 * args.pairs]

    head = {"wall": 0.0, "cpu": 0.0, "calls": 0}
    original = model_module.soft_values

    def timed_soft_values(*a, **k):
        w, c = time.perf_counter(), time.process_time()
        out = original(*a, **k)
        head["wall"] += time.perf_counter() - w
        head["cpu"] += time.process_time() - c
        head["calls"] += 1
        return out

    model_module.soft_values = timed_soft_values
    rm.score_encoded(encoded[:4])  # warm-up
    head.update(wall=0.0, cpu=0.0, calls=0)
    best = None
    for _ in range(args.repeats):
        head.update(wall=0.0, cpu=0.0, calls=0)
        w, c = time.perf_counter(), time.process_time()
        results = rm.score_encoded(encoded)
        run = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
               "head_wall_s": head["wall"], "head_cpu_s": head["cpu"], "head_calls": head["calls"]}
        if best is None or run["wall_s"] < best["wall_s"]:
            best = run
    print(json.dumps({
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()},
        "examples": len(encoded), "tokens": sum(e.length for e in encoded),
        "torch_threads": torch.get_num_threads(), "dtype": str(rm.head.weight.dtype).replace("torch.", ""),
        "checksum": round(sum(r.reward for r in results), 3), "startup_s": round(w - t_start, 2),
        **({"rewards": [r.reward for r in results]} if args.rewards else {}),
    }))


# ----------------------------------------------------------------------------------------------------- the parent

def busy_loop() -> None:
    while True:
        pass


def start_load(count: int):
    code = "import sys\nwhile True:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def stop_load(procs) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def machine_info() -> dict:
    flags = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
        flags = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Flags")), "")
    except OSError:
        model = platform.processor()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")
    import torch

    from endokern import machine

    return {"cpu": model, "flags": [f for f in wanted if f in flags.split()], "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "cgroup_cpus": machine.cgroup_cpu_limit(),
            "torch": torch.__version__, "python": platform.python_version()}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_child(config: str, args, extra_env=None, dtype=None, rewards=False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(CONFIGS[config])
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", args.model, "--pairs", str(args.pairs),
           "--repeats", str(args.repeats), "--data", *args.data]
    if dtype or args.dtype:
        cmd += ["--dtype", dtype or args.dtype]
    if rewards:
        cmd += ["--rewards"]
    before = uptime()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(config=config, uptime_before=before, process_s=round(time.perf_counter() - t, 2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--pairs", type=int, default=40, help="LLMBar pairs (two responses each)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per process (the fastest is kept)")
    parser.add_argument("--configs", default="one,before,all-passive,default")
    parser.add_argument("--loads", default="idle,loaded", help="idle, loaded, or both")
    parser.add_argument("--load", type=int, default=None, help="busy-loop processes when loaded (default: one per "
                        "CPU this process may use)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every configuration")
    parser.add_argument("--data", nargs="+", default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=None, help="results base name (default: results/cpu-threads-<model>)")
    parser.add_argument("--precision", action="store_true", help="float32 against bfloat16, native and AVX2-only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rewards", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data is None:
        natural = SHARED / "LLMBar__Natural.json"
        args.data = [str(natural if natural.exists() else LOCAL / "LLMBar__Natural-sample.json")]
    if args.child:
        child(args)
        return 0

    if args.precision:
        return precision(args, argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    info = machine_info()
    load_n = args.load or len(os.sched_getaffinity(0))
    rows = []
    for load in [x.strip() for x in args.loads.split(",") if x.strip()]:
        procs = start_load(load_n) if load == "loaded" else []
        try:
            time.sleep(1.0 if procs else 0.0)
            for r in range(args.rounds):
                for config in configs:
                    row = run_child(config, args)
                    row.update(load=load, load_processes=len(procs), round=r)
                    rows.append(row)
                    print(f"{load:7s} {config:12s} wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  head "
                          f"{row['head_wall_s']:6.2f} s  threads {row['torch_threads']}  [{row['uptime_before']}]",
                          flush=True)
        finally:
            stop_load(procs)

    name = Path(args.model).name.lower() if os.path.isdir(args.model) else args.model.lower()
    base = Path(args.out) if args.out else HERE / "results" / f"cpu-threads-{name}"
    lines = [f"# {' '.join(['python', 'benchmarks/cpu_threads.py', *(argv if argv is not None else sys.argv[1:])])}",
             f"# cpu: {info['cpu']}; flags: {' '.join(info['flags'])}; cpus {info['cpu_count']}, affinity "
             f"{info['affinity']}, cgroup quota {info['cgroup_cpus']}; torch {info['torch']}",
             f"# uptime at the end: {uptime()}",
             f"{'load':7s} {'config':12s} {'threads':>7s} {'wall s':>8s} {'cpu s':>8s} {'head s':>7s} "
             f"{'vs one':>7s}  uptime before"]
    for row in rows:
        one = [r for r in rows if r["load"] == row["load"] and r["config"] == "one" and r["round"] == row["round"]]
        ratio = row["wall_s"] / one[0]["wall_s"] if one else float("nan")
        row["wall_vs_one"] = round(ratio, 3)
        lines.append(f"{row['load']:7s} {row['config']:12s} {row['torch_threads']:7d} {row['wall_s']:8.2f} "
                     f"{row['cpu_s']:8.2f} {row['head_wall_s']:7.2f} {ratio:7.2f}x  "
                     f"{row['uptime_before'].split('load average:')[-1].strip()}")
    text = "\n".join(lines) + "\n"
    print(text)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".txt").write_text(text)
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2)
                                         + "\n")
    return 0


def precision(args, argv) -> int:
    """float32 and bfloat16, one thread, natively and held to AVX2, interleaved; the drift of bf16 from fp32."""
    import statistics

    info = machine_info()
    rows = []
    for r in range(args.rounds):
        for isa, env in (("native", {}), ("avx2-only", AVX2_ONLY)):
            for dtype in ("float32", "bfloat16"):
                row = run_child("one", args, extra_env=env, dtype=dtype, rewards=True)
                row.update(isa=isa, round=r, requested_dtype=dtype)
                rows.append(row)
                print(f"{isa:9s} {dtype:9s} wall {row['wall_s']:8.2f} s  cpu {row['cpu_s']:8.2f} s  head "
                      f"{row['head_wall_s']:6.2f} s  [{row['uptime_before']}]", flush=True)

    def pick(isa, dtype):
        return [x for x in rows if x["isa"] == isa and x["requested_dtype"] == dtype]

    fp32, bf16 = pick("native", "float32")[0]["rewards"], pick("native", "bfloat16")[0]["rewards"]
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(fp32, bf16)]
    margins32 = [fp32[i] - fp32[i + 1] for i in range(0, len(fp32) - 1, 2)]  # chosen, rejected pairs
    margins16 = [bf16[i] - bf16[i + 1] for i in range(0, len(bf16) - 1, 2)]
    drift = {"median_rel_reward": statistics.median(rel), "max_rel_reward": max(rel),
             "median_abs_reward": statistics.median(abs(b - a) for a, b in zip(fp32, bf16)),
             "pairs": len(margins32), "margin_sign_flips": sum((a > 0) != (b > 0) for a, b in zip(margins32, margins16)),
             "accuracy_fp32": sum(m > 0 for m in margins32) / len(margins32),
             "accuracy_bf16": sum(m > 0 for m in margins16) / len(margins16)}
    ratios = {}
    for isa in ("native", "avx2-only"):
        w32 = min(x["wall_s"] for x in pick(isa, "float32"))
        w16 = min(x["wall_s"] for x in pick(isa, "bfloat16"))
        c32 = min(x["cpu_s"] for x in pick(isa, "float32"))
        c16 = min(x["cpu_s"] for x in pick(isa, "bfloat16"))
        ratios[isa] = {"float32_s": w32, "bfloat16_s": w16, "bf16_over_fp32": round(w16 / w32, 3),
                       "float32_cpu_s": c32, "bfloat16_cpu_s": c16, "bf16_over_fp32_cpu": round(c16 / c32, 3)}
    lines = [f"# {' '.join(['python', 'benchmarks/cpu_threads.py', *(argv if argv is not None else sys.argv[1:])])}",
             f"# cpu: {info['cpu']}; flags: {' '.join(info['flags'])}; torch {info['torch']}; one thread",
             f"# uptime at the end: {uptime()}",
             f"{'isa':10s} {'fp32 s':>8s} {'bf16 s':>8s} {'bf16/fp32':>9s} {'fp32 cpu s':>10s} {'bf16 cpu s':>10s} "
             f"{'bf16/fp32 cpu':>13s}"]
    for isa, x in ratios.items():
        lines.append(f"{isa:10s} {x['float32_s']:8.2f} {x['bfloat16_s']:8.2f} {x['bf16_over_fp32']:8.2f}x "
                     f"{x['float32_cpu_s']:10.2f} {x['bfloat16_cpu_s']:10.2f} {x['bf16_over_fp32_cpu']:12.2f}x")
    lines.append(f"bf16 drift from fp32 over {len(rel)} responses: median {drift['median_rel_reward']:.2e} relative "
                 f"(max {drift['max_rel_reward']:.2e}), {drift['margin_sign_flips']} of {drift['pairs']} pair margins "
                 f"change sign; accuracy fp32 {drift['accuracy_fp32']:.3f}, bf16 {drift['accuracy_bf16']:.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    name = Path(args.model).name.lower() if os.path.isdir(args.model) else args.model.lower()
    base = Path(args.out) if args.out else HERE / "results" / f"cpu-threads-precision-{name}"
    for row in rows:
        row.pop("rewards", None)
    base.with_suffix(".txt").write_text(text)
    base.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "ratios": ratios,
                                                     "drift": drift, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
