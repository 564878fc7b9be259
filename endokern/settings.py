"""The options of a run, once: defaults, validation, command-line arguments and the run key.

The one place an option lives (as vLLM's ``EngineArgs``), in two parts: :class:`ModelSettings`, the model and its
reward options (what :meth:`endokern.EndoRM.from_settings`, ``serve``, ``explain`` and ``eval`` need), and
:class:`Settings`, which adds a file run's options (``score | compare | rank | filter``: files, chunks, shards, a
command's own, the Ray engine) and the run key. The command line builds its arguments from the fields
(:meth:`ModelSettings.add_arguments`) and parses them back (:meth:`ModelSettings.from_args`); ``validate()`` checks
every value and raises :class:`SettingsError` (a ``ValueError``) with a one-line reason, before any model is loaded
or file created. This module imports nothing else of endokern: what the values name on this machine (files,
devices, models, the hub) is checked by :mod:`endokern.checks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["BACKENDS", "COMMANDS", "DEFAULT_MODEL", "DTYPES", "ENGINES", "FIELD_NAMES", "KEY_ORDER", "KEY_WHEN_SET",
           "ModelSettings", "PACKINGS", "REDUCTIONS", "Settings", "SettingsError", "TEMPLATES", "TERMINALS",
           "check_reward", "check_top_fraction", "parse_fields"]

DEFAULT_MODEL = "smollm2-135m-instruct"  # the demo's model (endokern.assets fetches it)
TERMINALS = ("zero", "bootstrap")  # V(s_{H+1}) after the last response token: 0, or the model's value there
REDUCTIONS = ("sum", "mean")
TEMPLATES = ("auto", "plain", "chat")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bf16 where the CPU has native bf16 dot products
BACKENDS = ("auto", "triton", "cpu", "torch")
PACKINGS = {"auto": "auto", "on": True, "off": False}  # the command line's words -> EndoRM's packing
COMMANDS = ("score", "compare", "rank", "filter")
ENGINES = ("local", "ray")


class SettingsError(ValueError):
    """A usage mistake: an option with a value it cannot take, or a file, device or model that cannot be used as
    given. The message is one line naming the option and what to do; the command line exits 2 on it."""


def check_reward(alpha: float, gamma: float, terminal: str, reduce: str) -> None:
    """The reward options: ``alpha > 0`` finite, ``0 <= gamma <= 1`` (a discount: a value above 1 would weigh the
    next state more than the present one and is no soft Bellman operator), a known terminal and reduction."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise SettingsError(f"--alpha must be a finite number > 0 (the soft-value temperature), got {alpha}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise SettingsError(f"--gamma must be a discount in [0, 1], got {gamma}")
    if terminal not in TERMINALS:
        raise SettingsError(f"terminal must be one of {TERMINALS}, got {terminal!r}")
    if reduce not in REDUCTIONS:
        raise SettingsError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def check_top_fraction(top_fraction: Optional[float]) -> None:
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise SettingsError(f"top-fraction must be in (0, 1], got {top_fraction}")


KEY_WHEN_SET = "when-set"  # a key field recorded only when it differs from its default (added after checkpoints exist)
# The order of the run keys in checkpoints written so far (a resumed run writes its key back in the same order); a
# key field not named here follows in the order of the fields.
KEY_ORDER = ("command", "model", "input", "template", "system", "append_eos", "alpha", "gamma", "terminal", "reduce",
             "dtype", "backend", "packing", "batch_tokens", "chunk_rows", "max_length", "num_shards", "shard_index",
             "limit", "engine", "per_token", "min_reward", "top_fraction")


# the names --fields maps input columns onto (endokern.layouts reads rows by them)
FIELD_NAMES = ("prompt", "response", "messages", "chosen", "rejected", "responses", "id", "subset", "response_a",
               "response_b", "label", "prompt_ids", "response_ids")


def parse_fields(spec: str) -> Dict[str, str]:
    """``"prompt=question,chosen=answers.good"`` -> ``{"prompt": "question", "chosen": "answers.good"}``; ValueError
    for an unknown name, a name given twice, or an item that is not NAME=COLUMN."""
    mapping: Dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, eq, column = (x.strip() for x in item.partition("="))
        if not eq or not name or not column:
            raise ValueError(f"{item!r} is not NAME=COLUMN")
        if name not in FIELD_NAMES:
            raise ValueError(f"unknown name {name!r}; the names are {', '.join(FIELD_NAMES)}")
        if name in mapping:
            raise ValueError(f"{name!r} is mapped twice")
        mapping[name] = column
    if not mapping:
        raise ValueError("give NAME=COLUMN[,NAME=COLUMN...]")
    return mapping


