"""Hugging Face ``datasets``: :class:`EndoRMMapper` scores a dataset's rows inside ``Dataset.map``.

::

    from datasets import load_dataset
    from endokern.integrations.datasets import EndoRMMapper

    ds = load_dataset("json", data_files="rows.jsonl", split="train")
    scored = ds.map(EndoRMMapper("smollm2-135m-instruct"), batched=True, with_rank=True, num_proc=n_gpus)

A batch's rows are read as ``endokern score`` reads a file's (columns ``prompt`` and ``response``, or ``messages``;
``fields`` maps other columns as ``--fields`` does) and get four columns, ``reward``, ``reward_mean``, ``logprob`` and
``num_tokens``, plus ``reward_error``: ``""``, or why the row could not be scored (its rewards are then NaN and its
``num_tokens`` 0): no row is lost silently. No column is ever ``None`` (a column whose first batch holds only ``None``
is written as Arrow's null type, and the next batch with a value fails). A row with no prompt (no ``prompt`` or
``messages`` column, none mapped) is scored as text from the model's beginning of sequence
(:func:`endokern.tokenization.document_start`), under the plain template.

Options are :class:`endokern.settings.ModelSettings`' fields (``template``, ``alpha``, ``dtype``, ``device``,
``batch_tokens``, ``max_length``...) and ``variant``, a reward variant of :mod:`endokern.variants` (``mean``,
``bootstrap``, ``loglik-mean``...) that ``reward`` and ``reward_mean`` then hold. They are checked when the mapper is
made, before ``map`` starts.

The model loads lazily, on the first batch a process scores, on ``cuda:{rank}`` (``rank`` modulo the GPUs) when CUDA
exists, else the CPU (an explicit ``device`` wins), and once per process and options (:func:`load_model`). A CPU
worker forked from the process that imported this module (``num_proc`` under the fork start method) scores with one
torch thread: OpenMP's thread pool does not survive a fork, and the workers share the cores anyway. The mapper
pickles as its options alone, never the model: ``datasets`` fingerprints a function by pickling it, so a second
identical ``map`` is a cache hit and any changed option a miss; ``num_proc`` workers each load their own model.

This module needs no ``datasets`` import: the datatrove and NeMo Curator classes score through the same mapper.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..model import EndoRM
from ..pipeline import RowScorer, ScoreTask
from ..settings import ModelSettings, SettingsError, parse_fields
from ..tokenization import document_start
from ..variants import parse_variant

__all__ = ["EndoRMMapper", "OUTPUT_COLUMNS", "SCORE_COLUMNS", "document_start", "load_model", "rank_device",
           "result_columns"]

SCORE_COLUMNS = ("reward", "reward_mean", "logprob", "num_tokens")
OUTPUT_COLUMNS = SCORE_COLUMNS + ("reward_error",)
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelSettings) if f.name != "model")
OPTIONS = MODEL_OPTIONS + ("variant",)


def rank_device(rank: Optional[int]) -> str:
    """The device of a worker of rank ``rank``: ``cuda:{rank % GPUs}`` when CUDA exists, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{(rank or 0) % torch.cuda.device_count()}"


_IMPORT_PID = os.getpid()  # a process forked after this import (datasets' num_proc workers) has another pid
_LOADED: Dict[str, Tuple[Tuple[Any, ...], EndoRM]] = {}  # the last model this process loaded, by its settings


def load_model(settings: ModelSettings) -> EndoRM:
    """``EndoRM.from_settings(settings)``, once per process: the last model loaded is kept and reused while the
    settings (device included) stay the same, so steps copied per task or per map share one model."""
    key = dataclasses.astuple(settings)
    held = _LOADED.get("model")
    if held is None or held[0] != key:
        _LOADED.clear()  # free the old model before loading another
        _LOADED["model"] = (key, EndoRM.from_settings(settings))
    return _LOADED["model"][1]


