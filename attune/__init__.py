"""Attune: preference-steerable therapeutic chat. This package holds the `attune` CLI and paths."""
__version__ = "0.1.0"
