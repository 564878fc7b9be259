"""Copies a GPU check's result files (the device tool's files_at folder, or any $OUT) to
benchmarks/results/gpu-check-<device>/, where they are committed; <device> is preflight.json's device name as a
file-name part ('NVIDIA H200' -> nvidia-h200). summary.md is written again from the rows.

    python benchmarks/gpu/collect_results.py /work/.device/<call>/files      # prints the folder it filled
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import summarize  # noqa: E402
from run_steps import FILES  # noqa: E402


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown-device"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the folder holding preflight.json and the .jsonl files")
    parser.add_argument("--dest", default=str(HERE.parent / "results"), help="default: benchmarks/results")
    args = parser.parse_args(argv)
    src = Path(args.source)
    found = list(src.rglob("preflight.json"))
    if not found:
        parser.error(f"no preflight.json under {src}")
    src = found[0].parent
    pre = json.loads((src / "preflight.json").read_text())
    dest = Path(args.dest) / f"gpu-check-{slug(pre.get('device_name') or 'unknown')}"
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    (dest / "summary.md").write_text(summarize.summarize(dest))
    print(f"{dest}: {' '.join(copied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
