"""Pydantic validation errors as messages a person can act on: one line per problem."""
from __future__ import annotations

from pydantic import ValidationError


def format_errors(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