def _opt(default: Any, help: Optional[str] = None, *, group: str, choices: Optional[Sequence[Any]] = None,
         key: Any = False, flag: Optional[str] = None, **argparse_kwargs: Any) -> Any:
    """A field with its command-line flag: ``group`` says which commands have it, ``key`` whether it decides the
    output (it is then part of the run key, and a resume with another value is refused): ``True`` always,
    ``KEY_WHEN_SET`` only when its value is not the default (so checkpoints written before it was a key still
    resume). A key field of a command's own group is part of that command's key only."""
    meta = dict(help=help, group=group, choices=choices, key=key, flag=flag, argparse=argparse_kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSettings:
    """The model and its reward options: what loading and scoring need (``serve``, ``explain``, ``eval``, and the
    model part of every file run). Flag groups: ``model`` (the model, its text template, ``alpha``, the batch
    settings, ``max_length``: every command that loads a model) and ``reward`` (``gamma``, ``terminal``, ``reduce``:
    not ``eval``, whose variants set them)."""

    model: str = _opt(DEFAULT_MODEL, f"a model folder, hub id, .gguf file, or '{DEFAULT_MODEL}' (the default, "
                      "fetched once)", group="model", key=True)
    template: str = _opt("auto", group="model", choices=TEMPLATES, key=True)
    system: Optional[str] = _opt(None, "a system prompt for the chat template", group="model", key=True)
    append_eos: bool = _opt(False, "score an EOS after each plain-template response", group="model", key=True)
    alpha: float = _opt(1.0, "soft-value temperature (> 0)", group="model", key=True, type=float)
    gamma: float = _opt(1.0, "discount of the next state's value", group="reward", key=True, type=float)
    terminal: str = _opt("zero", group="reward", choices=TERMINALS, key=True)
    reduce: str = _opt("sum", group="reward", choices=REDUCTIONS, key=True)
    device: Optional[str] = _opt(None, "cpu, cuda, cuda:1 ... (default: cuda when present)", group="model")
    dtype: Optional[str] = _opt(None, "model dtype (default: bfloat16 on CUDA, float32 on CPU; auto: bfloat16 on a "
                                "CPU with native bf16 dot products, avx512_bf16 or amx_bf16, else float32)",
                                group="model", choices=DTYPES, key=True)
    threads: Optional[str] = _opt(None, "CPU threads: a count; 'all' or 'auto' (the default): every CPU the affinity "
                                  "mask and cgroup quota allow, fixed for the run; 'adaptive': those less the ones other "
                                  "processes keep busy, looked at before each batch (last bits may change); default: "
                                  "$ENDOKERN_THREADS, else auto", group="model", metavar="N|all|auto|adaptive")
    backend: str = _opt("auto", group="model", choices=BACKENDS, key=True)
    packing: str = _opt("auto", "padding-free packing (auto: where flash-attn's varlen path runs)", group="model",
                        choices=tuple(PACKINGS), key=True)
    batch_tokens: Optional[int] = _opt(None, "tokens per forward batch, padding included (default: 1024 on CPU, "
                                       "16384 on CUDA)", group="model", key=True, type=int)
    max_length: Optional[int] = _opt(None, "rows with a longer sequence go to the errors file", group="model",
                                     key=True, type=int)

    def validate(self) -> "ModelSettings":
        """Check every value; raises :class:`SettingsError`. Returns ``self``."""
        check_reward(self.alpha, self.gamma, self.terminal, self.reduce)
        for name, allowed in (("template", TEMPLATES), ("backend", BACKENDS), ("packing", tuple(PACKINGS))):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads is not None and not _threads_ok(self.threads):
            raise SettingsError(f"--threads must be a count >= 1, 'all', 'auto' or 'adaptive', got {self.threads!r}")
        for name in ("batch_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be >= 1")
        return self

    def model_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :meth:`endokern.EndoRM.from_pretrained` (after the model's name)."""
        return dict(device=self.device, dtype=self.dtype, alpha=self.alpha, gamma=self.gamma, terminal=self.terminal,
                    reduce=self.reduce, backend=self.backend, batch_tokens=self.batch_tokens,
                    packing=PACKINGS[self.packing], threads=self.threads)

    def model_settings(self) -> "ModelSettings":
        """The model part alone (of a :class:`Settings`, too)."""
        return ModelSettings(**{f.name: getattr(self, f.name) for f in fields(ModelSettings)})

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, groups: Sequence[str] = (), names: Sequence[str] = (),
                      defaults: Optional[Dict[str, Any]] = None) -> None:
        """Add the flags of the fields in ``groups`` (``model``, ``reward``, ``run``, a command, ``ray``) and of the
        fields named in ``names`` to ``parser``; ``defaults`` overrides a field's default for this parser. A field
        left out keeps its default."""
        defaults = defaults or {}
        unknown = set(names) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        ray_group = None
        for f in fields(cls):
            meta = f.metadata
            if meta.get("group") not in groups and f.name not in names:
                continue
            target = parser
            if meta["group"] == "ray":
                if ray_group is None:
                    ray_group = parser.add_argument_group("scale out with Ray (pip install 'endokern[ray]')")
                target = ray_group
            default = defaults.get(f.name, _default(f))
            kwargs = dict(meta["argparse"], help=meta["help"], dest=f.name)
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                if flag.startswith("--no-"):
                    kwargs.update(action="store_false", dest=f.name, default=default)
                else:
                    kwargs.update(action="store_true", default=default)
            else:
                kwargs.update(default=default)
                if meta["choices"] is not None:
                    kwargs["choices"] = meta["choices"]
            target.add_argument(flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any):
        """The settings of parsed arguments (fields a parser lacks keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)


@dataclass
class Settings(ModelSettings):
    """Every option of ``endokern score | compare | rank | filter``: the model's (:class:`ModelSettings`), then
    ``run`` (files, chunks, shards, resume: the file commands), a command's own (``score``, ``compare``,
    ``filter``), and ``ray`` (the Ray engine's resources)."""

    command: str = _opt("score", group="-", key=True)
    # the run
    input: List[str] = _opt(["-"], "JSONL, JSONL.gz, JSON, Parquet, or '-' (stdin); several files are read one "
                            "after another", group="run", key=True, nargs="+")
    output: str = _opt("-", "JSONL, JSONL.gz or Parquet by extension, or '-' (stdout)", group="run")
    errors: Optional[str] = _opt(None, "where malformed rows go (default: beside the output, *.errors.jsonl)",
                                 group="run")
    overwrite: bool = _opt(False, "start over instead of resuming or refusing", group="run")
    num_shards: int = _opt(1, group="run", key=True, type=int)
    shard_index: int = _opt(0, group="run", key=True, type=int)
    limit: Optional[int] = _opt(None, "score only the first N rows (of this shard)", group="run", key=True, type=int)
    chunk_rows: int = _opt(512, "rows per committed chunk (the resume granularity)", group="run", key=True, type=int)
    progress: bool = _opt(True, "no progress bar", group="run", flag="--no-progress")
    fields: Optional[str] = _opt(None, "map the input's columns onto endokern's names: NAME=COLUMN[,NAME=COLUMN...] "
                                 "(names: prompt, response, messages, chosen, rejected, responses, id, subset, "
                                 "response_a, response_b, label; a dotted COLUMN reads a nested field)", group="run",
                                 key=KEY_WHEN_SET, metavar="NAME=COLUMN,...")
    max_error_fraction: Optional[float] = _opt(None, "fail the run (exit 1) when more than this fraction of its rows "
                                               "are errors (a run where no row could be scored always fails)",
                                               group="run", type=float, metavar="F")
    # a command's own
    per_token: bool = _opt(False, "also write token_rewards and token_logprobs", group="score", key=True)
    self_certainty: bool = _opt(False, "also write self_certainty: the mean over the response of KL(uniform || the "
                                "model's next-token distribution), its confidence", group="score", key=KEY_WHEN_SET)
    summary: Optional[str] = _opt(None, "summary JSON (default: beside the output, *.summary.json)", group="compare")
    min_reward: Optional[float] = _opt(None, "keep rows whose reward is at least this", group="filter", key=True,
                                       type=float)
    top_fraction: Optional[float] = _opt(None, "keep this fraction of rows, best first", group="filter", key=True,
                                         type=float)
    rejected: Optional[str] = _opt(None, "where the rows not kept go, with the reason (default: *.rejected.jsonl)",
                                   group="filter")
    plot: Optional[str] = _opt(None, "also write a histogram of the rewards (kept vs rejected) here", group="filter",
                               metavar="PNG")
    # score and filter: Dolma attribute files instead of one output
    attributes: Optional[str] = _opt(None, "write Dolma attribute files named NAME: every input under a documents/ "
                                     "folder gets attributes/NAME/<the same name>, row for row (resumable per file; "
                                     "--output is not used)", group="attributes", key=KEY_WHEN_SET, metavar="NAME",
                                     flag="--dolma-attributes")
    # the Ray engine
    engine: str = _opt("local", "local: this process; ray: Ray Data workers, --output is a folder of Parquet parts",
                       group="ray", choices=ENGINES, key=KEY_WHEN_SET)
    num_workers: int = _opt(1, "ray: scoring actors (one model each)", group="ray", type=int)
    address: Optional[str] = _opt(None, "ray: the cluster, HEAD:6379 or auto (default: RAY_ADDRESS, else one started "
                                  "here with `ray start`, else a new local one)", group="ray")
    num_gpus_per_worker: Optional[float] = _opt(None, "ray: GPUs per actor (default: 1 when the cluster has GPUs, "
                                                "else 0)", group="ray", type=float)
    num_cpus_per_worker: float = _opt(1, "ray: CPUs per actor, also its torch threads", group="ray", type=float)

    # ------------------------------------------------------------------------------------------------ checks

    def validate(self) -> "Settings":
        """Check every value; raises :class:`SettingsError`. Returns ``self``."""
        if self.command not in COMMANDS:
            raise SettingsError(f"command must be one of {COMMANDS}, got {self.command!r}")
        super().validate()
        if self.engine not in ENGINES:
            raise SettingsError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.chunk_rows < 1:
            raise SettingsError("--chunk-rows must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise SettingsError("--limit must be >= 0")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise SettingsError(f"need --num-shards >= 1 and 0 <= --shard-index < --num-shards, got num_shards "
                                f"{self.num_shards}, shard_index {self.shard_index}")
        if not self.input:
            raise SettingsError("--input needs at least one file (or '-')")
        if self.max_error_fraction is not None and not 0 <= self.max_error_fraction <= 1:
            raise SettingsError(f"--max-error-fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.fields is not None:
            try:
                parse_fields(self.fields)
            except ValueError as err:
                raise SettingsError(f"--fields: {err}") from None
        if self.command == "filter":
            if self.min_reward is None and self.top_fraction is None:
                raise SettingsError("give --min-reward, --top-fraction, or both")
            check_top_fraction(self.top_fraction)
            if self.output == "-" and self.top_fraction is not None:
                raise SettingsError("--top-fraction needs a file --output (it scores every row first)")
            if self.plot and self.output == "-":
                raise SettingsError("--plot needs a file --output (it reads the rewards back)")
        if self.attributes is not None:
            self._validate_attributes()
        if self.engine == "ray":
            self._validate_ray()
        return self

    def _validate_attributes(self) -> None:
        if self.command not in ("score", "filter"):
            raise SettingsError("--dolma-attributes goes with score and filter")
        if not self.attributes or not all(c.isalnum() or c in "_-." for c in self.attributes) or \
                "__" in self.attributes:
            raise SettingsError(f"--dolma-attributes NAME: a name of letters, digits, '_', '-' or '.' without '__' "
                                f"(Dolma joins it to each field with '__'), got {self.attributes!r}")
        if self.template == "chat":
            raise SettingsError("--dolma-attributes scores documents as plain text (from the model's beginning of "
                                "sequence); leave out --template chat")
        if self.command == "filter" and (self.top_fraction is not None or self.min_reward is None):
            raise SettingsError("filter --dolma-attributes keeps by --min-reward (a row's own reward), not "
                                "--top-fraction")
        if self.engine != "local":
            raise SettingsError("--dolma-attributes runs on the local engine (one resumable run per file)")
        for path in self.input:
            if path == "-" or "documents" not in os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1]:
                raise SettingsError(f"--dolma-attributes: {path} is not under a documents/ folder (Dolma's layout: "
                                    "DATASET/documents/..., whose attributes go to DATASET/attributes/NAME/...)")

    def _validate_ray(self) -> None:
        out = self.output.rstrip("/\\") or self.output
        if out == "-":
            raise SettingsError("--engine ray writes a folder of Parquet files; give --output DIR")
        if out.lower().endswith((".jsonl", ".ndjson", ".json", ".gz")):  # a file name (a folder may end in .parquet)
            raise SettingsError(f"--engine ray writes a folder of Parquet files, not {out}; give --output DIR")
        if "-" in self.input:
            raise SettingsError("--engine ray reads files, not standard input")
        if self.num_shards != 1 or self.shard_index != 0:
            raise SettingsError("--engine ray spreads the rows over its workers itself; leave out --num-shards and "
                                "--shard-index")
        if self.num_workers < 1:
            raise SettingsError("--num-workers must be >= 1")

    # ------------------------------------------------------------------------------------------------ uses

    def run_key(self) -> Dict[str, Any]:
        """The options that decide a run's output (a resume with other values is refused), derived from the fields
        marked ``key``: every such field (one of a command's own group only for that command; a ``KEY_WHEN_SET`` one
        only when set), the inputs as absolute paths, in the order of :data:`KEY_ORDER`."""
        key: Dict[str, Any] = {}
        for f in fields(self):
            mark, group, value = f.metadata.get("key"), f.metadata.get("group"), getattr(self, f.name)
            if not mark or (group in COMMANDS and group != self.command):
                continue
            if mark == KEY_WHEN_SET and value == _default(f):
                continue
            key[f.name] = value
        key["input"] = [os.path.abspath(p) if p != "-" else p for p in self.input]
        rank = {name: i for i, name in enumerate(KEY_ORDER)}
        return dict(sorted(key.items(), key=lambda item: rank.get(item[0], len(rank))))


def _threads_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    text = str(value).strip().lower()
    return text in ("all", "auto", "adaptive") or (text.isdigit() and int(text) >= 1)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
