"""Rows of the GPU check: append-only JSON lines, one per measured, failed or skipped item, written as they happen.

Every step of benchmarks/gpu_check.sh writes through ``StepItems``: a ``plan`` row first (the items it will
try, in order), then one ``item`` row per item with ``status`` "ok", "failed" or "skipped" (the last two with a
``reason``). Each row is flushed as soon as it is known, so a step stopped at its cap still returns the rows it
finished, and ``run_steps.py`` writes a failed row, with the reason, for every planned item that has none.

A step that is started again (after a crash or a hung item) skips the items that already have a row: the file is
the step's memory. No torch here: the orchestrator imports this module too.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import traceback
from pathlib import Path

# Exit statuses a step uses to ask run_steps.py to start it again (it resumes after the items already written).
EXIT_CONTEXT_LOST = 75  # a CUDA error left the process's context unusable
EXIT_ITEM_HUNG = 76  # an item outran its own cap (the watchdog wrote its failed row)


def clean(value):
    """JSON-safe: non-finite floats become None, tuples lists, other objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def read_rows(path):
    """Every complete row of a JSON-lines file (a line cut short by a kill is ignored)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


class Rows:
    """Appends rows of one step to a JSON-lines file; each write is one line, flushed before it returns."""

    def __init__(self, path, step):
        self.path = Path(path)
        self.step = step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, row):
        line = json.dumps(clean({"step": self.step, **row, "at": round(time.time(), 3)}))
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


class Skip(Exception):
    """Raised by an item that does not apply here; its row says why (status "skipped")."""


class StepItems:
    """Runs the items of one step, each at most once per output file, each under its own watchdog."""

    def __init__(self, path, step, item_cap, context_check=None):
        self.rows = Rows(path, step)
        self.step = step
        self.item_cap = item_cap
        self.context_check = context_check  # () -> None, raises when the CUDA context is gone
        self.done = {r["item"]: r for r in read_rows(path) if r.get("step") == step and r.get("kind") == "item"}

    def plan(self, items):
        items = list(items)
        self.rows.write({"kind": "plan", "items": items})
        return items

    def write_item(self, item, status, reason=None, **fields):
        row = {"kind": "item", "item": item, "status": status, **fields}
        if reason is not None:
            row["reason"] = reason
        self.rows.write(row)
        self.done[item] = row
        return row

    def run(self, item, fn, cap=None, **info):
        """``fn() -> dict`` of measured fields (may set "status" and "reason"); its exceptions become failed rows."""
        if item in self.done:
            return self.done[item]
        cap = cap or self.item_cap
        start = time.perf_counter()

        def hung():
            self.write_item(item, "failed", f"no result after {cap:.0f} s (this item's cap): the step is started "
                            "again after it", seconds=round(time.perf_counter() - start, 3), **info)
            print(f"# {self.step}/{item}: no result after {cap:.0f} s, exiting for a restart", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_ITEM_HUNG)

        watchdog = threading.Timer(cap, hung)
        watchdog.daemon = True
        watchdog.start()
        lost = False
        try:
            fields = dict(fn() or {})
            status = fields.pop("status", "ok")
            reason = fields.pop("reason", None)
        except Skip as exc:
            fields, status, reason = {}, "skipped", str(exc)
        except BaseException as exc:  # noqa: BLE001 - every failure is a row; KeyboardInterrupt too
            if isinstance(exc, KeyboardInterrupt):
                watchdog.cancel()
                raise
            fields, status = {}, "failed"
            reason = f"{type(exc).__name__}: {exc}".strip()[:1500]
            fields["traceback"] = traceback.format_exc().splitlines()[-6:]
            if self.context_check is not None:
                try:
                    self.context_check()
                except Exception as again:  # noqa: BLE001
                    lost = True
                    fields["context"] = f"CUDA context unusable after this item: {type(again).__name__}: {again}"[:500]
        finally:
            watchdog.cancel()
        row = self.write_item(item, status, reason, seconds=round(time.perf_counter() - start, 3), **info, **fields)
        mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[status]
        print(f"  {self.step}/{item}: {mark}" + (f" ({reason[:160]})" if reason else ""), flush=True)
        if lost:
            print(f"# {self.step}: the CUDA context is gone; exiting for a restart", file=sys.stderr, flush=True)
            os._exit(EXIT_CONTEXT_LOST)
        return row
