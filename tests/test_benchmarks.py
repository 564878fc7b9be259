"""The pytest-benchmark suites in benchmarks/ run (ENDOKERN_BENCH_QUICK=1: small shapes) and write their JSON.

A smoke run, not a timing: it asserts that every contender that runs here ran, that each group holds the bare
matmul beside the others, and that extra_info carries the ratios; never a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from limits import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def _run(suite, out):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ENDOKERN_BENCH_QUICK"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"benchmarks/{suite}",
         "--benchmark-group-by=group", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return json.loads(Path(out).read_text())["benchmarks"]


def test_kernel_suite_runs_and_writes_json(tmp_path):
    from endokern.ops.registry import unavailable_reason

    rows = _run("test_kernels.py", tmp_path / "kernels.json")
    by_name = {r["extra_info"]["contender"]: r for r in rows}
    expected = {"matmul", "naive", "torch"} | ({"cpu"} if unavailable_reason("cpu", "cpu") is None else set())
    try:  # Cut Cross-Entropy's torch.compile path is a CPU contender where it is installed (the test extra)
        import cut_cross_entropy  # noqa: F401

        expected.add("cce")
    except ImportError:
        pass
    assert expected <= set(by_name), sorted(by_name)
    assert len({r["group"] for r in rows}) == 1  # one shape and dtype in quick mode: every contender side by side
    for r in rows:
        info = r["extra_info"]
        assert r["stats"]["rounds"] >= 3 and r["stats"]["median"] > 0
        assert info["ratio_to_matmul"] > 0 and info["tflops"] > 0
        if info["contender"] != "matmul":  # every output was checked against the torch backend before timing
            assert info["relative_error"] is not None and info["relative_error"] <= 2e-2


def test_e2e_suite_runs_and_writes_json(tmp_path):
    rows = _run("test_e2e.py", tmp_path / "e2e.json")
    names = {r["extra_info"]["contender"].split(" ")[0] for r in rows}
    assert names == {"endokern", "hf-naive"}
    endo = next(r for r in rows if r["extra_info"]["contender"] == "endokern")
    assert endo["extra_info"]["speedup_over_naive"] > 0 and endo["extra_info"]["tokens_per_s"] > 0
    assert endo["extra_info"]["logprob_max_rel_diff"] <= 1e-3


def test_no_script_folder_module_shadows_an_installed_package():
    """benchmarks/, scripts/ and examples/ go on sys.path when their scripts or pytest run them: a module there named
    like an installed package's top-level module (as ``kernels``, which transformers imports for hub kernels) would be
    imported in its place."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    installed |= set(sys.stdlib_module_names)
    clashes = []
    for folder in ("benchmarks", "scripts", "examples", "tests"):
        for path in (ROOT / folder).iterdir():
            name = path.stem if path.suffix == ".py" else (path.name if (path / "__init__.py").exists() else None)
            if name and name in installed and name != "conftest":
                clashes.append(f"{folder}/{path.name}")
    assert not clashes, f"these shadow an installed or standard module of the same name: {clashes}"
