"""One way through a file run: ``endokern score | compare | rank | filter`` from Python, for every engine.

    from endokern import Settings, run
    result = run(Settings(command="compare", input=["pairs.jsonl"], output="margins.jsonl"))
    result.summary["accuracy"], result.paths["summary"]

:func:`run` validates the :class:`~endokern.settings.Settings`, names the files beside the output (:func:`paths`),
scores the rows with an engine (``local``: :func:`endokern.pipeline.stream` into one resumable file per stream;
``ray``: :func:`endokern.integrations.ray.execute` into resumable folders of Parquet parts), then finishes the command
the same way for both: compare's summary, filter's top-fraction pass (streaming: only the rewards are held) and
plot. A finished run is not scored again and its model is not loaded. The command line only parses, calls this, and
prints what ``log`` receives.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from . import io, parts
from .layouts import summarize_preferences
from .pipeline import RunStats, make_task, stream
from .checks import check_environment
from .settings import Settings, SettingsError, check_top_fraction
from .tokenization import resolve_template

Log = Callable[[str], None]


class RunFailed(RuntimeError):
    """A run that went through but cannot be called a success (damaged input, no row scored, too many errors); its
    files are complete and say what happened. The command line exits 1 with the message."""


@dataclass
class RunResult:
    """What a run did: its statistics, the files it wrote (by role), and the command's own results."""

    stats: RunStats
    paths: Dict[str, str]
    summary: Optional[Dict[str, Any]] = None  # compare: accuracy overall and per subset
    filtered: Optional[Dict[str, Any]] = None  # filter --top-fraction: kept, scored, threshold
    already_complete: bool = False  # the output was complete before the call: nothing was scored, no model loaded


def paths(settings: Settings) -> Dict[str, str]:
    """The files of a run, by role: ``output``, ``errors``, and as the command needs them ``summary`` (compare),
    ``rejected`` and ``scored`` (filter: the top-fraction pass scores every row into ``scored`` first). All but the
    output default to :func:`endokern.io.beside` it; a Ray run's output, rejected and scored are folders."""
    ray = settings.engine == "ray"
    output = (settings.output.rstrip("/\\") or settings.output) if ray else settings.output
    out = {"output": output, "errors": settings.errors or io.beside(output, ".errors.jsonl")}

    if settings.command == "compare":
        out["summary"] = settings.summary or io.beside(output, ".summary.json")
    if settings.command == "filter":
        if ray:
            out["rejected"] = (settings.rejected or io.beside(output, ".rejected")).rstrip("/\\")
            out["scored"] = os.path.join(output, parts.STATE_DIR, "scored")
        else:
            out["rejected"] = settings.rejected or io.beside(output, ".rejected.jsonl")
            out["scored"] = io.beside(output, ".scored.jsonl")
    return out


def prepare(settings: Settings) -> Dict[str, str]:
    """Everything that can be checked before a run starts, with nothing created: the options
    (:meth:`Settings.validate`), the files, device and model they name (:func:`endokern.checks.check_environment`),
    and that no file the run writes is one of its inputs. Returns the run's files (:func:`paths`); raises
    :class:`~endokern.settings.SettingsError`."""
    check_environment(settings.validate())
    files = paths(settings)
    written = dict(files)
    first = files["scored"] if settings.command == "filter" and settings.top_fraction is not None else files["output"]
    if first != "-":
        written["checkpoint"] = first + ".progress.json"
    if settings.plot:
        written["plot"] = settings.plot
    if files["output"] != "-":
        written["lock"] = io.beside(files["output"], ".lock")
    for role, path in written.items():
        for source in settings.input:
            if source != "-" and path != "-" and io.same_file(path, source):
                flag = {"output": "--output", "errors": "--errors", "rejected": "--rejected", "plot": "--plot",
                        "summary": "--summary"}.get(role, "--output")
                raise SettingsError(f"{flag}: the run's {role} file {path} is its input {source}; endokern never "
                                    f"writes over its input (with or without --overwrite): give another {flag}")
    return files


def run(settings: Settings, *, rm: Any = None, log: Optional[Log] = None) -> RunResult:
    """Run ``settings.command`` over ``settings.input`` into ``settings.output``, holding an exclusive lock on the
    output (``<output>.lock``: a second run on it is refused while this one lives, and a killed run never blocks a
    resume). See :func:`_run` for the rest; raises :class:`RunFailed` after a run whose input was damaged,
    where no row could be scored, or whose error share is above ``settings.max_error_fraction``."""
    if settings.attributes is not None:
        return run_attributes(settings, rm=rm, log=log)
    return _run_file(settings, rm, log)