class EndoRMMapper:
    """A picklable function for ``Dataset.map(mapper, batched=True, with_rank=True)``: a batch of columns in, the
    reward columns (:data:`OUTPUT_COLUMNS`) out. See the module doc for the columns, the options and caching.

    :meth:`score_rows` scores plain rows (dicts) the same way; the datatrove and NeMo Curator classes call it.
    """

    def __init__(self, model: str, *, fields: Union[str, Mapping[str, str], None] = None, **options: Any):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
        if isinstance(options.get("packing"), bool):  # EndoRM's spelling of the command line's on / off
            options["packing"] = "on" if options["packing"] else "off"
        self.model = model
        self.options = dict(sorted(options.items()))
        model_options = {k: v for k, v in self.options.items() if k in MODEL_OPTIONS}
        self.settings = ModelSettings(model=model, **model_options).validate()
        variant = self.options.get("variant")
        try:
            self.variant = parse_variant(variant) if variant is not None else None
        except ValueError as err:
            raise SettingsError(f"variant: {err}") from None
        if self.variant is not None and self.variant.kind == "judge":
            raise SettingsError("variant 'judge' is a separate generative pass; choose a one-pass variant")
        if fields is not None and not isinstance(fields, str):
            fields = ",".join(f"{name}={column}" for name, column in dict(fields).items())
        try:
            self.mapping = parse_fields(fields) if fields is not None else None
        except ValueError as err:
            raise SettingsError(f"fields: {err}") from None
        self.fields = ",".join(f"{k}={v}" for k, v in sorted(self.mapping.items())) if self.mapping else None
        self._scorers: Optional[Tuple[str, RowScorer, RowScorer]] = None  # device, with a prompt, without one

    # ------------------------------------------------------------------------------------------ pickling = options

    def __getstate__(self) -> Dict[str, Any]:
        return {"model": self.model, "fields": self.fields, "options": self.options}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["model"], fields=state["fields"], **state["options"])

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        fields = f", fields={self.fields!r}" if self.fields else ""
        return f"EndoRMMapper({self.model!r}{fields}{options})"

    # ------------------------------------------------------------------------------------------ scoring

    @property
    def columns(self) -> List[str]:
        """The input columns the mapped names read (a dotted column: its first part)."""
        return sorted({column.split(".")[0] for column in (self.mapping or {}).values()})

    def load(self, rank: Optional[int] = None) -> EndoRM:
        """The model on this worker's device (loaded on the first call, see :func:`load_model`)."""
        return self._scorers_for(rank)[1].rm

    def _scorers_for(self, rank: Optional[int]) -> Tuple[str, RowScorer, RowScorer]:
        device = self.settings.device or rank_device(rank)
        if self._scorers is None or self._scorers[0] != device:
            if os.getpid() != _IMPORT_PID and torch.device(device).type == "cpu":
                torch.set_num_threads(1)  # a forked worker: the parent's OpenMP threads did not survive the fork
            rm = load_model(self.settings.replace(device=device))
            task = ScoreTask(variant=self.variant, alpha=self.settings.alpha)
            task.fields = self.mapping
            s = self.settings
            with_prompt = RowScorer(rm, task, template=s.template, system=s.system, append_eos=s.append_eos,
                                    max_length=s.max_length)
            # a text with no prompt: plain text after the beginning of sequence, whatever the template
            without = RowScorer(rm, task, template="plain", append_eos=s.append_eos, max_length=s.max_length)
            self._start = document_start(rm.tokenizer)
            self._scorers = (device, with_prompt, without)
        return self._scorers

    def _has_prompt(self, row: Any) -> bool:
        mapped = self.mapping or {}
        return not isinstance(row, dict) or any(name in row or name in mapped for name in ("prompt", "messages"))

    def score_rows(self, rows: Sequence[Any], rank: Optional[int] = None) -> List[dict]:
        """Plain rows -> one result per row, in order (:meth:`endokern.pipeline.RowScorer.score_rows`): an output
        row (``reward``, ``reward_mean``, ``logprob``, ``num_tokens``) or an error row with its ``reason``. A row
        with no ``prompt`` or ``messages`` (none mapped) is text from the beginning of sequence."""
        _, with_prompt, without = self._scorers_for(rank)
        results: List[Optional[dict]] = [None] * len(rows)
        bare = [i for i, row in enumerate(rows) if not self._has_prompt(row)]
        prompted = [i for i, row in enumerate(rows) if self._has_prompt(row)]
        for scorer, picked, start in ((with_prompt, prompted, None), (without, bare, self._start)):
            if not picked:
                continue
            chunk = [rows[i] if start is None else dict(rows[i], prompt=start) for i in picked]
            for i, result in zip(picked, scorer.score_rows(chunk)):
                results[i] = result
        return results  # type: ignore[return-value]

    def __call__(self, batch: Mapping[str, Sequence[Any]], rank: Optional[int] = None) -> Dict[str, list]:
        """A batch (a dict of columns) -> the :data:`OUTPUT_COLUMNS` of its rows."""
        names = list(batch.keys())
        n = len(batch[names[0]]) if names else 0
        columns = {name: list(batch[name]) for name in names}
        rows = [{name: columns[name][i] for name in names} for i in range(n)]
        return result_columns(self.score_rows(rows, rank))


def result_columns(results: Sequence[dict]) -> Dict[str, list]:
    """Results (output or error rows) as the :data:`OUTPUT_COLUMNS`: an error row's rewards are NaN, its
    ``num_tokens`` 0 and its ``reward_error`` the reason; a scored row's ``reward_error`` is ``""``."""
    out: Dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    for result in results:
        failed = "reason" in result
        for name in ("reward", "reward_mean", "logprob"):
            out[name].append(math.nan if failed else float(result[name]))
        out["num_tokens"].append(0 if failed else int(result["num_tokens"]))
        out["reward_error"].append(result["reason"] if failed else "")
    return out

