"""Integrations with other engines; each module imports its engine, so import only the one you use.

- :mod:`endokern.integrations.ray`: scale ``score``, ``compare``, ``rank`` and ``filter`` out with Ray Data
  (``pip install 'endokern[ray]'``).
- :mod:`endokern.integrations.trl`: the endogenous reward as a reward function for TRL's GRPO and RLOO trainers,
  from a local model or an ``endokern serve`` server (needs no extra package; TRL itself is the caller's).
"""
