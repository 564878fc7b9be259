"""What the machine offers a CPU run: how many CPUs this process may really use, and whether the CPU computes bf16
natively.

- Threads: the affinity mask (``os.sched_getaffinity``: taskset, cpusets, a scheduler's CPU binding) and the cgroup
  CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, along the process's own cgroup path), not
  the core count; and, on a machine that other processes keep busy, the CPUs they leave free (``busy_cpus``: the
  runnable threads of other processes, sampled when the model loads). ``ENDOKERN_THREADS`` or ``--threads``
  overrides it. torch's intra-op pool and the C++ kernel's OpenMP team use the same count.
- Precision: ``auto`` picks bfloat16 where the CPU has bf16 dot products (``avx512_bf16`` or ``amx_bf16`` in
  ``/proc/cpuinfo``) and float32 elsewhere, where bf16 is emulated (converted to fp32 and back) and slower than
  float32 itself.

This module imports nothing of torch at import time, so the command line can use it before loading a model.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import FrozenSet, Iterable, Optional, Tuple

__all__ = ["BF16_FLAGS", "CGROUP_ROOT", "EMULATED_BF16_COST", "THREADS_ENV", "ThreadPolicy", "auto_dtype",
           "busy_cpus", "busy_sample", "cgroup_cpu_limit", "cpu_flags", "emulated_bf16_warning", "native_bf16",
           "parse_threads", "resolve_threads", "usable_cpus"]

THREADS_ENV = "ENDOKERN_THREADS"
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 dot products
# What bf16 costs against float32 where it is emulated, as measured (benchmarks/NOTES.md, "CPU threads and
# precision"): SmolLM2-135M-Instruct end to end on 30 LLMBar responses, one thread, with oneDNN, ATen and the C++
# kernel held to AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, ENDOKERN_CPU_SIMD): 3.4x the CPU seconds of float32.
EMULATED_BF16_COST = "3.4x the CPU time of float32 end to end (measured on SmolLM2-135M with AVX2 only)"


# ------------------------------------------------------------------------------------------------------- precision

@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = CPUINFO) -> FrozenSet[str]:
    """The CPU's feature flags as the kernel lists them (``avx2``, ``avx512_bf16``, ``amx_bf16`` ...); empty where
    ``/proc/cpuinfo`` cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: Optional[Iterable[str]] = None) -> bool:
    """Whether the CPU computes bf16 dot products natively (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return any(f in flags for f in BF16_FLAGS)


def auto_dtype(device_type: str, flags: Optional[Iterable[str]] = None) -> Tuple[str, str]:
    """``(dtype name, reason)`` for ``--dtype auto``: bfloat16 on CUDA; on CPU bfloat16 where the CPU has native
    bf16 dot products, else float32; float32 on any other device."""
    if device_type == "cuda":
        return "bfloat16", "CUDA device"
    if device_type != "cpu":
        return "float32", f"{device_type} device"
    flags = cpu_flags() if flags is None else frozenset(flags)
    found = [f for f in BF16_FLAGS if f in flags]
    if found:
        return "bfloat16", f"the CPU has native bf16 dot products ({', '.join(found)})"
    return "float32", "the CPU has no native bf16 dot products (no avx512_bf16 or amx_bf16): bf16 would be emulated"


def emulated_bf16_warning(flags: Optional[Iterable[str]] = None) -> Optional[str]:
    """The one-line warning for an explicit bfloat16 on a CPU that emulates it (None where it is native)."""
    if native_bf16(flags):
        return None
    return (f"endokern: warning: this CPU has no native bf16 dot products (avx512_bf16, amx_bf16), so --dtype "
            f"bfloat16 is emulated: {EMULATED_BF16_COST}; use --dtype float32 or auto")


# --------------------------------------------------------------------------------------------------------- threads

def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _ancestors(rel: str) -> Iterable[str]:
    """``/a/b`` -> ``/a/b``, ``/a``, ``/``."""
    rel = "/" + rel.strip("/")
    while True:
        yield rel
        if rel == "/":
            return
        rel = os.path.dirname(rel)


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> Optional[float]:
    """The CPUs the cgroup quota allows this process (e.g. 1.5), the smallest along its cgroup path; None when
    there is no quota (or no cgroup file to read). cgroup v2 (``cpu.max``: ``QUOTA PERIOD`` or ``max PERIOD``) and
    v1 (``cpu.cfs_quota_us`` of -1 for none, ``cpu.cfs_period_us``)."""
    lines = (_read(proc_cgroup) or "").splitlines()
    v2_path, v1_path = "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2] or "/"
        elif "cpu" in parts[1].split(","):
            v1_path = parts[2] or "/"
    limits = []
    for rel in _ancestors(v2_path):  # v2: the unified hierarchy
        text = _read(os.path.join(root, rel.lstrip("/"), "cpu.max"))
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max":
                try:
                    limits.append(int(quota) / int(period or 100000))
                except ValueError:
                    pass
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # v1: the cpu controller's hierarchy
        for rel in _ancestors(v1_path):
            base = os.path.join(root, folder, rel.lstrip("/"))
            quota, period = _read(os.path.join(base, "cpu.cfs_quota_us")), _read(os.path.join(base,
                                                                                              "cpu.cfs_period_us"))
            try:
                if quota is not None and period is not None and int(quota) > 0 and int(period) > 0:
                    limits.append(int(quota) / int(period))
            except ValueError:
                pass
    return min(limits) if limits else None


def usable_cpus() -> Tuple[int, str]:
    """``(count, reason)``: the CPUs of the affinity mask, capped by the cgroup quota (rounded down, at least 1:
    a thread more than the quota is throttled at every barrier)."""
    count, reason = _affinity(), "affinity"
    quota = cgroup_cpu_limit()
    if quota is not None and math.floor(quota) < count:
        count, reason = max(1, math.floor(quota)), f"cgroup quota {quota:g} CPUs"
    return count, reason


def _procs_running(stat: str = "/proc/stat") -> Optional[int]:
    """The runnable threads of the whole machine now (``procs_running`` of ``/proc/stat``); None off Linux."""
    try:
        with open(stat, "rb") as f:
            text = f.read()
    except OSError:
        return None
    at = text.find(b"procs_running ")
    if at < 0:
        return None
    try:
        return int(text[at + 14: text.index(b"\n", at)])
    except ValueError:
        return None


def _own_running(task_dir: str = "/proc/self/task") -> int:
    """This process's threads that are running or runnable now (its own spinning OpenMP workers among them)."""
    count = 0
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "stat"), "rb") as f:
                text = f.read()
        except OSError:
            continue
        close = text.rfind(b")")
        if close >= 0 and text[close + 2: close + 3] == b"R":
            count += 1
    return max(1, count)


