"""The ``endokern`` command line: a thin shell over the library (SPEC section 4).

    endokern score    rows with prompt + response (or messages)  -> id, reward, reward_mean, logprob, num_tokens
    endokern compare  preference rows (pairs, RM-Bench, LLMBar, HH-RLHF) -> per-row margins + a summary
    endokern rank     prompt + responses                          -> rewards and the best index (best-of-N)
    endokern filter   as score                                    -> kept rows; the rest with the reason
    endokern explain  one prompt + responses (or one input row)   -> token rewards: terminal colours, an HTML page
    endokern eval     preference suites x reward variants/baselines -> accuracy with 95% intervals, report.md/.json
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
    if args.plot and args.output == "-":
        raise SystemExit("endokern filter: --plot needs a file --output (it reads the rewards back)")
    errors = args.errors or _beside(args.output, ".errors.jsonl")
    rejected = args.rejected or _beside(args.output, ".rejected.jsonl")
    key = _run_key(args, min_reward=args.min_reward, top_fraction=args.top_fraction)
    if args.top_fraction is None:
        streams = {"output": args.output, "rejected": rejected, "errors": errors}
        writer, stats = _run(args, FilterTask(args.min_reward), streams, key)
        writer.close()
        _report(stats, streams)
        if args.plot:
            _filter_plot(args, _rewards_in(args.output), _rewards_in(rejected), {"min-reward": args.min_reward})
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
    if args.plot:
        _filter_plot(args, [r["reward"] for r in kept], [r["reward"] for r in dropped],
                     {"top-fraction threshold": threshold, "min-reward": args.min_reward})
    return 0


def _rewards_in(path: str) -> List[float]:
    """The ``reward`` of every row of an output file (none when it does not exist)."""
    from .io import read_rows

    if path == "-" or not os.path.exists(path):
        return []
    return [item.row["reward"] for item in read_rows(path) if item.row is not None and "reward" in item.row]


def _filter_plot(args: argparse.Namespace, kept: List[float], rejected: List[float],
                 thresholds: Dict[str, Optional[float]]) -> None:
    from .plots import histogram_png

    lines = {k: v for k, v in thresholds.items() if v is not None and v == v and abs(v) != float("inf")}
    histogram_png(args.plot, {"kept": kept, "rejected": rejected}, thresholds=lines, zero_line=False,
                  title=f"endokern filter: rewards of {len(kept) + len(rejected)} rows ({args.model})",
                  xlabel=f"reward ({args.reduce})")
    print(f"endokern: reward histogram in {args.plot}", file=sys.stderr)


def cmd_explain(args: argparse.Namespace) -> int:
    """Token by token: which tokens of a response earn or lose reward (terminal colours and/or an HTML page)."""
    from .explain import explain, render_html, render_terminal
    from .tokenization import EncodeError, resolve_template

    if args.input is None and (args.prompt is None or not args.response):
        raise SystemExit("endokern explain: give --prompt with one or more --response, or --input FILE --row N")
    if args.input is not None and (args.prompt is not None or args.response):
        raise SystemExit("endokern explain: give either --prompt/--response or --input/--row, not both")
    row = _explain_row(args) if args.input is not None else None
    rm = _load(args)
    template = resolve_template(rm.tokenizer, args.template)
    examples, labels, source = _explain_examples(args, row, template)
    try:
        explained = explain(rm, examples, labels, template=template, system=args.system,
                            append_eos=args.append_eos, max_length=args.max_length)
    except (EncodeError, ValueError) as err:  # an example that cannot be encoded, or longer than the model's context
        raise SystemExit(f"endokern explain: {err}") from None
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(render_terminal(explained, color=color, metric=args.color_by))
    if args.html:
        subtitle = (f"{source + ' | ' if source else ''}model {args.model} | template {template} "
                    f"| alpha {args.alpha:g} | gamma {args.gamma:g} | terminal {args.terminal} | reduce {args.reduce}")
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(explained, subtitle=subtitle, metric=args.color_by))
        print(f"endokern explain: page in {args.html}", file=sys.stderr)
    return 0


def _explain_row(args: argparse.Namespace) -> Dict[str, Any]:
    from .io import read_rows

    if args.row < 0:
        raise SystemExit(f"endokern explain: --row must be >= 0, got {args.row}")
    item = next(iter(read_rows(args.input, start=args.row)), None)
    if item is None:
        raise SystemExit(f"endokern explain: {args.input} has no row {args.row}")
    if item.row is None:
        raise SystemExit(f"endokern explain: row {args.row} of {args.input}: {item.error}")
    return item.row


def _explain_examples(args: argparse.Namespace, row: Optional[Dict[str, Any]], template: str):
    """(examples, labels, where they come from) of --prompt/--response or of a score, rank or preference row."""
    from . import formats
    from .tokenization import TextExample

    if row is None:
        examples = [TextExample(args.prompt, r) for r in args.response]
        labels = ["response"] if len(examples) == 1 else [f"response {i}" for i in range(len(examples))]
        return examples, labels, None
    source = f"{args.input} row {args.row} (id {formats.row_id(row, args.row)})"
    try:
        if "responses" in row:
            examples = formats.rank_examples(row)
            labels = [f"response {i}" for i in range(len(examples))]
        elif "response" in row or "messages" in row:
            examples, labels = formats.score_examples(row), ["response"]
        else:
            pref = formats.preference_examples(row, template)
            if pref.grid:
                labels = [f"{side}[{i}]" for side in ("chosen", "rejected") for i in range(pref.k)]
            else:
                labels = ["chosen", "rejected"]
            examples = pref.examples
    except formats.RowError as err:
        raise SystemExit(f"endokern explain: row {args.row} of {args.input}: {err}") from None
    return examples, labels, source


def cmd_eval(args: argparse.Namespace) -> int:
    """Preference suites (RM-Bench, LLMBar / Chat Hard, HH-RLHF, any compare file) under reward variants and
    baselines: accuracy with 95% bootstrap intervals and speed, as report.md and report.json."""
    from . import evaluation
    from .tokenization import resolve_template
    from .variants import parse_variants

    try:
        variants = parse_variants(args.variants)
        suites = evaluation.resolve_suites(args.suite, args.data)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"endokern eval: {err}")
    if args.max_rows is not None and args.max_rows < 1:
        raise SystemExit("endokern eval: --max-rows must be >= 1")
    rm = _load(args)
    template = resolve_template(rm.tokenizer, args.template)
    settings = {
        "model": args.model, "template": template, "system": args.system, "alpha": args.alpha,
        "dtype": str(rm.head.weight.dtype).replace("torch.", ""),
        "device": str(rm.device), "backend": rm.backend, "batch_tokens": rm.batch_tokens,
        "data": os.path.abspath(evaluation.data_dir(args.data)), "max_rows": args.max_rows, "seed": args.seed,
        "bootstrap_resamples": args.bootstrap, "torch_threads": torch.get_num_threads(),
    }
    key = {k: settings[k] for k in ("model", "template", "system", "alpha", "dtype", "backend", "batch_tokens")}
    key.update(max_length=args.max_length, chunk_rows=args.chunk_rows, packing=args.packing)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    passes = evaluation.run_eval(
        rm, suites, variants, args.output, template=template, system=args.system, max_rows=args.max_rows,
        seed=args.seed, max_length=args.max_length, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
        run_key=key, progress=not args.no_progress, log=log,
    )
    report = evaluation.build_report(passes, variants, resamples=args.bootstrap, seed=args.seed, settings=settings)
    json_path, md_path = os.path.join(args.output, "report.json"), os.path.join(args.output, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    title = f"# endokern eval: {args.model}\n\n" + ", ".join(f"{k} {v}" for k, v in settings.items()) + "\n\n"
    markdown = title + evaluation.report_markdown(report)
    with open(md_path, "w") as f:
        f.write(markdown)
    print(markdown)
    if args.plot:
        for path in evaluation.plot_margins(passes, variants, args.output):
            log(f"endokern eval: wrote {path}")
    log(f"endokern eval: report in {md_path} and {json_path}")
    return 0


def _add_model_options(p: argparse.ArgumentParser, reward: bool = True) -> None:
    """The model, its text template, the reward's settings and the engine's."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model folder, hub id, .gguf file, or '{DEFAULT_MODEL}' (the default, fetched once)")
    p.add_argument("--template", default="auto", choices=("auto", "plain", "chat"))
    p.add_argument("--system", help="a system prompt for the chat template")
    p.add_argument("--append-eos", action="store_true", help="score an EOS after each plain-template response")
    p.add_argument("--alpha", type=float, default=1.0, help="soft-value temperature (> 0)")
    if reward:
        p.add_argument("--gamma", type=float, default=1.0, help="discount of the next state's value")
        p.add_argument("--terminal", default="zero", choices=("zero", "bootstrap"))
        p.add_argument("--reduce", default="sum", choices=("sum", "mean"))
    else:
        p.set_defaults(gamma=1.0, terminal="zero", reduce="sum")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpu", "torch"))
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward batch, padding included (default: 1024 on CPU, 16384 on CUDA)")
    p.add_argument("--packing", default="auto", choices=("auto", "on", "off"),
                   help="padding-free packing (auto: where flash-attn's varlen path runs)")
    p.add_argument("--max-length", type=int, default=None, help="rows with a longer sequence go to the errors file")


