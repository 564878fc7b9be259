"""summary.md of a GPU check's result folder: the tables a reader needs first, from the JSON rows alone.

    python benchmarks/gpu/summarize.py DIR        # prints it (and writes DIR/summary.md with --write)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jsonrows import read_rows  # noqa: E402

STEP_FILES = [("compile", "compile.jsonl"), ("correctness", "correctness.jsonl"), ("decisive", "kernels.jsonl"),
              ("ablation", "kernels.jsonl"), ("l2", "probes.jsonl"), ("sweep", "kernels.jsonl"), ("e2e", "e2e.jsonl")]


def fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def items(rows, step):
    """The last row of each item of a step, in plan order."""
    out = {}
    for r in rows:
        if r.get("step") == step and r.get("kind") == "item":
            out[r["item"]] = r
    return out


def short(reason, n=140):
    reason = " ".join(str(reason or "").split())
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def kernel_table(rows):
    lines = ["| shape | contender | status | ms | TFLOP/s | x matmul | rel err | extra MB | first call s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {short(r.get('reason'), 90)}"
        lines.append(f"| {r.get('shape', '-')} | {r.get('contender', r['item'])} | {status} | {fmt(r.get('ms_median'))} "
                     f"| {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('x_matmul'), '.3f')} | {fmt(r.get('rel_err'), '.1e')} "
                     f"| {fmt(r.get('extra_mb'), '.0f')} | {fmt(r.get('first_call_s'), '.2f')} |")
    return lines


def summarize(folder):
    folder = Path(folder)
    out = [f"# GPU check: {folder.name}", ""]
    try:
        pre = json.loads((folder / "preflight.json").read_text())
    except (OSError, ValueError) as exc:
        pre = {"status": "failed", "reason": f"preflight.json: {exc}"}
    dev, ver, commit = pre.get("device", {}), pre.get("versions", {}), pre.get("commit", {})
    smi = pre.get("nvidia_smi", {})
    cc = pre.get("compiler", {})
    out.append(f"- device: {pre.get('device_name')}" + (
        f", {dev.get('sms')} SMs, L2 {round((dev.get('l2_bytes') or 0) / 2**20)} MiB, "
        f"{round((dev.get('free_bytes') or 0) / 2**30)} of {round((dev.get('total_bytes') or 0) / 2**30)} GiB free"
        if dev.get("name") else ""))
    if smi.get("clocks.sm"):
        out.append(f"- clocks: SM {smi.get('clocks.sm')} (max {smi.get('clocks.max.sm')}), memory {smi.get('clocks.mem')}"
                   f" (max {smi.get('clocks.max.mem')}), driver {smi.get('driver_version')}, power {smi.get('power.draw')}")
    out.append(f"- python {ver.get('python')}, torch {ver.get('torch')}, triton {ver.get('triton')}, CUDA "
               f"{ver.get('cuda')}, transformers {ver.get('transformers')}; C compiler {cc.get('c_compiler')}, "
               f"Python.h {cc.get('python_h_found')}")
    out.append(f"- commit {commit.get('commit')} ({commit.get('source')}); {len(commit.get('modified') or [])} files "
               f"modified, {len(commit.get('untracked') or [])} untracked")
    out.append(f"- preflight: {pre.get('status')}" + (f" ({short(pre.get('reason'))})" if pre.get("reason") else ""))
    out.append("")

    all_rows = {}
    out += ["| step | status | s / cap | ok | failed | skipped |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for step, file in STEP_FILES:
        rows = read_rows(folder / file)
        all_rows[step] = rows
        its = items(rows, step)
        steps = [r for r in rows if r.get("step") == step and r.get("kind") == "step"]
        st = steps[-1] if steps else {"status": "not run"}
        count = lambda s, its=its: sum(1 for r in its.values() if r["status"] == s)  # noqa: E731
        out.append(f"| {step} | {st['status']} | {fmt(st.get('seconds'), '.0f')} / {fmt(st.get('cap_s'), '.0f')} | "
                   f"{count('ok')} | {count('failed')} | {count('skipped')} |")
    out.append("")

    corr = items(all_rows["correctness"], "correctness")
    bad = [r for r in corr.values() if r["status"] != "ok"]
    out.append(f"## Correctness: {len(corr) - len(bad)} of {len(corr)} checks passed")
    out += [f"- {r['item']}: {r['status']}: {short(r.get('reason'), 200)}" for r in bad[:15]]
    if len(bad) > 15:
        out.append(f"- ... and {len(bad) - 15} more (correctness.jsonl has every reason)")
    out.append("")

    decisive = list(items(all_rows["decisive"], "decisive").values())
    out += ["## Decisive row (bf16)", ""] + kernel_table(decisive) + [""]
    ok = [r for r in decisive if r["status"] == "ok" and r.get("x_matmul") and r.get("rel_err") is not None]
    if ok:  # the timing probe (no rel_err) is no contender
        best = min(ok, key=lambda r: r["ms_median"])
        out.append(f"Fastest correct contender: {best['contender']} ({fmt(best['ms_median'])} ms, "
                   f"{fmt(best.get('x_matmul'), '.3f')}x the bare matmul).")
        out.append("")

    ablation = list(items(all_rows["ablation"], "ablation").values())
    out += ["## GPU_CANDIDATES ablation", ""] + kernel_table(ablation) + [""]
    correct = [r for r in ablation if r["status"] == "ok" and r.get("rel_err") is not None and r.get("x_matmul")]
    if correct:
        best = min(correct, key=lambda r: r["ms_median"])
        out.append(f"Fastest correct launch config: {best['contender']} ({fmt(best['ms_median'])} ms, "
                   f"{fmt(best['x_matmul'], '.3f')}x the bare matmul).")
        out.append("")

    probes = items(all_rows["l2"], "l2")
    out += ["## Memory and compute ceilings", "", "| probe | status | ms | TB/s | TFLOP/s |", "| --- | --- | ---: | ---: | ---: |"]
    for r in probes.values():
        out.append(f"| {r['item']} | {r['status'] if r['status'] == 'ok' else short(r.get('reason'), 80)} | "
                   f"{fmt(r.get('ms_median'))} | {fmt(r.get('tb_per_s'))} | {fmt(r.get('tflops'))} |")
    out.append("")

    sweep = list(items(all_rows["sweep"], "sweep").values())
    shapes = list(dict.fromkeys(r.get("shape") for r in sweep))
    names = list(dict.fromkeys(r.get("contender") for r in sweep if r.get("contender") != "matmul"))
    out += ["## SPEC sweep (bf16): time over the bare matmul's (matmul ms in its column)", "",
            "| shape | matmul ms | " + " | ".join(names) + " |", "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for shape in shapes:
        by = {r.get("contender"): r for r in sweep if r.get("shape") == shape}
        mm = by.get("matmul", {})
        cells = []
        for name in names:
            r = by.get(name)
            cells.append("-" if r is None else fmt(r.get("x_matmul"), ".2f") if r["status"] == "ok" else r["status"])
        out.append(f"| {shape} | {fmt(mm.get('ms_median'))} | " + " | ".join(cells) + " |")
    out.append("")

    e2e = items(all_rows["e2e"], "e2e")
    out += ["## End to end", ""]
    for name in ("endokern", "hf-naive"):
        r = e2e.get(name)
        if r and r["status"] == "ok":
            out.append(f"- {r.get('contender')}: {fmt(r.get('tokens_per_s'), '.0f')} tokens/s, "
                       f"{fmt(r.get('seconds_run'), '.2f')} s, peak extra {fmt(r.get('peak_extra_mb'), '.0f')} MB")
    cmp_row = e2e.get("compare")
    if cmp_row and cmp_row["status"] == "ok":
        out.append(f"- speed-up {fmt(cmp_row.get('speedup'), '.2f')}x, memory {fmt(cmp_row.get('memory_ratio'), '.3f')}x,"
                   f" summed log-probs agree to {fmt(cmp_row.get('logprob_max_rel_diff'), '.1e')}")
    out.append("")

    failed = [(step, r) for step, rows in all_rows.items() for r in items(rows, step).values() if r["status"] == "failed"
              and step not in ("correctness", "decisive", "ablation")]
    if failed:
        out.append("## Other failed rows")
        out += [f"- {step}/{r['item']}: {short(r.get('reason'), 200)}" for step, r in failed[:25]]
        if len(failed) > 25:
            out.append(f"- ... and {len(failed) - 25} more (the .jsonl files have every reason)")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    text = summarize(argv[0])
    if "--write" in argv:
        (Path(argv[0]) / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
