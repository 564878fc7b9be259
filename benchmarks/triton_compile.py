"""Compile every Triton kernel of the backend ahead of time for a GPU target, on a machine without one, and check it.

A stand-in Triton driver reports the target (``GPUTarget("cuda", 90, 32)`` for Hopper, 80 for Ampere);
``triton_backend.forward`` then runs on ``meta`` tensors (nothing is allocated) and each kernel launch it
makes is turned into an ahead-of-time compile through the JIT's own binder (``run(..., warmup=True)``),
so the arguments, specializations and constexprs are exactly those of a real launch. Each compiled
kernel's cubin is read with the ``cuobjdump`` that ships in Triton's wheel: registers, stack and local
memory (spills), shared memory, instruction counts, and whether the matmul uses Hopper's wgmma (HGMMA).

    python benchmarks/triton_compile.py                    # the full matrix, a table; exit 1 on any problem
    python benchmarks/triton_compile.py --json out.json    # also every record and problem as JSON
    python benchmarks/triton_compile.py --unit --json F    # the few cases tests/ops/test_triton_compile.py asserts
    python benchmarks/triton_compile.py --quick            # fewer cases
    python benchmarks/triton_compile.py --summary out.json # the markdown tables of benchmarks/NOTES.md, from a run

Checks (``problems``): every case compiles; no spills (stack frame and local memory 0; D = N = V = 1 exempt);
shared memory within the block limit; half inputs use wgmma (HGMMA) on sm_90 and mma.sync (HMMA) on sm_80; the
two-blocks-per-SM candidate fits two blocks; a TMA candidate has TMA loads (UTMALDG) in its SASS and a
warp-specialized one more warps than it asked for and ``setmaxnreg``; the full matrix covers every required shape,
layout and candidate.

Budget: the full matrix is 299 cases, 598 kernel compiles per Triton; measured, before its 60 logit-sum cases were
added (239 cases), 4.5 to 7 minutes (Triton 3.6.0) and 7.9 minutes (3.9.0) on the project's 2-core EPYC while other
jobs shared it (load 5 to 12), so about a quarter more now; allow 15 minutes per Triton on a slower machine. It is a CI step of its own in ``.ci/run`` (once per Triton, one after the other; its
``timeout`` only catches a hang), never a unit test; the unit tests compile the ``--unit`` subset (42 cases, about
a minute per Triton) and have no timeout a busy machine can hit.

Run it without ``TRITON_INTERPRET`` (it refuses to run under the interpreter: the JIT then never compiles).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile.py: unset TRITON_INTERPRET (the interpreter never compiles)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 is every version's default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver as active_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from endokern.ops import triton_backend  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (name, N, D, V, softcap): the shapes the backend meets. Integer arguments equal to 1 and multiples of 16
# are specialized differently by Triton's JIT, so both kinds appear (N = 1, D = V = 1, all-16 shapes).
SHAPES = [
    ("n1", 1, 576, 49152, None),
    ("ones", 1, 1, 1, None),
    ("sixteens", 16, 16, 16, None),
    ("ragged", 37, 64, 1000, None),
    ("v8192", 130, 48, 8192, None),
    ("stories260k", 300, 64, 512, None),
    ("llama3-8b", 32768, 4096, 128256, None),
    ("llama3-8b-n2048", 2048, 4096, 128256, None),
    ("qwen2.5-7b", 32768, 3584, 152064, None),
    ("qwen2.5-7b-n8192", 8192, 3584, 152064, None),
    ("gemma2-2b", 8192, 2304, 256000, 30.0),
    ("gemma2-2b-n2048", 2048, 2304, 256000, 30.0),
    # D not a multiple of 16: another launch config (triton_backend.kernel_config(wide_loads=False)), no spills
    ("d-not-16", 2048, 4100, 128256, None),
]
QUICK_SHAPES = ["n1", "ones", "sixteens", "stories260k", "llama3-8b", "gemma2-2b", "d-not-16"]
# How the operands are stored: "row-major", or "transposed-head" (the head a W.t() view of a [D, V] tensor: K stride
# V, 64-bit K offsets, the same narrow-load config as D not a multiple of 16).
LAYOUTS = ("row-major", "transposed-head")
# (bias, softcap, entropy): plain, everything, and each alone.
FEATURES = [(False, False, False), (True, True, True), (True, False, False), (False, True, False), (False, False, True)]


class AheadOfTimeDriver(DriverBase):
    """A Triton driver for a GPU that is not there: it names the target and device 0, nothing else."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        raise RuntimeError("no device: this driver only compiles")

    def get_benchmarker(self):
        raise RuntimeError("no device: this driver only compiles")

    def map_python_to_cpp_type(self, ty):
        return ty


