"""Integrations with other frameworks; each module imports its framework, so import only the one you use. Each is a
thin layer over the one row path (:class:`endokern.pipeline.RowScorer`), with the rewards of ``endokern score``.

- :mod:`endokern.integrations.ray`: scale ``score``, ``compare``, ``rank`` and ``filter`` out with Ray Data
  (``pip install 'endokern[ray]'``).
- RL loops (``pip install 'endokern[rl]'`` for the tests against the frameworks' own code):
  :mod:`endokern.integrations.trl` (TRL's GRPO and RLOO trainers: a reward function, sync or async, local or from an
  ``endokern serve`` server), :mod:`endokern.integrations.verl` (a verl reward manager that scores the rollout's
  token ids), :mod:`endokern.integrations.openrlhf` (a ``reward_func`` file for OpenRLHF's ``--reward.remote_url``),
  :mod:`endokern.integrations.slime` (slime's custom reward function).
- Data pipelines: :mod:`endokern.integrations.datatrove` (a batched filter and annotator), :mod:`endokern.integrations
  .curator` (a NeMo Curator stage), :mod:`endokern.integrations.datasets` (a mapper for ``Dataset.map`` whose
  fingerprint is its options).
"""