def _run_file(settings: Settings, rm: Any, log: Optional[Log]) -> RunResult:
    """:func:`run` of one output (see there)."""
    files = prepare(settings)
    lock = None if files["output"] == "-" else io.RunLock(io.beside(files["output"], ".lock"),
                                                         f"endokern {settings.command} --output {files['output']}")
    if lock is not None:
        lock.acquire()
    try:
        result = _run(settings, files, rm, log or (lambda line: None))
    finally:
        if lock is not None:
            lock.release()
    check_outcome(settings, result)
    return result


def run_attributes(settings: Settings, *, rm: Any = None, log: Optional[Log] = None) -> RunResult:
    """``--dolma-attributes NAME``: each input ``DATASET/documents/REL`` gets ``DATASET/attributes/NAME/REL``, row for
    row (:class:`endokern.pipeline.AttributesTask`), as one resumable run per file (its checkpoint, errors file and
    lock beside the attribute file); the model loads once, and only when a file is left to score. Returns the last
    file's result with the statistics of all."""
    if settings.output != "-":
        raise SettingsError("--dolma-attributes writes attributes/NAME/ beside each input's documents/ folder; leave "
                            "out --output")
    settings = settings.validate()
    template = "plain" if settings.template == "auto" else settings.template
    runs = [settings.replace(input=[path], output=io.attributes_path(path, settings.attributes), template=template)
            for path in settings.input]
    for one in runs:
        prepare(one)  # every file's checks before any is written
    model = rm if rm is not None else _LazyModel(settings)
    total = RunStats()
    result = None
    for one in runs:
        if log is not None:
            log(f"endokern: {one.input[0]} -> {one.output}")
        result = _run_file(one, model, log)
        for name in ("rows", "errors", "examples", "tokens", "seconds", "resumed_from"):
            setattr(total, name, getattr(total, name) + getattr(result.stats, name))
    assert result is not None
    result.stats = total
    return result


class _LazyModel:
    """The model of a run of several files, loaded by the first file that has rows left to score."""

    def __init__(self, settings: Settings):
        self.settings, self.rm = settings, None

    def get(self):
        if self.rm is None:
            self.rm = load_model(self.settings)
        return self.rm


def load_model(settings: Settings):
    """The run's model; with ``--no-progress`` the loader's own progress bar is off too."""
    from .model import EndoRM

    if not settings.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return EndoRM.from_settings(settings)


def check_outcome(settings: Settings, result: RunResult) -> None:
    """:class:`RunFailed` when the input was damaged, no row was scored, or too many rows were errors (counted over
    the whole run, resumed parts included, from its errors file)."""
    errors_path = result.paths.get("errors", "-")
    errors = list(_file_rows(errors_path)) if errors_path != "-" else []
    damaged = [e["reason"] for e in errors if e.get("damaged")] or ([result.stats.extra["damaged"]]
                                                                    if "damaged" in result.stats.extra else [])
    where = f" (recorded in {errors_path})" if errors_path != "-" else ""
    if damaged:
        raise RunFailed(damaged[0] + where)
    rows = result.stats.rows + result.stats.resumed_from
    n_errors = len(errors) if errors_path != "-" else result.stats.errors
    first = "; ".join(f"row {e.get('row')}: {e.get('reason')}" for e in errors[:3])
    first = f" (first: {first})" if first else ""
    if rows and n_errors >= rows:
        raise RunFailed(f"no row could be scored: all {rows} rows are errors{first}{where}")
    fraction = settings.max_error_fraction
    if fraction is not None and rows and n_errors / rows > fraction:
        raise RunFailed(f"{n_errors} of {rows} rows are errors ({n_errors / rows:.1%}, more than --max-error-fraction "
                        f"{fraction:g}){first}{where}")


