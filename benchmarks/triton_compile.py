"""Compile every Triton kernel of the backend ahead of time for a GPU target, on a machine without one.

A stand-in Triton driver reports the target (``GPUTarget("cuda", 90, 32)`` for Hopper, 80 for Ampere);
``triton_backend.forward`` then runs on ``meta`` tensors (nothing is allocated) and each kernel launch it
makes is turned into an ahead-of-time compile through the JIT's own binder (``run(..., warmup=True)``),
so the arguments, specializations and constexprs are exactly those of a real launch. Each compiled
kernel's cubin is read with the ``cuobjdump`` that ships in Triton's wheel: registers, stack and local
memory (spills), shared memory, instruction counts, and whether the matmul uses Hopper's wgmma (HGMMA).

    python benchmarks/triton_compile.py                    # the full matrix, a table
    python benchmarks/triton_compile.py --json out.json    # also every record as JSON (the CI test reads it)
    python benchmarks/triton_compile.py --quick            # fewer cases
    python benchmarks/triton_compile.py --summary out.json # the markdown tables of benchmarks/NOTES.md, from a run

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
]
QUICK_SHAPES = ["n1", "ones", "sixteens", "stories260k", "llama3-8b", "gemma2-2b"]
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
    }


def compile_case(arch, dtype_name, shape, features, config_name=None, tf32=False):
    name, n, d, v, cap = shape
    bias_on, softcap_on, entropy_on = features
    dtype = DTYPES[dtype_name]
    meta = dict(device="meta")
    hidden = torch.empty(n, d, dtype=dtype, **meta)
    weight = torch.empty(v, d, dtype=dtype, **meta)
    targets = torch.empty(n, dtype=torch.int64, **meta)
    bias = torch.empty(v, dtype=torch.float32, **meta) if bias_on else None
    softcap = (cap or 30.0) if (softcap_on or cap) else None
    config = triton_backend.GPU_CANDIDATES[config_name] if config_name else None
    record = dict(
        arch=arch, dtype=dtype_name, shape=name, n=n, d=d, v=v, bias=bias_on, softcap=softcap is not None,
        entropy=entropy_on, config=config_name or "auto", tf32=tf32, triton=triton.__version__,
    )
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    start = time.perf_counter()
    try:
        with CompileLaunches(arch) as launches:
            triton_backend.forward(hidden, weight, targets, bias=bias, alpha=0.7, softcap=softcap,
                                   return_entropy=entropy_on, config=config)
    except Exception as exc:  # reported per case; the test fails on any
        return [dict(record, kernel="?", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    seconds = time.perf_counter() - start
    cfg = config or triton_backend.kernel_config(torch.device("meta"), dtype)
    out = []
    for kernel_name, kernel in launches.compiled:
        out.append(dict(
            record, kernel=kernel_name, error=None, seconds=round(seconds, 2),
            dynamic_shared_bytes=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
            block=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}", num_stages=cfg.num_stages,
            **cubin_figures(kernel.asm["cubin"], WORKDIR),
        ))
    return out


def cases(quick: bool):
    shapes = [s for s in SHAPES if not quick or s[0] in QUICK_SHAPES]
    for arch in (90, 80):
        for dtype_name in DTYPES:
            for shape in shapes:
                features = FEATURES if shape[0] in ("ragged", "llama3-8b") else FEATURES[:2]
                for feat in features:
                    yield dict(arch=arch, dtype_name=dtype_name, shape=shape, features=feat)
            if dtype_name == "fp32":  # torch.backends.cuda.matmul.allow_tf32 picks tf32 tensor cores
                yield dict(arch=arch, dtype_name="fp32", shape=SHAPES[6], features=FEATURES[0], tf32=True)
    # The launch-config candidates at the SPEC shape, Hopper, bf16.
    for config_name in triton_backend.GPU_CANDIDATES:
        for feat in (FEATURES[0], (False, True, True)):
            yield dict(arch=90, dtype_name="bf16", shape=SHAPES[6], features=feat, config_name=config_name)


WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"endokern-aot-{os.getpid()}"


def summary(data) -> str:
    """Markdown: the split kernel at the Llama 3 head per target, dtype and options; then the launch candidates."""
    recs = [r for r in data["records"] if not r["error"] and r["kernel"] == "_soft_values_split_kernel"
            and r["shape"] == "llama3-8b"]
    head = ("| target | dtype | options | tile | registers | spills (B) | shared KB | SASS instructions | MMA | "
            "MUFU.EX2 |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")

    def line(r, label):
        feat = "+".join(k for k in ("bias", "softcap", "entropy", "tf32") if r[k]) or "plain"
        mma = f"{r['hgmma']} HGMMA" if r["hgmma"] else (f"{r['hmma']} HMMA" if r["hmma"] else "FMA")
        shared = (r["dynamic_shared_bytes"] + r["static_shared_bytes"]) / 1024
        return (f"| sm_{r['arch']} | {r['dtype']} | {feat} | {label} | {r['registers']} | {r['stack_bytes']} | "
                f"{shared:.0f} | {r['instructions']} | {mma} | {r['ex2']} |")

    out = [f"Triton {data['triton']}, split kernel at N=32768, D=4096, V=128256 (the merge kernel: 32 registers):",
           "", head]
    out += [line(r, r["block"] + f" s{r['num_stages']}") for r in recs if r["config"] == "auto"]
    out += ["", f"Launch-config candidates (sm_90, bf16), Triton {data['triton']}:", "", head]
    out += [line(r, r["config"]) for r in recs if r["config"] != "auto"]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, help="print the markdown tables of a --json file and exit")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (N = 1, V <= 8192, the SPEC heads)")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return 0
    WORKDIR.mkdir(parents=True, exist_ok=True)
    records = []
    start = time.perf_counter()
    for case in cases(args.quick):
        records.extend(compile_case(**case))
    elapsed = time.perf_counter() - start
    print(f"# Triton {triton.__version__}, {len(records)} kernel compiles in {elapsed:.0f} s")
    cols = ("arch", "dtype", "shape", "config", "kernel", "registers", "local_bytes", "dynamic_shared_bytes",
            "instructions", "hgmma", "ex2")
    print(" | ".join(cols) + " | features")
    seen = set()
    for r in records:
        if r["error"]:
            print(f"{r['arch']} | {r['dtype']} | {r['shape']} | {r['config']} | {r['kernel']} | ERROR {r['error']}")
            continue
        feat = ",".join(k for k in ("bias", "softcap", "entropy", "tf32") if r[k]) or "-"
        key = tuple(r[c] for c in cols if c != "shape") + (feat,)
        if key in seen:  # the same compiled kernel (shapes differ only in values the JIT does not specialize)
            continue
        seen.add(key)
        print(" | ".join(str(r[c]) for c in cols) + f" | {feat}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(triton=triton.__version__, seconds=elapsed, records=records), indent=1))
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
