"""The ``endokern`` command line: a thin shell over the library (SPEC section 4).

    endokern score    rows with prompt + response (or messages)  -> id, reward, reward_mean, logprob, num_tokens
    endokern compare  preference rows (pairs, RM-Bench, LLMBar, HH-RLHF) -> per-row margins + a summary
    endokern rank     prompt + responses                          -> rewards and the best index (best-of-N)
    endokern filter   as score                                    -> kept rows; the rest with the reason
    endokern backends                                             -> which kernel backends run here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import __version__
from .assets import DEFAULT_MODEL
from .ops.registry import available_backends

OUTPUT_EXTENSIONS = (".parquet", ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl", ".ndjson", ".json")


def cmd_backends(args: argparse.Namespace) -> int:
    """Print which kernel backends run on a device, and why the others do not."""
    for name, reason in available_backends(args.device).items():
        print(f"{name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _beside(output: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out<suffix>``; for standard output, '-'."""
    if output == "-":
        return "-"
    for ext in OUTPUT_EXTENSIONS:
        if output.endswith(ext):
            return output[: -len(ext)] + suffix
    return output + suffix


def _load(args: argparse.Namespace):
    from .model import EndoRM

    return EndoRM.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, alpha=args.alpha, gamma=args.gamma,
        terminal=args.terminal, reduce=args.reduce, backend=args.backend, batch_tokens=args.batch_tokens,
        packing={"auto": "auto", "on": True, "off": False}[args.packing],
    )


def _run_key(args: argparse.Namespace, **extra) -> Dict[str, Any]:
    """The arguments that decide the output: a resume with different ones is refused."""
    # batch_tokens and chunk_rows decide which examples share a batch, hence the last bits of the results
    keys = ("command", "model", "input", "template", "system", "append_eos", "alpha", "gamma", "terminal", "reduce",
            "dtype", "backend", "packing", "batch_tokens", "chunk_rows", "max_length", "num_shards", "shard_index",
            "limit")
    key = {k: getattr(args, k, None) for k in keys}
    key["input"] = [os.path.abspath(p) if p != "-" else p for p in args.input]
    key.update(extra)
    return key


def _run(args: argparse.Namespace, task, streams: Dict[str, str], run_key: Dict[str, Any]):
    from .io import RunWriter
    from .pipeline import run

    writer = RunWriter(streams, run_key=run_key, overwrite=args.overwrite)
    try:
        if writer.complete:
            print(f"endokern: {streams['output']} is already complete (use --overwrite to redo it)", file=sys.stderr)
        rm = None if writer.complete else _load(args)
        if rm is None:
            from .pipeline import RunStats

            return writer, RunStats(resumed_from=writer.rows_done)
        if writer.rows_done:
            print(f"endokern: resuming after {writer.rows_done} committed rows", file=sys.stderr)
        stats = run(
            rm, task, args.input, writer, template=args.template, system=args.system, append_eos=args.append_eos,
            max_length=args.max_length, num_shards=args.num_shards, shard_index=args.shard_index, limit=args.limit,
            chunk_rows=args.chunk_rows, progress=not args.no_progress,
        )
        return writer, stats
    except BaseException:
        writer.close()
        raise


