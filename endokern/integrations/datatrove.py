"""datatrove: :class:`EndoRMFilter` keeps or drops documents by their endogenous reward, :class:`EndoRMAnnotator`
only adds it. ``pip install 'endokern[datatrove]'``.

::

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from endokern.integrations.datatrove import EndoRMFilter

    LocalPipelineExecutor(pipeline=[
        JsonlReader("data/"),
        EndoRMFilter("smollm2-135m-instruct", min_reward=-200.0, exclusion_writer=JsonlWriter("dropped/")),
        JsonlWriter("kept/"),
    ], tasks=4).run()

Each document is scored in batches of ``batch_size`` (through ``filter_batch``) as ``endokern score`` scores a row
whose ``response`` is ``doc.text`` and whose ``prompt`` comes from ``prompt_key`` (a key of ``doc.metadata``), or is
the fixed instruction ``prompt``, or with neither is none: the text is then scored from the model's beginning of
sequence (:func:`endokern.tokenization.document_start`), as pretraining data is. ``doc.metadata`` gets
``reward``, ``reward_mean``, ``logprob`` and ``num_tokens``, or ``reward_error`` with the reason when the document
cannot be scored (an empty text, a missing ``prompt_key``, longer than ``max_length``).

:class:`EndoRMFilter` keeps a document whose ``reward`` is at least ``min_reward`` (every scored one when it is
``None``); ``reward`` is the sum over the text's tokens, or what ``reduce="mean"`` or a ``variant`` (``mean``,
``loglik-mean``...) makes it. A dropped document goes to the ``exclusion_writer`` with ``filter_reason``
``min_reward`` or ``unscorable``. Options are the model and reward options of
:class:`endokern.settings.ModelSettings` and ``variant`` (:class:`~endokern.integrations.datasets.EndoRMMapper`).

The model loads once per worker process, lazily, on the first batch: on ``cuda:{rank}`` (the task's rank modulo the
GPUs) when CUDA exists, else the CPU; the steps pickle and copy without it.
"""

from __future__ import annotations

from typing import Any, List, Optional

try:
    from datatrove.data import Document, DocumentsPipeline
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.utils.batching import batched
except ImportError as _err:  # pragma: no cover - exercised only without datatrove
    raise ImportError("endokern's datatrove integration needs datatrove: pip install 'endokern[datatrove]'") from _err

from .datasets import SCORE_COLUMNS, EndoRMMapper

__all__ = ["EndoRMAnnotator", "EndoRMFilter"]

DEFAULT_BATCH_SIZE = 512  # documents per scoring call: endokern's own chunk of rows


class _Scoring:
    """What both steps share: where the prompt comes from, the scorer, and the annotation of a batch."""

    def _setup_scoring(self, model: str, prompt_key: Optional[str], prompt: Optional[str], options: dict) -> None:
        if prompt_key is not None and prompt is not None:
            raise ValueError("give prompt_key (a metadata key) or prompt (a fixed instruction), not both")
        self.prompt_key = prompt_key
        self.prompt = prompt
        self.scorer = EndoRMMapper(model, **options)
        self.rank = 0

    def _row(self, doc: Document) -> dict:
        if self.prompt_key is not None:  # a document without the key is an error row ("missing field 'prompt'")
            return {"prompt": doc.metadata.get(self.prompt_key), "response": doc.text}
        if self.prompt is not None:
            return {"prompt": self.prompt, "response": doc.text}
        return {"response": doc.text}  # no prompt: the text from the beginning of sequence

    def annotate(self, batch: List[Document]) -> List[Optional[str]]:
        """Score ``batch`` and write the fields into each ``doc.metadata``; per document, why it could not be scored,
        or None."""
        results = self.scorer.score_rows([self._row(doc) for doc in batch], self.rank)
        failures: List[Optional[str]] = []
        for doc, result in zip(batch, results):
            if "reason" in result:
                doc.metadata["reward_error"] = result["reason"]
                self.stat_update("unscorable")
                failures.append(result["reason"])
            else:
                doc.metadata.update({name: result[name] for name in SCORE_COLUMNS})
                self.stat_update("response_tokens", value=result["num_tokens"], unit="doc")
                failures.append(None)
        return failures


class EndoRMFilter(_Scoring, BaseFilter):
    """A datatrove filter by the endogenous reward (see the module doc). ``options``: the model and reward options
    (``template``, ``alpha``, ``reduce``, ``variant``, ``device``, ``dtype``, ``batch_tokens``, ``max_length``...)."""

    name = "EndoRM reward"

    def __init__(self, model: str, *, min_reward: Optional[float] = None, prompt_key: Optional[str] = None,
                 prompt: Optional[str] = None, exclusion_writer=None, batch_size: int = DEFAULT_BATCH_SIZE,
                 **options: Any):
        super().__init__(exclusion_writer=exclusion_writer, batch_size=batch_size)
        self._setup_scoring(model, prompt_key, prompt, options)
        self.min_reward = min_reward

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.rank = rank  # the task's rank picks its GPU
        return super().run(data, rank, world_size)

    def filter(self, doc: Document):
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: List[Document]) -> list:
        out = []
        for doc, failure in zip(batch, self.annotate(batch)):
            if failure is not None:
                out.append((False, "unscorable"))
            elif self.min_reward is not None and doc.metadata["reward"] < self.min_reward:
                out.append((False, "min_reward"))
            else:
                out.append(True)
        return out


class EndoRMAnnotator(_Scoring, PipelineStep):
    """A datatrove step that adds the reward fields to each document's metadata and keeps every document (see the
    module doc); ``options`` as :class:`EndoRMFilter`'s."""

    name = "EndoRM reward"
    type = "ANNOTATOR"

    def __init__(self, model: str, *, prompt_key: Optional[str] = None, prompt: Optional[str] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, **options: Any):
        super().__init__()
        self._setup_scoring(model, prompt_key, prompt, options)
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.rank = rank
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                self.annotate(batch)
            for doc in batch:
                self.stat_update("total")
                self.update_doc_stats(doc)
                yield doc