def busy_sample() -> int:
    """The CPUs other processes keep busy at this instant: the machine's runnable threads less this process's own;
    0 where it cannot be read."""
    total = _procs_running()
    if total is None:
        return 0
    return max(0, total - _own_running())


def busy_cpus(samples: int = 5, interval: float = 0.01) -> int:
    """The CPUs other processes keep busy now: the smallest of a few :func:`busy_sample` (a thread that runs only
    now and then is not counted)."""
    seen = []
    for i in range(max(1, samples)):
        seen.append(busy_sample())
        if i + 1 < samples:
            time.sleep(interval)
    return min(seen)


class ThreadPolicy:
    """The thread count of a CPU run, kept to the CPUs that are free while it runs (``adaptive``): before each batch
    :meth:`threads` looks at the machine (at most every ``every`` seconds: about 0.1 ms a look) and gives the usable
    CPUs less those other processes kept busy in the last ``window`` looks (the largest, so a core another process
    takes is given up at once and taken back only once it stayed free). A thread more than the free CPUs costs far
    more than a thread less: every parallel region of the forward then waits at its barrier for a thread that is not
    running, while the waiting threads spin. Not adaptive: always ``usable``."""

    def __init__(self, usable: int, adaptive: bool, *, window: int = 3, every: float = 0.05, sample=None):
        self.usable = max(1, int(usable))
        self.adaptive = adaptive and self.usable > 1
        self.window = max(1, window)
        self.every = every
        self._sample = sample or busy_sample
        self._seen: list = []
        self._last = -math.inf

    def threads(self) -> int:
        if not self.adaptive:
            return self.usable
        now = time.monotonic()
        if now - self._last >= self.every or not self._seen:
            self._last = now
            self._seen = (self._seen + [self._sample()])[-self.window:]
        return max(1, self.usable - max(self._seen))


def parse_threads(value) -> Optional[int]:
    """``--threads`` / ``ENDOKERN_THREADS``: a count >= 1, ``all`` (0: every usable CPU), ``adaptive`` (-1: the
    usable CPUs less the busy ones, looked at before each batch), or ``auto``/empty (None). ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"threads must be a count >= 1, 'all', 'auto' or 'adaptive', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"threads must be >= 1, got {value}")
        return value
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text == "all":
        return 0
    if text == "adaptive":
        return -1
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"threads must be a count >= 1, 'all', 'auto' or 'adaptive', got {value!r}") from None
    if count < 1:
        raise ValueError(f"threads must be >= 1, got {value!r}")
    return count


def resolve_threads(requested=None) -> Tuple[int, bool, str]:
    """``(threads, adaptive, reason)`` for a CPU run, from ``requested`` (``--threads``), else ``ENDOKERN_THREADS``,
    else ``OMP_NUM_THREADS`` (a count as given), else ``auto``. A count is taken as given; ``all`` and ``auto`` are
    every usable CPU (affinity mask, cgroup quota), fixed for the run, so a row's bits never depend on the load (a
    resumed run ends with the bytes of one never stopped; OpenMP threads wait passively, so a busy core costs little);
    ``adaptive`` is the usable CPUs less those that other processes keep busy, looked at again before each batch
    (fastest on a shared machine, but the count, and so the last bits of a row, can change between batches)."""
    try:
        value, source = parse_threads(requested), "--threads"
    except ValueError as err:
        raise ValueError(f"--threads: {err}") from None
    if requested is None or (value is None and str(requested).strip().lower() == ""):
        env = os.environ.get(THREADS_ENV)
        if env is not None and env.strip():
            try:
                value, source = parse_threads(env), THREADS_ENV
            except ValueError as err:
                raise ValueError(f"{THREADS_ENV}={env!r}: {err}") from None
        elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
            value, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if value is not None and value > 0:
        return value, False, f"{source}={value}"
    usable, why = usable_cpus()
    if value == 0:
        return usable, False, f"{source}=all: {usable} usable CPUs ({why})"
    if value is None:
        return usable, False, f"auto: {usable} usable CPUs ({why})"
    busy = busy_cpus()
    free = max(1, usable - busy)
    reason = f"adaptive: {usable} usable CPUs ({why})"
    if usable > 1:
        reason += f", {busy} kept busy by other processes now; looked at again before each batch"
    return free, True, reason
