"""NeMo Curator: :class:`EndoRMStage`, a ``ProcessingStage[DocumentBatch, DocumentBatch]`` that adds the endogenous
reward to each document. ``pip install 'endokern[curator]'``.

::

    from nemo_curator.pipeline import Pipeline
    from nemo_curator.stages.text.filters.score_filter import Filter
    from endokern.integrations.curator import EndoRMStage

    pipeline = Pipeline(name="reward-filter", stages=[
        reader,                                          # any stage that yields DocumentBatch
        EndoRMStage("smollm2-135m-instruct"),
        Filter(filter_fn=lambda reward: reward >= -200.0, filter_field="reward"),  # NaN (unscorable) is dropped
        writer,
    ])
    pipeline.run()                                       # Curator's default executor (Xenna on Ray)

A batch's rows are read as ``endokern score`` reads rows, with ``fields`` mapping the batch's columns
(``"response=text"`` by default: Curator's ``text`` column, with no prompt, scored from the model's beginning of
sequence; ``fields="prompt=instruction,response=text"`` adds a prompt). Each batch gets the columns ``reward``,
``reward_mean``, ``logprob``, ``num_tokens`` and ``reward_error`` (``""``, or why the row could not be scored; its
rewards are then NaN), as :class:`~endokern.integrations.datasets.EndoRMMapper` writes them. Options are the model
and reward options of :class:`endokern.settings.ModelSettings` and ``variant``.

Resources follow the device: one GPU per worker when ``device`` is a CUDA device, or is left out on a machine with
CUDA; else one CPU. ``setup()`` loads the model once per worker (Ray gives each GPU worker its own GPU, which it
sees as ``cuda:0``: give ``device="cuda"``, not a numbered one); ``process_batch()`` scores the rows of all the batches
it is given together.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

try:
    from nemo_curator.backends.base import WorkerMetadata
    from nemo_curator.stages.base import ProcessingStage
    from nemo_curator.stages.resources import Resources
    from nemo_curator.tasks import DocumentBatch
except ImportError as _err:  # pragma: no cover - exercised only without NeMo Curator
    raise ImportError("endokern's NeMo Curator integration needs NeMo Curator: pip install 'endokern[curator]'") \
        from _err

from .datasets import OUTPUT_COLUMNS, EndoRMMapper, result_columns

__all__ = ["EndoRMStage"]


class EndoRMStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Adds the reward columns to each ``DocumentBatch`` (see the module doc)."""

    name = "endorm_reward"

    def __init__(self, model: str, **options: Any):
        options.setdefault("fields", "response=text")
        self.scorer = EndoRMMapper(model, **options)
        device = self.scorer.settings.device
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        self.resources = Resources(cpus=1.0, gpus=1.0) if on_gpu else Resources(cpus=1.0)

    def inputs(self):
        return ["data"], self.scorer.columns

    def outputs(self):
        return ["data"], self.scorer.columns + list(OUTPUT_COLUMNS)

    def setup(self, worker_metadata: Optional[WorkerMetadata] = None) -> None:
        self.scorer.load()

    def process(self, task: DocumentBatch) -> DocumentBatch:
        return self.process_batch([task])[0]

    def process_batch(self, tasks: List[DocumentBatch]) -> List[DocumentBatch]:
        frames = [task.to_pandas() for task in tasks]
        rows = [row for frame in frames for row in frame.to_dict(orient="records")]
        results = self.scorer.score_rows(rows)
        out, first = [], 0
        for task, frame in zip(tasks, frames):
            columns = result_columns(results[first : first + len(frame)])
            first += len(frame)
            frame = frame.assign(**columns)
            out.append(DocumentBatch(dataset_name=task.dataset_name, data=frame, _metadata=task._metadata,
                                     _stage_perf=task._stage_perf))
        return out
