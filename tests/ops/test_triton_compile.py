"""The Triton kernels compile for sm_90 and sm_80 ahead of time, with no GPU (benchmarks/triton_compile.py).

These tests compile only the cases they assert (``triton_compile.py --unit``: N = 1, D = N = V = 1, one vocabulary
split, the Llama 3 head plain and with every option, D not a multiple of 16, a transposed head, tf32, fp16, and the
candidates with figures of their own: TMA + warp specialization, the main-loop probe, two blocks per SM), on both
targets, with the Triton installed here and with the H200 test machine's Triton (3.6.0, from the Python named by
ENDOKERN_TRITON36_PYTHON, default ``.venv-t36/bin/python``). The whole matrix (every shape of the SPEC, every option
and candidate) is a CI step of its own in ``.ci/run`` and a benchmark (``python benchmarks/triton_compile.py``), with
its budget stated there: a busy machine cannot make a unit test fail by being slow (the subprocesses' timeout only
catches a hang). ENDOKERN_REQUIRE_TRITON36=1 makes a missing 3.6 environment fail instead of skip.

The interpreter never specializes integer arguments nor lowers ``tl.dot`` to tensor cores, so only a real compile
sees a kernel that breaks when N = 1 or V <= 8192, spills registers, overflows shared memory or misses wgmma.
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
HANG = 3 * 3600  # seconds: only a hung compiler or interpreter gets here; the work takes minutes even on a busy machine
CHECKS = ("compiles", "no_spills", "fits", "tensor_cores", "candidates", "coverage")


def _triton_version(python):
    try:
        out = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, timeout=HANG)
    except OSError:
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
    """The unit cases compiled by each Triton, one after the other (compiles are heavy): {label: parsed JSON}."""
    pythons = _interpreters()
    if not pythons:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = {}
    for label, (python, _) in pythons.items():
        out = tmp_path_factory.mktemp("aot") / f"{label}.json"
        proc = subprocess.run([python, str(SCRIPT), "--unit", "--json", str(out)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=HANG)
        assert out.exists(), f"triton {label}: the compile script wrote no JSON:\n{proc.stdout[-4000:]}"
        results[label] = json.loads(out.read_text())
        results[label]["log"] = proc.stdout
    return results


def _versions():
    return [pytest.param(label, id=f"triton-{label}") for label in ("installed", "3.6.0")]


def _run(compiled, label):
    if label not in compiled:
        pytest.skip(f"no Python with Triton {label} here (ENDOKERN_TRITON36_PYTHON)")
    return compiled[label]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("label", _versions())
def test_compile_checks(compiled, label, check):
    """Each check of triton_compile.problems: compiles, no spills, fits, tensor cores, candidates, coverage."""
    found = _run(compiled, label)["problems"][check]
    assert not found, "\n".join(found[:20])


@pytest.mark.parametrize("label", _versions())
def test_unit_cases_are_what_the_tests_claim(compiled, label):
    """The subset really holds the cases the module docstring names, split and merge kernel for each."""
    records = [r for r in _run(compiled, label)["records"] if not r["error"]]
    cases = {(r["arch"], r["dtype"], r["shape"], r["layout"], r["config"]) for r in records}
    for arch in (90, 80):
        for dtype in ("fp32", "bf16"):
            for shape in ("n1", "ones", "v8192", "llama3-8b", "d-not-16"):
                assert (arch, dtype, shape, "row-major", "auto") in cases
            assert (arch, dtype, "llama3-8b", "transposed-head", "auto") in cases
        assert (arch, "fp16", "llama3-8b", "row-major", "auto") in cases
        assert any(r["tf32"] and r["arch"] == arch for r in records)
    for config in ("tma-ws-128x128", "mainloop", "2-per-sm"):
        assert (90, "bf16", "llama3-8b", "row-major", config) in cases
    everything = [r for r in records if r["shape"] == "llama3-8b" and r["bias"] and r["softcap"] and r["entropy"]]
    assert {r["kernel"] for r in everything} == {"_soft_values_split_kernel", "_merge_splits_kernel"}
    for arch in (90, 80):  # the logit sum (self-certainty) with every other option: both kernels, both targets
        for dtype in ("fp32", "bf16"):
            with_sum = {r["kernel"] for r in everything if r.get("logit_sum") and (r["arch"], r["dtype"]) == (arch, dtype)}
            assert with_sum == {"_soft_values_split_kernel", "_merge_splits_kernel"}, (arch, dtype)


@pytest.mark.parametrize("label", _versions())
def test_tma_warp_specialized_candidate(compiled, label):
    """The TMA + warp-specialized candidate: TMA loads, wgmma, a producer and two consumer warpgroups (4 warps
    asked, 12 launched) trading registers with setmaxnreg, no spills with bias, softcap and entropy."""
    records = [r for r in _run(compiled, label)["records"]
               if r["config"] == "tma-ws-128x128" and r["kernel"] == "_soft_values_split_kernel"]
    assert any(r["bias"] and r["softcap"] and r["entropy"] for r in records)
    for r in records:
        assert r["tma_loads"] > 0 and r["hgmma"] > 0
        assert r["num_warps"] == 3 * r["requested_warps"] and r["setmaxnreg"] > 0, (r["num_warps"], r["setmaxnreg"])
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0


@pytest.mark.parametrize("label", _versions())
def test_narrow_load_layouts_take_their_own_config(compiled, label):
    """D not a multiple of 16 and a transposed head get the narrow-load config (no spills is test_compile_checks)."""
    import torch

    from endokern.ops.triton_backend import GPU_CANDIDATES, kernel_config

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    seen = set()
    for r in _run(compiled, label)["records"]:
        if r["kernel"] != "_soft_values_split_kernel" or r["config"] != "auto" or r["shape"] == "ones":
            continue
        narrow = r["shape"] == "d-not-16" or r["layout"] == "transposed-head"
        cfg = kernel_config(torch.device("cuda"), dtypes[r["dtype"]], wide_loads=not narrow)
        if r.get("logit_sum") and cfg == GPU_CANDIDATES["default"]:
            cfg = cfg._replace(num_stages=2)  # launch_config's rule for the logit sum (no spill with 2 stages)
        assert (r["block"], r["num_stages"]) == (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}", cfg.num_stages), (
            f"sm_{r['arch']} {r['dtype']} {r['shape']} {r['layout']}: {r['block']} s{r['num_stages']}")
        seen.add(narrow)
    assert seen == {True, False}
    assert kernel_config(torch.device("cuda"), torch.bfloat16, wide_loads=False) != kernel_config(
        torch.device("cuda"), torch.bfloat16)


def test_interpreter_battery_under_the_h200_triton():
    """The interpreter tests of the Triton backend pass under Triton 3.6.0's interpreter (and numpy < 2.4) too."""
    pythons = _interpreters()
    if "3.6.0" not in pythons or pythons.get("installed", (None, None))[1] == "3.6.0":
        pytest.skip("no Python with Triton 3.6.0 here, or it is the one running these tests")
    proc = subprocess.run(
        [pythons["3.6.0"][0], "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         "tests/ops/test_soft_values.py", "tests/ops/test_triton_kernel.py", "-k", "triton or interpreter or tma"],
        env=dict(os.environ, TRITON_INTERPRET="1"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=HANG,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
