"""The one-call GPU check (benchmarks/gpu_check.sh, benchmarks/gpu/): its dry run on the CPU writes every file and
a row for every item it plans (a failed row, with its reason, counts as a row), and the step runner keeps the rows
of a step that crashes, hangs or reaches its cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import run_steps  # noqa: E402
from jsonrows import read_rows  # noqa: E402

DRY_RUN_SLACK = 60  # seconds over the dry run's budget for process start and the summary


def _items(rows, step):
    return {r["item"]: r for r in rows if r.get("step") == step and r.get("kind") == "item"}


def _plan(rows, step):
    return [r for r in rows if r.get("step") == step and r.get("kind") == "plan"][-1]["items"]


def _ok_unless_capped(row):
    """A row that must pass, unless the dry run ran out of time on a slow machine (then it says so)."""
    if row.get("filled"):
        assert "cap" in row["reason"] or "ended" in row["reason"], row
        return
    assert row["status"] == "ok", row


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT",)}
    env["PYTHON"] = sys.executable
    start = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=run_steps.DRY_BUDGET + 300)
    return out, proc, time.monotonic() - start


def test_dry_run_writes_every_file_within_its_budget(dry_run):
    out, proc, seconds = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(run_steps.FILES), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert len(run_steps.FILES) <= 8  # the device tool returns at most 8 files
    assert seconds <= run_steps.DRY_BUDGET + DRY_RUN_SLACK, f"the dry run took {seconds:.0f} s"
    assert "# gpu check:" in proc.stdout and "## Decisive row" in proc.stdout  # the summary is printed last
    pre = json.loads((out / "preflight.json").read_text())
    assert pre["mode"] == "dry-run" and pre["device_name"]
    for part in ("versions", "device", "compiler", "commit", "host", "contenders", "kernels"):
        assert part in pre, part
    assert pre["versions"]["torch"] and pre["versions"]["triton"]
    assert pre["commit"].get("commit") or pre["commit"].get("reason")
    assert pre["compiler"]["python_h_found"] in (True, False)
    summary = (out / "summary.md").read_text()
    for heading in ("## Correctness", "## Decisive row", "## GPU_CANDIDATES ablation", "## SPEC sweep", "## End to end"):
        assert heading in summary


def test_dry_run_has_a_row_for_every_planned_item(dry_run):
    out, proc, _ = dry_run
    for step, _, file, _, _ in run_steps.STEPS:
        if not file.endswith(".jsonl"):
            continue
        rows = read_rows(out / file)
        steps = [r for r in rows if r.get("step") == step and r.get("kind") == "step"]
        assert steps, f"{step}: no step row\n{proc.stdout[-2000:]}"
        plan = _plan(rows, step)
        items = _items(rows, step)
        assert plan and set(plan) == set(items), f"{step}: planned {plan}, rows {sorted(items)}"
        for row in items.values():
            assert row["status"] in ("ok", "failed", "skipped"), row
            if row["status"] != "ok":
                assert row.get("reason"), f"{step}/{row['item']}: {row['status']} without a reason"


def test_dry_run_rows_cover_the_candidates_and_contenders(dry_run):
    out, _, _ = dry_run
    from endokern.ops.triton_backend import GPU_CANDIDATES

    names = list(GPU_CANDIDATES) + [n for n in ("default", "mainloop", "tma-ws-128x128") if n not in GPU_CANDIDATES]
    kernels = read_rows(out / "kernels.jsonl")
    decisive = {r["contender"]: r for r in _items(kernels, "decisive").values()}
    assert set(decisive) == {"matmul", "triton", "triton[mainloop]", "triton[tma-ws-128x128]", "cce", "liger", "naive"}
    for name in ("matmul", "triton", "naive"):
        _ok_unless_capped(decisive[name])
    for name in ("cce", "liger"):  # skipped under the interpreter, or failed to import: never absent
        assert decisive[name]["status"] in ("ok", "skipped", "failed") and (
            decisive[name]["status"] == "ok" or decisive[name]["reason"])
    ablation = {r["contender"]: r for r in _items(kernels, "ablation").values()}
    assert set(ablation) == {"matmul"} | {f"triton[{n}]" for n in names}
    for name in names:
        row = ablation[f"triton[{name}]"]
        if name not in GPU_CANDIDATES:
            assert row["status"] == "failed" and "GPU_CANDIDATES" in row["reason"]
        else:
            _ok_unless_capped(row)
            if not GPU_CANDIDATES[name].mainloop_only and not row.get("filled"):
                assert row["rel_err"] <= 1e-4  # fp32 accumulation of exact products, against the torch backend
    sweep = _items(kernels, "sweep")
    assert len({r["shape"] for r in sweep.values()}) == 9
    assert {r["contender"] for r in sweep.values()} == {"matmul", "triton", "naive", "torch", "cce", "liger"}

    correctness = _items(read_rows(out / "correctness.jsonl"), "correctness")
    for name in ("splits-fp32", "splits-fp16", "splits-bf16", "row-alone", "front-door-bf16", "large-logits-fp32"):
        _ok_unless_capped(correctness[name])
    for name in ("transposed-weight", "transposed-hidden"):  # a machine may refuse to reserve the 4.4 GB buffer
        assert correctness[name]["status"] == "ok" or correctness[name]["reason"]
    for name in names:
        if name in GPU_CANDIDATES and GPU_CANDIDATES[name].mainloop_only:
            assert f"row-alone[{name}]" not in correctness  # a timing probe computes no soft values
        else:
            assert {f"splits-fp16[{name}]", f"splits-bf16[{name}]", f"row-alone[{name}]"} <= set(correctness)

    compile_rows = _items(read_rows(out / "compile.jsonl"), "compile")
    assert {f"cand:{n}:plain" for n in names} <= set(compile_rows)
    assert {f"check:{n}" for n in correctness} <= set(compile_rows)
    probes = _items(read_rows(out / "probes.jsonl"), "l2")
    assert set(probes) == {"hbm-read", "l2-read", "copy", "matmul-8192"}
    e2e = _items(read_rows(out / "e2e.jsonl"), "e2e")
    assert set(e2e) == {"build-model", "naive-batch-search", "endokern", "hf-naive", "compare"}
    for row in e2e.values():
        _ok_unless_capped(row)


def test_collect_results_copies_into_a_device_folder(dry_run, tmp_path):
    out, _, _ = dry_run
    proc = subprocess.run([sys.executable, str(GPU / "collect_results.py"), str(out), "--dest", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("gpu-check-") and (folder / "kernels.jsonl").exists()
    assert (folder / "summary.md").read_text().startswith("# GPU check")


# ---- the step runner, with stand-in steps (no torch, seconds) -------------------------------------------------

STEP = """
import os, sys, time
sys.path.insert(0, {gpu!r})
from jsonrows import StepItems
mode, path = sys.argv[1], sys.argv[2]
def lost():
    raise RuntimeError("context gone")
