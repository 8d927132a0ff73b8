"""Attune's serving layer: OpenAI-compatible API, preference routing, safety gate and persistence.

Knows adapters and the reward model only through `adapters` and `alignment.reward`.
"""
from attune.compat import refuse_adapterhub

refuse_adapterhub()  # every replica imports this package first: refuse AdapterHub's `adapters` with a clear message
