"""What the logit sum (self-certainty's extra accumulator) costs the C++ kernel: with and without it, side by side.

One process, one shape (default: the SmolLM2-135M head, N = 2048, D = 576, V = 49152), fp32 and bf16. The two
contenders are the same ``endokern.ops.cpu_backend.forward`` call with ``return_logit_sum`` False and True (the
front door's input checks are left out: they are the same for both). Runs are interleaved (off, on, off, on, ...)
after one warm-up of each, so a machine whose load changes during the run slows both alike; the report gives the
median and the minimum of each and their ratios, the machine's load average before and after (``uptime``), the SIMD
path and the thread count. Both contenders' outputs are checked equal (value, target logit) before timing.

    python benchmarks/self_certainty_cost.py                       # SmolLM2 head, fp32 and bf16, 7 rounds
    python benchmarks/self_certainty_cost.py --rounds 11 --json benchmarks/results/self-certainty-cost.json
    python benchmarks/self_certainty_cost.py --quick               # a small shape (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(n: int, d: int, v: int, dtype: torch.dtype, rounds: int, seed: int = 0) -> dict:
    from endokern.ops import cpu_backend

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 3).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)

    def call(with_sum: bool):
        return cpu_backend.forward(hidden, weight, targets, bias=None, alpha=1.0, softcap=None, return_entropy=False,
                                   return_logit_sum=with_sum)

    off, on = call(False), call(True)  # warm-up, and the same values either way
    assert torch.equal(off[0], on[0]) and torch.equal(off[1], on[1]) and len(off) == 3 and len(on) == 4
    times = {"off": [], "on": []}
    for _ in range(rounds):
        for name, flag in (("off", False), ("on", True)):
            start = time.perf_counter()
            call(flag)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(t) for k, t in times.items()}
    low = {k: min(t) for k, t in times.items()}
    return {
        "shape": [n, d, v], "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
        "seconds": {k: [round(x, 5) for x in t] for k, t in times.items()},
        "median_s": med, "min_s": low,
        "ratio_median": med["on"] / med["off"], "ratio_min": low["on"] / low["off"],
        # pairwise: each round's on / off, so a load change between rounds cancels
        "ratio_pairs_median": statistics.median(a / b for a, b in zip(times["on"], times["off"])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,576,49152", help="N,D,V (default: the SmolLM2-135M head)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a small shape and 2 rounds (a smoke run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from endokern.ops import cpu_backend

    if cpu_backend.UNAVAILABLE:
        print(f"the C++ kernel is not built: {cpu_backend.UNAVAILABLE}", file=sys.stderr)
        return 1
    n, d, v = (64, 64, 4096) if args.quick else map(int, args.shape.split(","))
    rounds = 2 if args.quick else args.rounds
    report = {
        "what": "C++ kernel, return_logit_sum off vs on (interleaved)", "cpu": platform.processor() or platform.machine(),
        "simd": os.environ.get("ENDOKERN_CPU_SIMD", "auto") + f" (best here: {cpu_backend.supported_simd()[-1]})",
        "threads": torch.get_num_threads(), "uptime_before": uptime(), "results": [],
    }
    print(f"uptime before: {report['uptime_before']}")
    for name in args.dtypes.split(","):
        r = measure(n, d, v, getattr(torch, name), rounds)
        report["results"].append(r)
        print(f"{r['dtype']:>9} N={n} D={d} V={v}: off {r['median_s']['off']:.4f} s, on {r['median_s']['on']:.4f} s "
              f"(medians of {rounds}); on/off median {r['ratio_median']:.4f}, min {r['ratio_min']:.4f}, "
              f"pairwise median {r['ratio_pairs_median']:.4f}")
    report["uptime_after"] = uptime()
    print(f"uptime after:  {report['uptime_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