items = StepItems(path, "fake", item_cap=float(os.environ.get("CAP", "30")), context_check=lost if mode == "lost" else None)
items.plan(["a", "b", "c"])
items.run("a", lambda: {{"value": 1}})
def b():
    if mode == "hang":
        time.sleep(60)
    if mode == "segv":
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "lost":
        raise RuntimeError("illegal memory access")
    if mode == "cap":
        time.sleep(60)
    return {{}}
items.run("b", b)
items.run("c", lambda: {{}})
"""


def _fake_step(tmp_path, mode, cap, item_cap=30):
    script = tmp_path / "fake_step.py"
    script.write_text(textwrap.dedent(STEP.format(gpu=str(GPU))))
    path = tmp_path / "fake.jsonl"
    env = dict(os.environ, CAP=str(item_cap))
    row = run_steps.run_step("fake", [sys.executable, str(script), mode, str(path)], path, cap, tmp_path / "log.txt",
                             env=env)
    return row, _items(read_rows(path), "fake")


def test_a_step_at_its_cap_keeps_its_rows_and_fills_the_rest(tmp_path):
    row, items = _fake_step(tmp_path, "cap", cap=3)
    assert row["status"] == "capped" and row["filled"] == 2
    assert items["a"]["status"] == "ok" and items["a"]["value"] == 1
    assert items["b"]["status"] == "failed" and "while this item ran" in items["b"]["reason"]
    assert items["c"]["status"] == "failed" and items["c"]["reason"].startswith("not reached")


def test_a_lost_cuda_context_restarts_the_step_after_its_rows(tmp_path):
    row, items = _fake_step(tmp_path, "lost", cap=60)
    assert row["status"] == "ok" and row["attempts"] == 2, row
    assert items["b"]["status"] == "failed" and "illegal memory access" in items["b"]["reason"]
    assert items["a"]["status"] == items["c"]["status"] == "ok"
    assert len([r for r in read_rows(tmp_path / "fake.jsonl") if r.get("item") == "a"]) == 1  # not run twice


def test_a_hung_item_is_a_failed_row_and_the_step_goes_on(tmp_path):
    row, items = _fake_step(tmp_path, "hang", cap=60, item_cap=2)
    assert row["status"] == "ok" and row["attempts"] == 2, row
    assert items["b"]["status"] == "failed" and "no result after 2 s" in items["b"]["reason"]
    assert items["c"]["status"] == "ok"


def test_a_crash_without_a_row_says_how_the_process_ended(tmp_path):
    row, items = _fake_step(tmp_path, "segv", cap=60)
    assert row["status"] == "failed" and "SIGSEGV" in row["exit"]
    assert items["a"]["status"] == "ok"
    assert items["b"]["status"] == "failed" and "SIGSEGV" in items["b"]["reason"]
    assert items["c"]["reason"].startswith("not reached")


def test_wheels_are_unpacked_without_pip(tmp_path):
    """gpu_check.sh unpacks every wheel of --wheels with `python -m zipfile -e`; preflight imports what they hold."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "liger_kernel-0.0.0-py3-none-any.whl", "w") as whl:
        whl.writestr("liger_kernel/__init__.py", "__version__ = '0.0.0-stand-in'\n")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--wheels", str(wheels),
                           "--steps", "preflight"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    liger = json.loads((out / "preflight.json").read_text())["contenders"]["liger"]
    assert liger["import"] and liger["version"] == "0.0.0-stand-in", liger


def test_unknown_arguments_are_refused():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
    proc = subprocess.run([sys.executable, str(GPU / "run_steps.py"), "--out", "/tmp/x", "--steps", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown nope" in proc.stderr


def test_no_module_of_the_gpu_check_shadows_an_installed_package():
    """Each script's folder is first on sys.path when it runs: a module there named like an installed package would
    be imported in its place."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = [p.name for p in GPU.iterdir() if p.suffix == ".py" and p.stem in installed]
    assert not clashes, clashes