def _run(settings: Settings, files: Dict[str, str], rm: Any, log: Log) -> RunResult:
    """Run ``settings.command`` over ``settings.input`` into ``settings.output`` with ``settings.engine``, resuming an
    earlier run of the same output. ``rm``: an :class:`endokern.EndoRM` already loaded (local engine; else it is
    loaded from the settings when there is anything to score). ``log`` receives the run's messages (one line or a
    small table each); nothing is printed without it. Raises :class:`~endokern.settings.SettingsError` before any
    file is touched when an option is wrong."""
    top_fraction = settings.command == "filter" and settings.top_fraction is not None
    if settings.engine == "ray":
        from .integrations.ray import execute

        stats = execute(settings, files, keep_scored=top_fraction, log=log)
        already = bool(stats.resumed_from) and not stats.rows
        report(stats, files, log)
        log(f"endokern: output in {files['output']}/ (Parquet, one part per chunk of {settings.chunk_rows} rows)")
        result = RunResult(stats, files, already_complete=already)
        rows_of: Callable[[str], Iterator[dict]] = parts.read_parts
    else:
        result = _run_local(settings, files, rm, top_fraction, log)
        rows_of = _file_rows
    if settings.command == "compare":
        if files["output"] == "-":  # (the local engine only: a Ray run writes a folder)
            log("endokern: the summary needs a file output (--output) to read the rows back")
            return result
        result.summary = write_summary(rows_of(files["output"]), files["errors"], result.stats, files["summary"])
        log(format_summary(result.summary))
        log(f"endokern: summary in {files['summary']}")
    if settings.command == "filter":
        if top_fraction:
            result.filtered = split_top_fraction(settings, files, log)
            kept, rejected = result.filtered.pop("kept_rewards"), result.filtered.pop("rejected_rewards")
            thresholds = {"top-fraction threshold": result.filtered["threshold"], "min-reward": settings.min_reward}
        else:
            kept = [r["reward"] for r in rows_of(files["output"]) if "reward" in r] if settings.plot else []
            rejected = [r["reward"] for r in rows_of(files["rejected"]) if "reward" in r] if settings.plot else []
            thresholds = {"min-reward": settings.min_reward}
        if settings.plot:
            filter_plot(settings, kept, rejected, thresholds)
            log(f"endokern: reward histogram in {settings.plot}")
    return result


def _run_local(settings: Settings, files: Dict[str, str], rm: Any, top_fraction: bool, log: Log) -> RunResult:
    """Score in this process into one resumable file per stream (:class:`endokern.io.RunWriter`)."""
    streams = {"output": files["scored"] if top_fraction else files["output"]}
    if settings.command == "filter" and not top_fraction and settings.attributes is None:
        streams["rejected"] = files["rejected"]
    streams["errors"] = files["errors"]
    # checked first, written only once the model is loaded: a refused or failed start leaves no file behind
    try:
        writer = io.RunWriter(streams, run_key=settings.run_key(), overwrite=settings.overwrite, open_now=False)
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # other arguments, an output it did not write
        message = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) else str(err)
        raise SettingsError(message) from None
    already_complete = writer.complete
    try:
        if already_complete:
            log(f"endokern: {streams['output']} is already complete (use --overwrite to redo it)")
            stats = RunStats(resumed_from=writer.rows_done)
        else:
            if rm is None:
                rm = load_model(settings)
            elif isinstance(rm, _LazyModel):
                rm = rm.get()
            log(f"endokern: {settings.model} in {str(rm.head.weight.dtype).replace('torch.', '')} on {rm.device}"
                + (f", {rm.threads} CPU thread(s) ({rm.threads_reason})" if getattr(rm, "threads", None) else ""))
            try:
                resolve_template(rm.tokenizer, settings.template)
            except ValueError as err:
                raise SettingsError(f"--template {settings.template}: {err}") from None
            writer.open()
            if writer.rows_done:
                log(f"endokern: resuming after {writer.rows_done} committed rows")
            stats = stream(rm, make_task(settings, rm, keep_scored=top_fraction), settings, writer)
    finally:
        writer.close()
    report(stats, {"errors": files["errors"]}, log)
    return RunResult(stats, files, already_complete=already_complete)


def _file_rows(path: str) -> Iterator[dict]:
    """The rows of an output file (none when it does not exist)."""
    if path == "-" or not os.path.exists(path):
        return iter(())
    return (item.row for item in io.read_rows(path) if item.row is not None)


def report(stats: RunStats, files: Dict[str, str], log: Log) -> None:
    """The run's one-line account: rows, errors, time, rows/s and the tokens the model ran per second."""
    line = f"endokern: {stats.rows} rows ({stats.errors} errors) in {stats.seconds:.1f} s"
    if stats.seconds > 0 and stats.rows:
        line += f", {stats.rows / stats.seconds:.2f} rows/s, {stats.tokens / stats.seconds:,.0f} tokens/s"
    if stats.errors and files.get("errors") not in (None, "-"):
        line += f"; errors in {files['errors']}"
    log(line)


# ----------------------------------------------------------------------------------------------------------- compare