def _add_run_options(p: argparse.ArgumentParser, per_token: bool = False) -> None:
    _add_model_options(p)
    p.add_argument("--input", nargs="+", default=["-"],
                   help="JSONL, JSONL.gz, JSON, Parquet, or '-' (stdin); several files are read one after another")
    p.add_argument("--output", default="-", help="JSONL, JSONL.gz or Parquet by extension, or '-' (stdout)")
    p.add_argument("--errors", help="where malformed rows go (default: beside the output, *.errors.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming or refusing")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows (of this shard)")
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per committed chunk (the resume granularity)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if per_token:
        p.add_argument("--per-token", action="store_true", help="also write token_rewards and token_logprobs")
    ray = p.add_argument_group("scale out with Ray (pip install 'endokern[ray]')")
    ray.add_argument("--engine", default="local", choices=("local", "ray"),
                     help="local: this process; ray: Ray Data workers, --output is a folder of Parquet parts")
    ray.add_argument("--num-workers", type=int, default=1, help="ray: scoring actors (one model each)")
    ray.add_argument("--address", default=None,
                     help="ray: the cluster, HEAD:6379 or auto (default: RAY_ADDRESS, else one started here "
                          "with `ray start`, else a new local one)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=None,
                     help="ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--num-cpus-per-worker", type=float, default=1,
                     help="ray: CPUs per actor, also its torch threads")


