"""Every Triton kernel compiles for sm_90 and sm_80 ahead of time, with no GPU (benchmarks/triton_compile.py).

Run with the Triton installed here and with the H200 test machine's Triton (3.6.0, from the Python named by
ENDOKERN_TRITON36_PYTHON, default ``.venv-t36/bin/python``; ``.ci/run`` builds that venv). The interpreter
never specializes integer arguments nor lowers ``tl.dot`` to tensor cores, so only a real compile sees a
kernel that breaks when N = 1 or V <= 8192, spills registers, overflows shared memory or misses wgmma.
ENDOKERN_REQUIRE_TRITON36=1 makes a missing 3.6 environment fail instead of skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_compile.py"
PY36 = os.environ.get("ENDOKERN_TRITON36_PYTHON", str(ROOT / ".venv-t36" / "bin" / "python"))
REQUIRE36 = os.environ.get("ENDOKERN_REQUIRE_TRITON36") == "1"
# The CUDA limits a block may use: dynamic shared memory per block (sm_90: 227 KB, sm_80: 163 KB).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
REQUIRED_SHAPES = {"n1", "ones", "sixteens", "ragged", "v8192", "stories260k", "llama3-8b", "llama3-8b-n2048",
                   "qwen2.5-7b", "qwen2.5-7b-n8192", "gemma2-2b", "gemma2-2b-n2048"}
KERNELS = {"_soft_values_split_kernel", "_merge_splits_kernel"}


def _triton_version(python):
    try:
        out = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _interpreters():
    here = _triton_version(sys.executable)
    found = {}
    if here is not None:
        found["installed"] = (sys.executable, here)
    h200 = _triton_version(PY36) if Path(PY36).exists() else None
    if h200 == "3.6.0":
        found["3.6.0"] = (PY36, h200)
    elif REQUIRE36:
        raise RuntimeError(f"ENDOKERN_REQUIRE_TRITON36=1 but {PY36} has Triton {h200} (3.6.0 expected)")
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both compile runs at once (two cores in CI): {label: parsed JSON}."""
    pythons = _interpreters()
    if not pythons:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for label, (python, _) in pythons.items():
        out = tmp_path_factory.mktemp("aot") / f"{label}.json"
        proc = subprocess.Popen([python, str(SCRIPT), "--json", str(out)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[label] = (proc, out)
    battery = None
    if "3.6.0" in pythons and pythons.get("installed", (None, None))[1] != "3.6.0":
        # The interpreter tests of the Triton backend, under the H200's Triton (and numpy < 2.4 beside it).
        battery = subprocess.Popen(
            [pythons["3.6.0"][0], "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
             "tests/ops/test_soft_values.py", "-k", "triton"],
            env=dict(os.environ, TRITON_INTERPRET="1"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
    results = {}
    for label, (proc, out) in runs.items():
        log, _ = proc.communicate(timeout=1200)
        assert out.exists(), f"triton {label}: the compile script wrote no JSON:\n{log[-4000:]}"
        results[label] = json.loads(out.read_text())
        results[label]["log"] = log
    if battery is not None:
        log, _ = battery.communicate(timeout=1200)
        results["3.6.0"]["interpreter_rc"], results["3.6.0"]["interpreter_log"] = battery.returncode, log
    return results


def _versions():
    return [pytest.param(label, id=f"triton-{label}") for label in ("installed", "3.6.0")]


def _records(compiled, label):
    if label not in compiled:
        pytest.skip(f"no Python with Triton {label} here (ENDOKERN_TRITON36_PYTHON)")
    return compiled[label]["records"]


@pytest.mark.parametrize("label", _versions())
def test_every_kernel_compiles(compiled, label):
    records = _records(compiled, label)
    errors = [r for r in records if r["error"]]
    assert not errors, "\n".join(
        f"sm_{r['arch']} {r['dtype']} {r['shape']} {r['config']}: {r['error']}" for r in errors[:10]
    )
    assert {r["shape"] for r in records} == REQUIRED_SHAPES
    for arch in (80, 90):
        for dtype in ("fp32", "fp16", "bf16"):
            kernels = {r["kernel"] for r in records if r["arch"] == arch and r["dtype"] == dtype}
            assert kernels == KERNELS, f"sm_{arch} {dtype}: compiled {kernels}"
    # bias, softcap and entropy each change the kernel: every combination the backend launches compiled
    features = {(r["bias"], r["softcap"], r["entropy"]) for r in records if r["shape"] == "llama3-8b"}
    assert len(features) >= 5


@pytest.mark.parametrize("label", _versions())
def test_no_spills_and_shared_memory_fits(compiled, label):
    for r in _records(compiled, label):
        where = f"sm_{r['arch']} {r['dtype']} {r['shape']} {r['config']} {r['kernel']}"
        if r["shape"] != "ones":  # D = V = N = 1 proves every argument may equal 1; nobody scores that shape
            assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, (
                f"{where}: spills ({r['stack_bytes']} B stack, {r['local_bytes']} B local)"
            )
        shared = r["dynamic_shared_bytes"] + r["static_shared_bytes"]
        assert shared <= SHARED_LIMIT[r["arch"]], f"{where}: {shared} B of shared memory"
        assert 0 < r["registers"] <= 255


@pytest.mark.parametrize("label", _versions())
def test_half_precision_uses_the_tensor_cores(compiled, label):
    """bf16/fp16 on sm_90 must use wgmma (HGMMA); on sm_80, mma.sync (HMMA)."""
    for r in _records(compiled, label):
        if r["kernel"] != "_soft_values_split_kernel" or r["dtype"] == "fp32":
            continue
        where = f"sm_{r['arch']} {r['dtype']} {r['shape']} {r['config']}"
        if r["arch"] == 90:
            assert r["hgmma"] > 0, f"{where}: no HGMMA in the SASS ({r['mma_kinds']})"
        else:
            assert r["hmma"] > 0 and r["hgmma"] == 0, f"{where}: {r['mma_kinds']}"


@pytest.mark.parametrize("label", _versions())
def test_launch_config_candidates(compiled, label):
    """Every candidate of GPU_CANDIDATES compiles; the two-blocks-per-SM one really fits two blocks."""
    from endokern.ops.triton_backend import GPU_CANDIDATES

    records = [r for r in _records(compiled, label) if r["kernel"] == "_soft_values_split_kernel"]
    assert {r["config"] for r in records} >= set(GPU_CANDIDATES)
    for r in records:
        if r["config"] == "2-per-sm":
            assert r["registers"] * r["num_warps"] * 32 * 2 <= 65536
            assert 2 * (r["dynamic_shared_bytes"] + r["static_shared_bytes"]) <= 228 * 1024


def test_interpreter_battery_under_the_h200_triton(compiled):
    """tests/ops/test_soft_values.py's Triton cases pass under Triton 3.6.0's interpreter too."""
    if "interpreter_rc" not in compiled.get("3.6.0", {}):
        pytest.skip("no Python with Triton 3.6.0 here, or it is the one running these tests")
    log = compiled["3.6.0"]["interpreter_log"]
    assert compiled["3.6.0"]["interpreter_rc"] == 0, log[-4000:]
    assert " passed" in log and " failed" not in log
