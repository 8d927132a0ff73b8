"""Attune's serving layer: OpenAI-compatible API, preference routing, safety gate and persistence.

Knows adapters and the reward model only through `adapters` and `alignment.reward`.
"""
