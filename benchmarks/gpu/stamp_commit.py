"""Writes .gpu-check/commit.json: the commit, and the files that differ from it, of the tree about to be sent to
the GPU machine (whose copy of the repository may have no .git). Run it just before the device call and name
.gpu-check in the call's carry list; preflight.json then records it.

    python benchmarks/gpu/stamp_commit.py            # prints the path it wrote
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAMP = ROOT / ".gpu-check" / "commit.json"


def git(*args):
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()[:300]}")
    return out.stdout


def git_state():
    """The HEAD commit, its subject, and the files of the working tree that are not that commit's."""
    status = git("status", "--porcelain", "--untracked-files=normal").splitlines()
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "subject": git("log", "-1", "--format=%s").strip(),
        "committed": git("log", "-1", "--format=%cI").strip(),
        "modified": sorted(line[3:] for line in status if not line.startswith("??")),
        "untracked": sorted(line[3:] for line in status if line.startswith("??")),
        "stamped": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main():
    state = git_state()
    STAMP.parent.mkdir(exist_ok=True)
    STAMP.write_text(json.dumps(state, indent=1) + "\n")
    dirty = len(state["modified"]) + len(state["untracked"])
    print(f"{STAMP.relative_to(ROOT)}: {state['commit'][:12]} {state['subject'][:60]!r}"
          + (f", {dirty} files differ from it" if dirty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