class CompileLaunches:
    """Within the block, launches of the backend's kernels compile for the target and record the kernels."""

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled = []

    def __enter__(self):
        self._run = JITFunction.run
        compiled = self.compiled
        self.functions = set()

        def run(fn, *args, grid, warmup, **kwargs):
            if getattr(fn, "_aot_arch", None) != self.arch:  # the JIT binds its target once per device
                fn.device_caches.clear()
                fn._aot_arch = self.arch
            kernel = self._run(fn, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((fn.fn.__name__, kernel))
            self.functions.add(fn)
            return None

        JITFunction.run = run
        self._driver = active_driver._active  # None until a real driver was asked for
        active_driver.set_active(AheadOfTimeDriver(self.arch))
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        for fn in self.functions:  # a real launch after this must bind the real driver's target
            fn.device_caches.clear()
            fn._aot_arch = None
        active_driver._active = self._driver


def cubin_figures(cubin: bytes, workdir: Path) -> dict:
    """Registers, stack, local (spill) and static shared bytes, and instruction counts of one cubin."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{usage.stdout}{usage.stderr}")
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.x]+)?", sass)
    counts = collections.Counter(op for op, _ in ops)
    mma = sorted({op + suffix for op, suffix in ops if op in ("HGMMA", "HMMA", "IMMA", "WGMMA")})
    return {
        "registers": int(m.group(1)),
        "stack_bytes": int(m.group(2)),
        "static_shared_bytes": int(m.group(3)),
        "local_bytes": int(m.group(4)),
        "instructions": sum(counts.values()),
        "hgmma": counts["HGMMA"],
        "hmma": counts["HMMA"],
        "ex2": sum(1 for op, suffix in ops if op == "MUFU" and suffix.startswith(".EX2")),
        "mma_kinds": mma,
        "tma_loads": counts["UTMALDG"],  # bulk tensor copies global -> shared (TMA)
        "setmaxnreg": counts["USETMAXREG"],  # warp-specialized partitions trading registers
    }


def compile_case(arch, dtype_name, shape, features, config_name=None, tf32=False, layout="row-major",
                 logit_sum=False):
    name, n, d, v, cap = shape
    bias_on, softcap_on, entropy_on = features
    dtype = DTYPES[dtype_name]
    meta = dict(device="meta")
    hidden = torch.empty(n, d, dtype=dtype, **meta)
    if layout == "transposed-head":
        weight = torch.empty(d, v, dtype=dtype, **meta).t()
    else:
        weight = torch.empty(v, d, dtype=dtype, **meta)
    targets = torch.empty(n, dtype=torch.int64, **meta)
    bias = torch.empty(v, dtype=torch.float32, **meta) if bias_on else None
    softcap = (cap or 30.0) if (softcap_on or cap) else None
    config = triton_backend.GPU_CANDIDATES[config_name] if config_name else None
    record = dict(
        arch=arch, dtype=dtype_name, shape=name, n=n, d=d, v=v, bias=bias_on, softcap=softcap is not None,
        entropy=entropy_on, config=config_name or "auto", tf32=tf32, triton=triton.__version__, layout=layout,
        logit_sum=logit_sum,
    )
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    start = time.perf_counter()
    try:
        with CompileLaunches(arch) as launches:
            triton_backend.forward(hidden, weight, targets, bias=bias, alpha=0.7, softcap=softcap,
                                   return_entropy=entropy_on, config=config, return_logit_sum=logit_sum)
    except Exception as exc:  # reported per case; the test fails on any
        return [dict(record, kernel="?", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    seconds = time.perf_counter() - start
    cfg = config or triton_backend.launch_config(hidden, weight, logit_sum=logit_sum)
    out = []
    for kernel_name, kernel in launches.compiled:
        split = kernel_name == "_soft_values_split_kernel"
        out.append(dict(
            record, kernel=kernel_name, error=None, seconds=round(seconds, 2),
            dynamic_shared_bytes=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
            requested_warps=cfg.num_warps if split else None,
            block=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}", num_stages=cfg.num_stages,
            tma=cfg.tma and split, warp_specialize=cfg.warp_specialize and split,
            # register budgets the partitions of a warp-specialized kernel set (PTX setmaxnreg), e.g. dec 40, inc 232
            setmaxnreg_values=sorted({f"{op} {n}" for op, n in re.findall(
                r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", kernel.asm.get("ptx", ""))}),
            **cubin_figures(kernel.asm["cubin"], WORKDIR),
        ))
    return out


SHAPE = {s[0]: s for s in SHAPES}


def cases(quick: bool):
    shapes = [s for s in SHAPES if not quick or s[0] in QUICK_SHAPES]
    for arch in (90, 80):
        for dtype_name in DTYPES:
            for shape in shapes:
                features = FEATURES if shape[0] in ("ragged", "llama3-8b") else FEATURES[:2]
                for feat in features:
                    yield dict(arch=arch, dtype_name=dtype_name, shape=shape, features=feat)
            if dtype_name == "fp32":  # torch.backends.cuda.matmul.allow_tf32 picks tf32 tensor cores
                yield dict(arch=arch, dtype_name="fp32", shape=SHAPE["llama3-8b"], features=FEATURES[0], tf32=True)
            for shape in ("llama3-8b", "ragged"):  # a W.t() head: V divisible by 16 or not
                for feat in FEATURES[:2]:
                    yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE[shape], features=feat,
                               layout="transposed-head")
            yield from logit_sum_cases(arch, dtype_name)
    # The launch-config candidates at the SPEC shape, Hopper, bf16: plain and as the ablation times Gemma (softcap;
    # entropy too); the TMA + warp-specialized one also with bias + softcap + entropy, which the plain 128x128 tile
    # cannot hold without spilling (8 B; it stays a candidate for the L2 question, timed without bias).
    for config_name, cfg in triton_backend.GPU_CANDIDATES.items():
        extra = (FEATURES[1],) if cfg.warp_specialize else ()
        for feat in (FEATURES[0], (False, True, True), *extra):
            yield dict(arch=90, dtype_name="bf16", shape=SHAPE["llama3-8b"], features=feat, config_name=config_name)


def logit_sum_cases(arch, dtype_name):
    """The logit sum (self-certainty's accumulator, WITH_SUM) plain and with every other option, at N = 1, one split,
    the Llama 3 and Gemma 2 heads, and D not a multiple of 16 (the narrow-load config)."""
    for shape in ("n1", "v8192", "llama3-8b", "gemma2-2b", "d-not-16"):
        for feat in FEATURES[:2]:
            yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE[shape], features=feat, logit_sum=True)


def unit_cases():
    """The subset tests/ops/test_triton_compile.py asserts: per target, N = 1, D = N = V = 1, one split (V <= 8192),
    the Llama 3 head plain and with every option, D not a multiple of 16, a transposed head; fp16 where its code
    differs from bf16 (the MMA kind); tf32; and the candidates with their own figures to check (sm_90, bf16)."""
    everything = (True, True, True)
    for arch in (90, 80):
        for dtype_name in ("fp32", "bf16"):
            for shape in ("n1", "ones", "v8192"):
                yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE[shape], features=FEATURES[0])
            for feat in (FEATURES[0], everything):
                yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE["llama3-8b"], features=feat)
            yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE["d-not-16"], features=everything)
            yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE["llama3-8b"], features=everything,
                       layout="transposed-head")
        yield dict(arch=arch, dtype_name="fp16", shape=SHAPE["llama3-8b"], features=everything)
        yield dict(arch=arch, dtype_name="fp32", shape=SHAPE["llama3-8b"], features=FEATURES[0], tf32=True)
        for dtype_name in ("fp32", "bf16"):  # with the logit sum: the Llama 3 head with every option
            yield dict(arch=arch, dtype_name=dtype_name, shape=SHAPE["llama3-8b"], features=everything, logit_sum=True)
    for config_name in ("tma-ws-128x128", "mainloop", "2-per-sm"):
        for feat in (FEATURES[0], everything):
            yield dict(arch=90, dtype_name="bf16", shape=SHAPE["llama3-8b"], features=feat, config_name=config_name)


# The CUDA limits a block may use: dynamic shared memory per block (sm_90: 227 KB, sm_80: 163 KB).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
KERNELS = {"_soft_values_split_kernel", "_merge_splits_kernel"}


def problems(records, full: bool) -> dict:
    """What is wrong with a run, by check: {check: [one line per problem]} (every list empty: all good)."""
    out = collections.defaultdict(list)

    def where(r):
        return (f"sm_{r['arch']} {r['dtype']} {r['shape']} {r['layout']} {r['config']} {r['kernel']}"
                + (" logit_sum" if r.get("logit_sum") else ""))

    for r in records:
        if r["error"]:
            out["compiles"].append(f"{where(r)}: {r['error']}")
            continue
        if r["shape"] != "ones" and (r["local_bytes"] or r["stack_bytes"]):  # D = N = V = 1: nobody scores it
            out["no_spills"].append(f"{where(r)}: {r['stack_bytes']} B stack, {r['local_bytes']} B local")
        shared = r["dynamic_shared_bytes"] + r["static_shared_bytes"]
        if shared > SHARED_LIMIT[r["arch"]] or not 0 < r["registers"] <= 255:
            out["fits"].append(f"{where(r)}: {shared} B shared, {r['registers']} registers")
        if r["kernel"] == "_soft_values_split_kernel" and r["dtype"] != "fp32":
            ok = r["hgmma"] > 0 if r["arch"] == 90 else r["hmma"] > 0 and r["hgmma"] == 0
            if not ok:
                out["tensor_cores"].append(f"{where(r)}: {r['mma_kinds']}")
        two_fit = r["registers"] * r["num_warps"] * 32 * 2 <= 65536 and 2 * shared <= 228 * 1024
        if r["kernel"] == "_soft_values_split_kernel" and r["config"] == "2-per-sm" and not two_fit:
            out["candidates"].append(f"{where(r)}: two blocks do not fit one SM")
        if r.get("tma") and not r["tma_loads"]:
            out["candidates"].append(f"{where(r)}: no TMA load (UTMALDG) in the SASS")
        if r.get("warp_specialize") and r["arch"] == 90 and not (
            r["num_warps"] > r["requested_warps"] and r["setmaxnreg"]
        ):
            out["candidates"].append(f"{where(r)}: not warp-specialized ({r['num_warps']} warps, "
                                     f"{r['setmaxnreg']} setmaxnreg)")
    ok = [r for r in records if not r["error"]]
    for arch in (80, 90):
        for dtype in DTYPES:
            kernels = {r["kernel"] for r in ok if r["arch"] == arch and r["dtype"] == dtype}
            if kernels != KERNELS:
                out["coverage"].append(f"sm_{arch} {dtype}: compiled {sorted(kernels)}")
    if full:
        missing = {s[0] for s in SHAPES} - {r["shape"] for r in ok}
        missing |= set(LAYOUTS) - {r["layout"] for r in ok}
        missing |= set(triton_backend.GPU_CANDIDATES) - {r["config"] for r in ok}
        if not any(r.get("logit_sum") for r in ok):
            missing.add("logit_sum")
        if missing:
            out["coverage"].append(f"never compiled: {sorted(missing)}")
        features = {(r["bias"], r["softcap"], r["entropy"]) for r in ok if r["shape"] == "llama3-8b"}
        if len(features) < 5:
            out["coverage"].append(f"Llama 3 head with only {sorted(features)}")
    return {check: out.get(check, []) for check in ("compiles", "no_spills", "fits", "tensor_cores", "candidates",
                                                    "coverage")}


WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"endokern-aot-{os.getpid()}"


def summary(data) -> str:
    """Markdown: the split kernel at the Llama 3 head per target, dtype and options; the layouts that take the
    narrow-load config; then the launch candidates (with TMA loads, warps and setmaxnreg)."""
    split = [r for r in data["records"] if not r["error"] and r["kernel"] == "_soft_values_split_kernel"]
    head = ("| target | dtype | options | tile | registers | spills (B) | shared KB | SASS instructions | MMA | "
            "MUFU.EX2 |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")

    def feat(r):
        return "+".join(k for k in ("bias", "softcap", "entropy", "tf32", "logit_sum") if r.get(k)) or "plain"

    def mma(r):
        return f"{r['hgmma']} HGMMA" if r["hgmma"] else (f"{r['hmma']} HMMA" if r["hmma"] else "FMA")

    def shared(r):
        return (r["dynamic_shared_bytes"] + r["static_shared_bytes"]) / 1024

    def line(r, label, options=None):
        return (f"| sm_{r['arch']} | {r['dtype']} | {options or feat(r)} | {label} | {r['registers']} | "
                f"{r['stack_bytes']} | "
                f"{shared(r):.0f} | {r['instructions']} | {mma(r)} | {r['ex2']} |")

    def tile(r):
        return r["block"] + f" s{r['num_stages']}"

    llama = [r for r in split if r["shape"] == "llama3-8b" and r["layout"] == "row-major"]
    out = [f"Triton {data['triton']}, split kernel at N=32768, D=4096, V=128256 (the merge kernel: 32 registers):",
           "", head]
    out += [line(r, tile(r)) for r in llama if r["config"] == "auto"]
    narrow = [r for r in split if r["config"] == "auto" and (r["shape"] == "d-not-16" or (
        r["layout"] == "transposed-head" and r["shape"] == "llama3-8b"))]
    if narrow:
        title = (f"Narrow loads, Triton {data['triton']}: D = 4100 (not a multiple of 16; N=2048, V=128256) and a "
                 "transposed head (W.t(), D=4096), the config kernel_config(wide_loads=False) picks:")
        out += ["", title, "", head.replace("| options |", "| case, options |")]
        out += [line(r, tile(r), f"{'D=4100' if r['shape'] == 'd-not-16' else 'W.t()'}, {feat(r)}") for r in narrow]
    cand_head = ("| target | options | candidate | tile | warps (asked) | registers | spills (B) | shared KB | "
                 "SASS instructions | MMA | TMA loads (UTMALDG) | setmaxnreg |\n"
                 "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    out += ["", f"Launch-config candidates (sm_90, bf16, N=32768, D=4096, V=128256), Triton {data['triton']}:", "",
            cand_head]
    for r in llama:
        if r["config"] != "auto":
            out.append(
                f"| sm_{r['arch']} | {feat(r)} | {r['config']} | {tile(r)} | {r['num_warps']} ({r['requested_warps']}) | "
                f"{r['registers']} | {r['stack_bytes']} | {shared(r):.0f} | {r['instructions']} | {mma(r)} | "
                f"{r.get('tma_loads', 0)} | {', '.join(r.get('setmaxnreg_values', [])) or '-'} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, help="print the markdown tables of a --json file and exit")
    parser.add_argument("--json", type=Path, help="write every record and problem here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (N = 1, V <= 8192, the SPEC heads)")
    parser.add_argument("--unit", action="store_true", help="only the cases tests/ops/test_triton_compile.py asserts")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return 0
    WORKDIR.mkdir(parents=True, exist_ok=True)
    records = []
    start = time.perf_counter()
    todo = list(unit_cases() if args.unit else cases(args.quick))
    for case in todo:
        records.extend(compile_case(**case))
    elapsed = time.perf_counter() - start
    print(f"# Triton {triton.__version__}, {len(todo)} cases, {len(records)} kernel compiles in {elapsed:.0f} s")
    cols = ("arch", "dtype", "shape", "layout", "config", "kernel", "registers", "local_bytes", "stack_bytes",
            "dynamic_shared_bytes", "instructions", "hgmma", "ex2", "tma_loads", "num_warps")
    print(" | ".join(cols) + " | features")
    seen = set()
    for r in records:
        if r["error"]:
            print(f"{r['arch']} | {r['dtype']} | {r['shape']} | {r['layout']} | {r['config']} | {r['kernel']} | "
                  f"ERROR {r['error']}")
            continue
        feat = ",".join(k for k in ("bias", "softcap", "entropy", "tf32", "logit_sum") if r.get(k)) or "-"
        key = tuple(r[c] for c in cols if c != "shape") + (feat,)
        if key in seen:  # the same compiled kernel (shapes differ only in values the JIT does not specialize)
            continue
        seen.add(key)
        print(" | ".join(str(r[c]) for c in cols) + f" | {feat}")
    found = problems(records, full=not (args.unit or args.quick))
    for check, lines in found.items():
        for line in lines:
            print(f"PROBLEM {check}: {line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(triton=triton.__version__, seconds=elapsed, cases=len(todo),
                                             records=records, problems=found), indent=1))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