def _report(stats, streams: Dict[str, str]) -> None:
    line = (f"endokern: {stats.rows} rows ({stats.errors} errors) in {stats.seconds:.1f} s")
    if stats.seconds > 0 and stats.rows:
        line += f", {stats.rows / stats.seconds:.2f} rows/s, {stats.tokens / stats.seconds:,.0f} tokens/s"
    if stats.errors and streams.get("errors") not in (None, "-"):
        line += f"; errors in {streams['errors']}"
    print(line, file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> int:
    """Score rows of prompt + response (or messages)."""
    from .pipeline import ScoreTask

    streams = {"output": args.output, "errors": args.errors or _beside(args.output, ".errors.jsonl")}
    writer, stats = _run(args, ScoreTask(per_token=args.per_token), streams, _run_key(args, per_token=args.per_token))
    writer.close()
    _report(stats, streams)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """Best-of-N: the reward of each response of a prompt and the index of the best."""
    from .pipeline import RankTask

    streams = {"output": args.output, "errors": args.errors or _beside(args.output, ".errors.jsonl")}
    writer, stats = _run(args, RankTask(), streams, _run_key(args))
    writer.close()
    _report(stats, streams)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Margins of preference pairs (pairs, RM-Bench grids, LLMBar, HH-RLHF) and accuracy overall and per subset."""
    from .formats import summarize_preferences
    from .pipeline import CompareTask
    from .tokenization import resolve_template

    streams = {"output": args.output, "errors": args.errors or _beside(args.output, ".errors.jsonl")}
    template = args.template
    if template == "auto":
        from transformers import AutoTokenizer

        from .assets import resolve_model

        template = resolve_template(AutoTokenizer.from_pretrained(resolve_model(args.model)), "auto")
    writer, stats = _run(args, CompareTask(template), streams, _run_key(args))
    try:
        if args.output == "-":
            print("endokern: the summary needs a file output (--output) to read the rows back", file=sys.stderr)
            _report(stats, streams)
            return 0
        summary = summarize_preferences(list(writer.read_stream("output")))
    finally:
        writer.close()
    errors = sum(1 for _ in _read_errors(streams["errors"]))
    summary["errors"] = errors
    summary["run"] = stats.as_dict()
    summary_path = args.summary or _beside(args.output, ".summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    _report(stats, streams)
    print(format_summary(summary), file=sys.stderr)
    print(f"endokern: summary in {summary_path}", file=sys.stderr)
    return 0


def _read_errors(path: str):
    if path == "-" or not os.path.exists(path):
        return iter(())
    from .io import read_rows

    return read_rows(path)


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
    run = summary.get("run", {})
    if run.get("seconds"):
        out.append(
            f"{run['rows']} rows, {run['examples']} responses, {run['tokens']} tokens in {run['seconds']:.1f} s: "
            f"{run.get('rows_per_s', 0):.2f} rows/s, {run.get('examples_per_s', 0):.2f} responses/s, "
            f"{run.get('tokens_per_s', 0):,.0f} tokens/s"
        )
    return "\n".join(out)


def cmd_filter(args: argparse.Namespace) -> int:
    """Keep rows by --min-reward and/or --top-fraction; the rest go to --rejected with the reason."""
    from .io import write_rows
    from .pipeline import FilterTask, quantile_threshold

    if args.min_reward is None and args.top_fraction is None:
        raise SystemExit("endokern filter: give --min-reward, --top-fraction, or both")
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise SystemExit(f"endokern filter: --top-fraction must be in (0, 1], got {args.top_fraction}")
    if args.output == "-" and args.top_fraction is not None:
        raise SystemExit("endokern filter: --top-fraction needs a file --output (it scores every row first)")
    errors = args.errors or _beside(args.output, ".errors.jsonl")
    rejected = args.rejected or _beside(args.output, ".rejected.jsonl")
    key = _run_key(args, min_reward=args.min_reward, top_fraction=args.top_fraction)
    if args.top_fraction is None:
        streams = {"output": args.output, "rejected": rejected, "errors": errors}
        writer, stats = _run(args, FilterTask(args.min_reward), streams, key)
        writer.close()
        _report(stats, streams)
        return 0
    # The top fraction needs every reward first: score into a resumable side file, then split it.
    scored = _beside(args.output, ".scored.jsonl")
    streams = {"output": scored, "errors": errors}
    writer, stats = _run(args, FilterTask(None, keep_scored=True), streams, key)
    try:
        rows = list(writer.read_stream("output"))
    finally:
        writer.close()
    threshold = quantile_threshold([r["reward"] for r in rows], args.top_fraction) if rows else float("inf")
    kept, dropped = [], []
    for r in rows:
        if r["reward"] < threshold:
            dropped.append(dict(r, reason=f"reward {r['reward']:.6g} below the top-fraction threshold {threshold:.6g}"))
        elif args.min_reward is not None and r["reward"] < args.min_reward:
            dropped.append(dict(r, reason=f"reward {r['reward']:.6g} < min-reward {args.min_reward:g}"))
        else:
            kept.append(r)
    write_rows(args.output, kept)  # each file appears whole (written aside, then renamed)
    write_rows(rejected, dropped)
    _report(stats, {"errors": errors})
    print(f"endokern: kept {len(kept)} of {len(rows)} scored rows (threshold {threshold:.6g}); "
          f"rejected rows in {rejected}", file=sys.stderr)
    return 0


def _add_run_options(p: argparse.ArgumentParser, per_token: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model folder, hub id, .gguf file, or '{DEFAULT_MODEL}' (the default, fetched once)")
    p.add_argument("--input", nargs="+", default=["-"],
                   help="JSONL, JSONL.gz, JSON, Parquet, or '-' (stdin); several files are read one after another")
    p.add_argument("--output", default="-", help="JSONL, JSONL.gz or Parquet by extension, or '-' (stdout)")
    p.add_argument("--errors", help="where malformed rows go (default: beside the output, *.errors.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming or refusing")
    p.add_argument("--template", default="auto", choices=("auto", "plain", "chat"))
    p.add_argument("--system", help="a system prompt for the chat template")
    p.add_argument("--append-eos", action="store_true", help="score an EOS after each plain-template response")
    p.add_argument("--alpha", type=float, default=1.0, help="soft-value temperature (> 0)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount of the next state's value")
    p.add_argument("--terminal", default="zero", choices=("zero", "bootstrap"))
    p.add_argument("--reduce", default="sum", choices=("sum", "mean"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpu", "torch"))
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward batch, padding included (default: 1024 on CPU, 16384 on CUDA)")
    p.add_argument("--packing", default="auto", choices=("auto", "on", "off"),
                   help="padding-free packing (auto: where flash-attn's varlen path runs)")
    p.add_argument("--max-length", type=int, default=None, help="rows with a longer sequence go to the errors file")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows (of this shard)")
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per committed chunk (the resume granularity)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if per_token:
        p.add_argument("--per-token", action="store_true", help="also write token_rewards and token_logprobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endokern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"endokern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    backends = sub.add_parser("backends", help=cmd_backends.__doc__)
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(func=cmd_backends)

    score = sub.add_parser("score", help=cmd_score.__doc__)
    _add_run_options(score, per_token=True)
    score.set_defaults(func=cmd_score)

    compare = sub.add_parser("compare", help=cmd_compare.__doc__)
    _add_run_options(compare)
    compare.add_argument("--summary", help="summary JSON (default: beside the output, *.summary.json)")
    compare.set_defaults(func=cmd_compare)

    rank = sub.add_parser("rank", help=cmd_rank.__doc__)
    _add_run_options(rank)
    rank.set_defaults(func=cmd_rank)

    filt = sub.add_parser("filter", help=cmd_filter.__doc__)
    _add_run_options(filt)
    filt.add_argument("--min-reward", type=float, default=None, help="keep rows whose reward is at least this")
    filt.add_argument("--top-fraction", type=float, default=None, help="keep this fraction of rows, best first")
    filt.add_argument("--rejected", help="where the rows not kept go, with the reason (default: *.rejected.jsonl)")
    filt.set_defaults(func=cmd_filter)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_tokens", "chunk_rows"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise SystemExit(f"endokern: --{name.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