def write_summary(rows: Iterable[dict], errors: str, stats: RunStats, path: str) -> Dict[str, Any]:
    """Compare's summary (:func:`endokern.layouts.summarize_preferences`) with the error count and the run's
    statistics, written to ``path`` (JSON) and returned."""
    summary = summarize_preferences(list(rows))
    summary["errors"] = sum(1 for _ in _file_rows(errors)) if errors != "-" else 0
    summary["run"] = stats.as_dict()
    data = (json.dumps(summary, indent=2) + "\n").encode()
    io.atomic_write(path, lambda f: f.write(data))
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    """A small text table of a compare summary."""
    cols = ("rows", "accuracy", "easy", "normal", "hard")

    def line(name: str, s: Dict[str, Any]) -> str:
        cells = [f"{s[c]:.3f}" if isinstance(s.get(c), float) else str(s.get(c, "")) for c in cols]
        return f"{name:40s} " + " ".join(f"{c:>9s}" for c in cells)

    out = [f"{'subset':40s} " + " ".join(f"{c:>9s}" for c in cols)]
    for name, s in summary.get("subsets", {}).items():
        out.append(line(name, s))
    out.append(line("overall", summary))
    run_stats = summary.get("run", {})
    if run_stats.get("seconds"):
        out.append(
            f"{run_stats['rows']} rows, {run_stats['examples']} responses, {run_stats['tokens']} tokens in "
            f"{run_stats['seconds']:.1f} s: {run_stats.get('rows_per_s', 0):.2f} rows/s, "
            f"{run_stats.get('examples_per_s', 0):.2f} responses/s, {run_stats.get('tokens_per_s', 0):,.0f} tokens/s"
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ filter


def top_fraction_threshold(rewards: Sequence[float], top_fraction: float) -> float:
    """The smallest reward among the top ``top_fraction`` of rows (at least one row kept when any exist); +inf for
    no rows."""
    check_top_fraction(top_fraction)
    if not len(rewards):
        return float("inf")
    ordered = sorted(rewards, reverse=True)
    keep = max(1, int(round(top_fraction * len(ordered))))
    return ordered[keep - 1]


def rejection(reward: float, threshold: float, min_reward: Optional[float]) -> Optional[str]:
    """Why filter's top-fraction pass drops a scored row, or None when it keeps it."""
    if reward < threshold:
        return f"reward {reward:.6g} below the top-fraction threshold {threshold:.6g}"
    if min_reward is not None and reward < min_reward:
        return f"reward {reward:.6g} < min-reward {min_reward:g}"
    return None


def split_top_fraction(settings: Settings, files: Dict[str, str], log: Log) -> Dict[str, Any]:
    """Filter's second pass: the threshold from the scored rewards (only they are held), then every scored row to
    the output or, with the reason, to the rejected rows. A local run streams the scored file once per output file
    (each written whole or not at all); a Ray run splits each part file."""
    ray = settings.engine == "ray"
    scored = files["scored"]
    rewards = [row["reward"] for row in (parts.read_parts(scored, ["reward"]) if ray else _file_rows(scored))]
    threshold = top_fraction_threshold(rewards, settings.top_fraction)
    kept = [r for r in rewards if rejection(r, threshold, settings.min_reward) is None]
    dropped = [r for r in rewards if rejection(r, threshold, settings.min_reward) is not None]
    n = len(rewards)
    if ray:
        parts.split_parts(scored, files["output"], files["rejected"],
                       lambda reward: rejection(reward, threshold, settings.min_reward))
        where = files["rejected"] + "/"
    else:

        def rows(keep: bool) -> Iterator[dict]:
            for row in _file_rows(scored):
                reason = rejection(row["reward"], threshold, settings.min_reward)
                if keep and reason is None:
                    yield row
                elif not keep and reason is not None:
                    yield dict(row, reason=reason)

        io.write_rows(files["output"], rows(True))
        io.write_rows(files["rejected"], rows(False))
        where = files["rejected"]
    log(f"endokern: kept {len(kept)} of {n} scored rows (threshold {threshold:.6g}); rejected rows in {where}")
    return {"kept": len(kept), "scored": n, "threshold": threshold, "kept_rewards": kept, "rejected_rewards": dropped}


def filter_plot(settings: Settings, kept: List[float], rejected: List[float],
                thresholds: Dict[str, Optional[float]]) -> None:
    """A PNG histogram of the rewards of kept and rejected rows, with the thresholds as lines."""
    from .plots import histogram_png

    lines = {k: v for k, v in thresholds.items() if v is not None and v == v and abs(v) != float("inf")}
    histogram_png(settings.plot, {"kept": kept, "rejected": rejected}, thresholds=lines, zero_line=False,
                  title=f"endokern filter: rewards of {len(kept) + len(rejected)} rows ({settings.model})",
                  xlabel=f"reward ({settings.reduce})")