def _doc(command) -> str:
    """A command's docstring as argparse help (which %-formats it)."""
    return " ".join((command.__doc__ or "").split()).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endokern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"endokern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    backends = sub.add_parser("backends", help=_doc(cmd_backends))
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(func=cmd_backends)

    score = sub.add_parser("score", help=_doc(cmd_score))
    _add_run_options(score, per_token=True)
    score.set_defaults(func=cmd_score)

    compare = sub.add_parser("compare", help=_doc(cmd_compare))
    _add_run_options(compare)
    compare.add_argument("--summary", help="summary JSON (default: beside the output, *.summary.json)")
    compare.set_defaults(func=cmd_compare)

    rank = sub.add_parser("rank", help=_doc(cmd_rank))
    _add_run_options(rank)
    rank.set_defaults(func=cmd_rank)

    filt = sub.add_parser("filter", help=_doc(cmd_filter))
    _add_run_options(filt)
    filt.add_argument("--min-reward", type=float, default=None, help="keep rows whose reward is at least this")
    filt.add_argument("--top-fraction", type=float, default=None, help="keep this fraction of rows, best first")
    filt.add_argument("--rejected", help="where the rows not kept go, with the reason (default: *.rejected.jsonl)")
    filt.add_argument("--plot", metavar="PNG", help="also write a histogram of the rewards (kept vs rejected) here")
    filt.set_defaults(func=cmd_filter)

    expl = sub.add_parser("explain", help=_doc(cmd_explain))
    _add_model_options(expl)
    expl.add_argument("--prompt", help="the prompt (with --response)")
    expl.add_argument("--response", action="append", default=[],
                      help="a response to the prompt; repeat for several (shown side by side)")
    expl.add_argument("--input", help="a file any command reads (JSONL, JSON, Parquet): explain one row of it")
    expl.add_argument("--row", type=int, default=0,
                      help="which row of --input (0-based; a score, rank or preference row)")
    expl.add_argument("--html", metavar="PATH", help="write a self-contained HTML page here")
    expl.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                      help="ANSI colours on standard output (auto: when it is a terminal)")
    expl.add_argument("--color-by", default="reward", choices=("reward", "logprob", "entropy"),
                      help="what the colours show (the HTML page can switch)")
    expl.set_defaults(func=cmd_explain)

    ev = sub.add_parser("eval", help=_doc(cmd_eval))
    ev.add_argument("--suite", nargs="+", default=["all"],
                    help="suites (rm-bench-chat, rm-bench-code, rm-bench-safety-refuse, llmbar-natural, "
                         "llmbar-adversarial-{neighbor,gptinst,gptout,manual}, hh-rlhf-harmless), groups "
                         "(rm-bench, chat-hard, all) or preference files in any layout compare reads")
    ev.add_argument("--data", help="folder with rm-bench/, llmbar/, hh-rlhf/ (default: $ENDOKERN_DATA, else ../shared/data)")
    ev.add_argument("--output", required=True, help="folder for per-suite rows, report.md, report.json (resumable)")
    ev.add_argument("--variants", default="all",
                    help="comma-separated: paper, mean, bootstrap, bootstrap-mean, gamma=G, loglik, loglik-mean, "
                         "judge; 'all' = paper,mean,bootstrap,gamma=0.93,loglik,loglik-mean,judge")
    ev.add_argument("--max-rows", type=int, default=None, help="a seeded random sample of this many rows per suite")
    ev.add_argument("--seed", type=int, default=0, help="seed of the row sample and of the bootstrap")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--plot", action="store_true", help="also write PNG histograms of the margins, one per variant")
    ev.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    ev.add_argument("--chunk-rows", type=int, default=64, help="rows per committed chunk (the resume granularity)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(ev, reward=False)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_tokens", "chunk_rows"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise SystemExit(f"endokern: --{name.replace('_', '-')} must be >= 1")
    if getattr(args, "engine", "local") == "ray":
        try:
            from .integrations.ray import cli_main
        except ImportError as err:
            raise SystemExit(f"endokern {args.command}: {err}") from None
        return cli_main(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
