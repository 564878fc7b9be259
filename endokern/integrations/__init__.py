"""Integrations with other engines; each module imports its engine, so import only the one you use.

- :mod:`endokern.integrations.ray`: scale ``score``, ``compare``, ``rank`` and ``filter`` out with Ray Data
  (``pip install 'endokern[ray]'``).
"""
