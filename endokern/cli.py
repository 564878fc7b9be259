"""The ``endokern`` command line: a thin shell over the library.

    endokern score    rows with prompt + response (or messages)  -> id, reward, reward_mean, logprob, num_tokens
    endokern compare  preference rows (pairs, RM-Bench, LLMBar, HH-RLHF) -> per-row margins + a summary
    endokern rank     prompt + responses                          -> rewards and the best index (best-of-N)
    endokern filter   as score                                    -> kept rows; the rest with the reason
    endokern explain  one prompt + responses (or one input row)   -> token rewards: terminal colours, an HTML page
    endokern eval     preference suites x reward variants/baselines -> accuracy with 95% intervals, report.md/.json
    endokern serve    one model behind HTTP for RL loops: /score, /get_reward (OpenRLHF), /health, /metrics
    endokern backends                                             -> which kernel backends run here
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence, Tuple

import torch

from . import __version__
from .ops.registry import available_backends
from .settings import ModelSettings, Settings, SettingsError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class CommandFailed(SystemExit):
    """How a command ends on a mistake: its one line (already on standard error) and the exit status, 2 for a usage
    error, 1 for a failed run. ``str()`` is the line, so callers of :func:`main` can match it."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def describe(err: BaseException) -> Tuple[str, int]:
    """The one line and the exit status of an exception that ends a command."""
    from .io import LockedError

    if isinstance(err, SettingsError):
        return str(err), 2
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; run the same command again to resume where it stopped", 130
    if isinstance(err, OSError) and err.strerror:  # FileExistsError and friends: the reason and the path
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror, 1
    if isinstance(err, (LockedError, ValueError, RuntimeError, OSError, ImportError)):
        line = " ".join(str(err).split()) or type(err).__name__
        return line, 1
    return f"internal error: {type(err).__name__}: {' '.join(str(err).split())} (run with --debug for the " \
           "traceback, and report it)", 1


