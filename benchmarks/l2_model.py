"""A small L2 cache model of the Triton kernel's launch order: HBM bytes and time floors per SPEC shape.

The split kernel runs (row block, vocabulary split) programs; each walks its split tile by tile and, for
every tile, reads its hidden block (BLOCK_M x D) and one head tile (BLOCK_N x D). A hidden block is re-read
for every vocabulary tile, so whether it is still in L2 decides most of the HBM traffic. The model:

- ``slots`` programs are resident at once (one per SM, or two with two blocks per SM), dispatched in
  program-id order as earlier ones finish; resident programs advance one tile per step together;
- each step reads, program by program, its hidden block then its head tile, through an LRU cache of
  ``--l2-mb`` (whole blocks and tiles as the unit);
- a miss costs the object's bytes from HBM; the partial results (16 bytes per row and split) are written
  once and read once by the merge.

It prints, per shape and launch order, the HBM bytes, the HBM time floor at ``--hbm-tbs``, the compute floor
at ``--tflops`` (the bare matmul's rate), and the bytes L2 serves the SMs (hits and misses). It is a model:
it ignores that programs drift apart, the sector-level and set-associative behaviour of the real L2, and
the hash that spreads addresses over its two partitions. Its use is to rank launch orders, not to predict
times to the percent. Figures in benchmarks/NOTES.md.

    python benchmarks/l2_model.py
    python benchmarks/l2_model.py --json benchmarks/results/l2-model.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from endokern.ops.triton_backend import GPU_CANDIDATES  # noqa: E402

SHAPES = [  # (name, N, D, V)
    ("llama3-8b", 32768, 4096, 128256),
    ("llama3-8b", 8192, 4096, 128256),
    ("llama3-8b", 2048, 4096, 128256),
    ("qwen2.5-7b", 32768, 3584, 152064),
    ("qwen2.5-7b", 2048, 3584, 152064),
    ("gemma2-2b", 8192, 2304, 256000),
    ("gemma2-2b", 2048, 2304, 256000),
    ("qwen2.5-0.5b", 32768, 896, 151936),
]


def program_order(row_blocks: int, num_splits: int, group_m: int):
    """(row block, split) per program id, as the kernel computes them (grouped launch order)."""
    group_m = min(group_m, row_blocks)
    out = []
    for pid in range(row_blocks * num_splits):
        per_group = group_m * num_splits
        group = pid // per_group
        first_m = group * group_m
        size = min(row_blocks - first_m, group_m)
        within = pid - group * per_group
        out.append((first_m + within % size, within // size))
    return out


def simulate(n, d, v, cfg, *, slots, l2_bytes, elem=2):
    row_blocks = math.ceil(n / cfg.block_m)
    split = cfg.split_tiles * cfg.block_n
    num_splits = math.ceil(v / split)
    order = program_order(row_blocks, num_splits, cfg.group_m)
    h_bytes = min(cfg.block_m, n) * d * elem
    w_bytes = cfg.block_n * d * elem

    def tiles_of(s):
        return math.ceil((min(v, (s + 1) * split) - s * split) / cfg.block_n)

    cache, used = OrderedDict(), 0
    hbm = served = 0

    def touch(key, size):
        nonlocal used, hbm, served
        served += size
        if key in cache:
            cache.move_to_end(key)
            return
        hbm += size
        cache[key] = size
        used += size
        while used > l2_bytes:
            _, old = cache.popitem(last=False)
            used -= old

    resident = []  # [row block, split, next tile, tiles]
    next_pid = 0
    while resident or next_pid < len(order):
        while len(resident) < slots and next_pid < len(order):
            m, s = order[next_pid]
            resident.append([m, s, 0, tiles_of(s)])
            next_pid += 1
        for prog in resident:
            m, s, t, _ = prog
            touch(("h", m), h_bytes)
            touch(("w", s, t), w_bytes)
            prog[2] += 1
        resident = [p for p in resident if p[2] < p[3]]
    partials = 2 * 16 * n * num_splits  # written by the split kernel, read by the merge
    return dict(hbm_bytes=hbm + partials, l2_served_bytes=served, num_splits=num_splits, programs=len(order))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--l2-mb", type=float, default=50.0, help="L2 size (H100/H200: 50 MB)")
    parser.add_argument("--hbm-tbs", type=float, default=4.3, help="HBM bandwidth (H200 copy rate, TB/s)")
    parser.add_argument("--tflops", type=float, default=790.0, help="bare bf16 matmul rate (TFLOP/s)")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    orders = {  # name -> (config, resident programs)
        "before: 128x128, rows fastest": (GPU_CANDIDATES["128x128"]._replace(group_m=1 << 30), args.sms),
        "128x128, group 8": (GPU_CANDIDATES["128x128"], args.sms),
        "rows fastest": (GPU_CANDIDATES["rows-fastest"], args.sms),
        "split fastest": (GPU_CANDIDATES["split-fastest"], args.sms),
        "group 4": (GPU_CANDIDATES["default"]._replace(group_m=4), args.sms),
        "group 8": (GPU_CANDIDATES["group8"], args.sms),
        "group 16": (GPU_CANDIDATES["default"]._replace(group_m=16), args.sms),
        "group 32 (default)": (GPU_CANDIDATES["default"], args.sms),
        "group 64": (GPU_CANDIDATES["default"]._replace(group_m=64), args.sms),
        "2 per SM (64x128), group 32": (GPU_CANDIDATES["2-per-sm"], 2 * args.sms),
        "TMA + WS 128x128, group 16": (GPU_CANDIDATES["tma-ws-128x128"], args.sms),
    }
    rows = []
    print(f"# L2 {args.l2_mb:g} MB LRU, HBM {args.hbm_tbs:g} TB/s, matmul {args.tflops:g} TFLOP/s, {args.sms} SMs")
    print(f"{'shape':28} {'order':30} {'tile':>8} {'HBM GB':>8} {'HBM ms':>7} {'compute ms':>10} {'L2->SM GB':>9}")
    for name, n, d, v in SHAPES:
        compute_ms = 2 * n * d * v / (args.tflops * 1e12) * 1e3
        for order, (cfg, slots) in orders.items():
            r = simulate(n, d, v, cfg, slots=slots, l2_bytes=args.l2_mb * 1e6)
            hbm_ms = r["hbm_bytes"] / (args.hbm_tbs * 1e12) * 1e3
            row = dict(shape=name, n=n, d=d, v=v, order=order, tile=f"{cfg.block_m}x{cfg.block_n}",
                       group_m=cfg.group_m, slots=slots, hbm_ms=hbm_ms, compute_ms=compute_ms, **r)
            rows.append(row)
            print(f"{name + f' N={n}':28} {order:30} {row['tile']:>8} {r['hbm_bytes'] / 1e9:8.1f} {hbm_ms:7.1f} "
                  f"{compute_ms:10.1f} {r['l2_served_bytes'] / 1e9:9.0f}")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(x) for k, x in vars(args).items()}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
