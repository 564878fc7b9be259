"""What the GPU check ran on, in about ten seconds, written before anything else: preflight.json.

Python, torch, triton, CUDA and transformers versions; the device's name, SM count, L2 size, memory (total and
free) and clocks; whether a C compiler and Python.h exist (Triton builds its launchers with them); Cut
Cross-Entropy and Liger (imported, or why not); the commit of the tree that ran (from --commit-file, else git
where the copy has a working .git, else .gpu-check/commit.json written by benchmarks/gpu/stamp_commit.py before
the device call); the launch configs of GPU_CANDIDATES. Every part that fails says why in the file instead of stopping it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SMI_FIELDS = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,utilization.gpu,memory.used,memory.total,persistence_mode,compute_mode")


def run(cmd, timeout=8):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()[:300]}")
    return out.stdout.strip()


def commit(commit_file):
    """--commit-file, else git where the tree has a working .git, else the stamp .gpu-check/commit.json that
    benchmarks/gpu/stamp_commit.py wrote before the device call (a copy of the tree may travel without .git)."""
    stamp = ROOT / ".gpu-check" / "commit.json"
    problems = []
    if commit_file:
        return {**json.loads(Path(commit_file).read_text()), "source": str(commit_file)}
    if (ROOT / ".git").exists() and shutil.which("git"):
        try:
            from stamp_commit import git_state

            return {**git_state(), "source": "git"}
        except Exception as exc:  # noqa: BLE001 - a .git without its objects, say
            problems.append(f"git: {exc}")
    if stamp.exists():
        return {**json.loads(stamp.read_text()), "source": str(stamp.relative_to(ROOT))}
    return {"commit": None, "reason": "no --commit-file, no working .git and no .gpu-check/commit.json (run "
            "benchmarks/gpu/stamp_commit.py before the device call and carry .gpu-check)" +
            (f"; {'; '.join(problems)}" if problems else "")}


def compiler():
    cc = os.environ.get("CC")
    found = {}
    for name in ([cc] if cc else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            try:
                version = run([path, "--version"]).splitlines()[0]
            except Exception as exc:  # noqa: BLE001
                version = f"{type(exc).__name__}: {exc}"
            found[name] = {"path": path, "version": version}
    include = sysconfig.get_paths().get("include")
    header = Path(include or "", "Python.h")
    return {"compilers": found, "c_compiler": bool(found), "python_h": str(header) if header.exists() else None,
            "python_h_found": header.exists()}


def device():
    import torch

    info = {"cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    info.update(
        name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
        l2_bytes=getattr(props, "L2_cache_size", None), total_bytes=total, free_bytes=free,
        device_count=torch.cuda.device_count(),
    )
    for field in ("clock_rate", "memory_clock_rate", "memory_bus_width", "max_threads_per_multi_processor",
                  "shared_memory_per_block_optin", "regs_per_multiprocessor"):
        if hasattr(props, field):
            info[field] = getattr(props, field)
    return info


def smi():
    if not shutil.which("nvidia-smi"):
        return {"reason": "nvidia-smi is not on the PATH"}
    line = run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    return dict(zip(SMI_FIELDS.split(","), [x.strip() for x in line.splitlines()[0].split(",")]))


def versions():
    import torch

    out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None}
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        pass
    for module in ("triton", "transformers", "numpy"):
        try:
            out[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001
            out[module] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    return out


def contenders():
    sys.path.insert(0, str(HERE))
    import checklib as ck

    return {"cce": ck.package_version("cut_cross_entropy"), "liger": ck.package_version("liger_kernel")}


def kernels():
    sys.path.insert(0, str(ROOT))
    import torch

    from endokern.ops import triton_backend
    from endokern.ops.registry import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "backends": available_backends(device),
        "interpreting": triton_backend.triton_interpreting(),
        "default": triton_backend.kernel_config(device, torch.bfloat16)._asdict(),
        "gpu_candidates": {k: {f: v for f, v in c._asdict().items() if v not in (False, None)}
                           for k, c in triton_backend.GPU_CANDIDATES.items()},
    }


def host():
    info = {"cpus": os.cpu_count(), "uname": " ".join(platform.uname())}
    try:
        with open("/proc/meminfo") as f:
            mem = dict(line.split(":", 1) for line in f)
        info["mem_total"] = mem["MemTotal"].strip()
        info["mem_available"] = mem.get("MemAvailable", "").strip()
    except OSError:
        pass
    info["disk_free_gib"] = round(shutil.disk_usage("/tmp").free / 2**30, 1)
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("TRITON", "CUDA", "PYTHONPATH", "NVIDIA", "HF_", "TORCH"))}
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--item-cap", type=float, default=None)
    parser.add_argument("--commit-file", default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    info = {"mode": "dry-run" if args.dry_run else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    failed = []
    for name, part in (("commit", lambda: commit(args.commit_file)), ("versions", versions), ("device", device),
                       ("nvidia_smi", smi), ("compiler", compiler), ("host", host), ("contenders", contenders),
                       ("kernels", kernels)):
        t0 = time.perf_counter()
        try:
            info[name] = part()
        except Exception as exc:  # noqa: BLE001 - each part says why it failed; the others still run
            info[name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            failed.append(name)
        info.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 2)
    dev = info.get("device", {})
    if dev.get("name"):
        info["device_name"] = dev["name"]
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            import torch
            from contenders import device_name

            info["device_name"] = device_name(torch.device("cpu"))
        except Exception as exc:  # noqa: BLE001
            info["device_name"] = f"unknown ({type(exc).__name__})"
    info["status"] = "ok" if not failed else "failed"
    if failed:
        info["reason"] = "parts that failed: " + ", ".join(failed)
    info["seconds"] = round(time.perf_counter() - start, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    dev_line = (f"{dev.get('name')}, {dev.get('sms')} SMs, L2 {round((dev.get('l2_bytes') or 0) / 2**20)} MiB, "
                f"{round((dev.get('free_bytes') or 0) / 2**30)} of {round((dev.get('total_bytes') or 0) / 2**30)} GiB "
                "free") if dev.get("name") else info["device_name"]
    v = info.get("versions", {})
    print(f"# preflight ({info['seconds']} s): {dev_line}; python {v.get('python')}, torch {v.get('torch')}, "
          f"triton {v.get('triton')}, cuda {v.get('cuda')}; commit {info.get('commit', {}).get('commit')}"
          + (f"; FAILED parts: {', '.join(failed)}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