def cmd_backends(args: argparse.Namespace) -> int:
    """Print which kernel backends run on a device, and why the others do not."""
    from .checks import check_device

    try:
        check_device(args.device)
        present = None
    except SettingsError as err:
        present = str(err)
    for name, reason in available_backends("cpu" if present else args.device).items():
        reason = present if present is not None else reason
        print(f"{name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _file_run(args: argparse.Namespace) -> int:
    from .runs import run

    settings = Settings.from_args(args).validate()
    if settings.engine == "ray":
        try:
            import endokern.integrations.ray  # noqa: F401  (a missing Ray is a usage error, said before any file)
        except ImportError as err:
            raise SettingsError(f"--engine ray: {err}") from None
    run(settings, log=_stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score rows of prompt + response (or messages)."""
    return _file_run(args)


def cmd_compare(args: argparse.Namespace) -> int:
    """Margins of preference pairs (pairs, RM-Bench grids, LLMBar, HH-RLHF) and accuracy overall and per subset."""
    return _file_run(args)


def cmd_rank(args: argparse.Namespace) -> int:
    """Best-of-N: the reward of each response of a prompt and the index of the best."""
    return _file_run(args)


def cmd_filter(args: argparse.Namespace) -> int:
    """Keep rows by --min-reward and/or --top-fraction; the rest go to --rejected with the reason."""
    return _file_run(args)


def _model_settings(args: argparse.Namespace) -> ModelSettings:
    """The model and reward options of explain, eval and serve, checked, and what they name on this machine."""
    from .checks import check_device, check_model

    settings = ModelSettings.from_args(args).validate()
    check_device(settings.device, settings.backend)
    check_model(settings.model, settings.template)
    return settings


def cmd_explain(args: argparse.Namespace) -> int:
    """Token by token: which tokens of a response earn or lose reward (terminal colours and/or an HTML page)."""
    from .explain import explain, read_row, render_html, render_terminal, row_examples
    from .layouts import RowError, map_fields, row_id
    from .settings import parse_fields
    from .model import EndoRM
    from .tokenization import EncodeError, TextExample, resolve_template

    if args.input is None and (args.prompt is None or not args.response):
        raise SettingsError("explain: give --prompt with one or more --response, or --input FILE --row N")
    if args.input is not None and (args.prompt is not None or args.response):
        raise SettingsError("explain: give either --prompt/--response or --input/--row, not both")
    settings = _model_settings(args)
    try:
        mapping = parse_fields(args.fields) if args.fields else None
        row = read_row(args.input, args.row) if args.input is not None else None
        row = map_fields(row, mapping) if (row is not None and mapping) else row
    except (ValueError, OSError) as err:
        raise SettingsError(f"explain: {err}") from None
    rm = EndoRM.from_settings(settings)
    template = resolve_template(rm.tokenizer, settings.template)
    source = None
    if row is None:
        examples = [TextExample(args.prompt, r) for r in args.response]
        labels = ["response"] if len(examples) == 1 else [f"response {i}" for i in range(len(examples))]
    else:
        source = f"{args.input} row {args.row} (id {row_id(row, args.row)})"
        try:
            examples, labels = row_examples(row, template)
        except RowError as err:
            raise SettingsError(f"explain: row {args.row} of {args.input}: {err}") from None
    try:
        explained = explain(rm, examples, labels, template=template, system=settings.system,
                            append_eos=settings.append_eos, max_length=settings.max_length)
    except (EncodeError, ValueError) as err:  # an example that cannot be encoded, or longer than the model's context
        raise RuntimeError(f"explain: {err}") from None
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write(render_terminal(explained, color=color, metric=args.color_by))
    if args.html:
        subtitle = (f"{source + ' | ' if source else ''}model {settings.model} | template {template} "
                    f"| alpha {settings.alpha:g} | gamma {settings.gamma:g} | terminal {settings.terminal} "
                    f"| reduce {settings.reduce}")
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(explained, subtitle=subtitle, metric=args.color_by))
        _stderr(f"endokern explain: page in {args.html}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Preference suites (RM-Bench, LLMBar / Chat Hard, HH-RLHF, any compare file) under reward variants and
    baselines: accuracy with 95% bootstrap intervals and speed, as report.md and report.json."""
    from . import evaluation
    from .model import EndoRM
    from .tokenization import resolve_template
    from .settings import parse_fields
    from .variants import parse_variants

    try:
        variants = parse_variants(args.variants)
        suites = evaluation.resolve_suites(args.suite, args.data)
        if args.fields:
            parse_fields(args.fields)
    except (ValueError, FileNotFoundError) as err:
        raise SettingsError(f"eval: {err}") from None
    if args.max_rows is not None and args.max_rows < 1:
        raise SettingsError("eval: --max-rows must be >= 1")
    if args.chunk_rows < 1:
        raise SettingsError("eval: --chunk-rows must be >= 1")
    if args.max_error_fraction is not None and not 0 <= args.max_error_fraction <= 1:
        raise SettingsError(f"eval: --max-error-fraction must be in [0, 1], got {args.max_error_fraction}")
    settings = _model_settings(args)
    rm = EndoRM.from_settings(settings)
    template = resolve_template(rm.tokenizer, settings.template)
    report, markdown = evaluation.evaluate(
        rm, suites, variants, args.output, model=settings.model, template=template, system=settings.system,
        data=args.data, max_rows=args.max_rows, seed=args.seed, bootstrap=args.bootstrap,
        max_length=settings.max_length, chunk_rows=args.chunk_rows, packing=settings.packing,
        overwrite=args.overwrite, progress=args.progress, plot=args.plot, fields=args.fields, log=_stderr,
    )
    print(markdown)
    _stderr(f"endokern eval: report in {os.path.join(args.output, 'report.md')} and "
            f"{os.path.join(args.output, 'report.json')}")
    _check_eval_errors(args.output, report["passes"], args.max_error_fraction)
    return 0


def _check_eval_errors(folder: str, passes, max_error_fraction: Optional[float]) -> None:
    """RuntimeError when a pass of a suite scored no row, or more than ``max_error_fraction`` of its rows failed."""
    from .io import read_rows

    for p in passes:
        base = os.path.join(folder, f"{p['suite']}.{p['name']}")
        scored = sum(1 for _ in read_rows(base + ".jsonl")) if os.path.exists(base + ".jsonl") else 0
        errors = [e.row for e in read_rows(base + ".errors.jsonl")] if os.path.exists(base + ".errors.jsonl") else []
        total = scored + len(errors)
        first = "; ".join(f"row {e.get('row')}: {e.get('reason')}" for e in errors[:3] if e)
        where = f" (first: {first}; see {base}.errors.jsonl)" if errors else ""
        if total and not scored:
            raise RuntimeError(f"eval: no row of {p['suite']} could be scored ({p['name']} pass): all {total} rows "
                               f"are errors{where}")
        if max_error_fraction is not None and total and len(errors) / total > max_error_fraction:
            raise RuntimeError(f"eval: {len(errors)} of {total} rows of {p['suite']} are errors ({p['name']} pass), "
                               f"more than --max-error-fraction {max_error_fraction:g}{where}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one model over HTTP for RL loops: POST /score, POST /get_reward (OpenRLHF's remote reward model),
    GET /health, GET /metrics; concurrent requests are batched together (pip install 'endokern[serve]')."""
    try:
        from .serve import ServeOptions, serve

        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise SettingsError(f"serve: {err}; install the server with pip install 'endokern[serve]'") from None
    settings = _model_settings(args)
    try:
        options = ServeOptions.from_args(args).validate()
    except SettingsError as err:
        raise SettingsError(f"serve: {err}") from None
    serve(settings, options, log=_stderr)
    return 0


def _doc(command) -> str:
    """A command's docstring as argparse help (which %-formats it)."""
    return " ".join((command.__doc__ or "").split()).replace("%", "%%")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve import ServeOptions  # no web framework needed to build the parser

    ServeOptions.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endokern", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"endokern {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    sub_add = sub.add_parser

    def add_parser(name, **kwargs):  # every command also takes --debug after its name
        p = sub_add(name, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        return p

    sub.add_parser = add_parser
    backends = sub.add_parser("backends", help=_doc(cmd_backends))
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(func=cmd_backends)

    for name, func in (("score", cmd_score), ("compare", cmd_compare), ("rank", cmd_rank), ("filter", cmd_filter)):
        p = sub.add_parser(name, help=_doc(func))
        attributes = ("attributes",) if name in ("score", "filter") else ()  # Dolma attribute files
        Settings.add_arguments(p, ("model", "reward", "run", name, "ray") + attributes)
        p.set_defaults(func=func)

    expl = sub.add_parser("explain", help=_doc(cmd_explain))
    ModelSettings.add_arguments(expl, ("model", "reward"))
    expl.add_argument("--prompt", help="the prompt (with --response)")
    expl.add_argument("--response", action="append", default=[],
                      help="a response to the prompt; repeat for several (shown side by side)")
    expl.add_argument("--input", help="a file any command reads (JSONL, JSON, Parquet): explain one row of it")
    expl.add_argument("--row", type=int, default=0,
                      help="which row of --input (0-based; a score, rank or preference row)")
    Settings.add_arguments(expl, names=("fields",))
    expl.add_argument("--html", metavar="PATH", help="write a self-contained HTML page here")
    expl.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                      help="ANSI colours on standard output (auto: when it is a terminal)")
    expl.add_argument("--color-by", default="reward", choices=("reward", "logprob", "entropy", "self-certainty"),
                      help="what the colours show (the HTML page can switch)")
    expl.set_defaults(func=cmd_explain)

    srv = sub.add_parser("serve", help=_doc(cmd_serve))
    ModelSettings.add_arguments(srv, ("model", "reward"))
    _add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)

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
    ModelSettings.add_arguments(ev, ("model",))
    # the run options eval shares with the file commands (per suite: a suite is one run), declared once in Settings
    Settings.add_arguments(ev, names=("overwrite", "chunk_rows", "progress", "max_error_fraction", "fields"),
                           defaults={"chunk_rows": 64})
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, run one command, and end every mistake the same way: one line ``endokern: <what and what to do>`` on
    standard error and exit 2 (usage) or 1 (a failed run); the traceback only with ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        if isinstance(err, SystemExit):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        line, code = describe(err)
        _stderr(f"endokern: {line}")
        raise CommandFailed(line, code) from None


if __name__ == "__main__":
    sys.exit(main())
