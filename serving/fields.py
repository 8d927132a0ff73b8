"""Field types and checks that the API's wire shapes share: a preference (six weights or a profile name),
record ids, printable text, and the base model that leaves None fields out of the JSON as OpenAI does.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Mapping

from pydantic import AfterValidator, BaseModel, WithJsonSchema, model_serializer

from alignment.objectives import OBJECTIVES, Preference, PreferenceError

PROFILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
RECORD_ID = r"^[A-Za-z0-9_-]{1,64}$"
"""Session and message ids (the server issues UUIDs); anything else cannot name a record."""
NOT_A_RECORD_ID = ("is not an id this service issues (1-64 letters, digits, '-' or '_'); use an id as the API "
                   "returned it (POST /v1/sessions, a reply's attune.session_id, GET /v1/sessions/{id}/messages)")
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


def check_preference(value: Any) -> dict[str, float] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not re.match(PROFILE_NAME, value):
            raise ValueError(f"profile name {value!r} is not valid; use the id of a stored profile "
                             "(see GET /v1/models) or give six weights")
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"give a profile name or an object of weights over {list(OBJECTIVES)}")
    bad = [k for k, w in value.items() if isinstance(w, bool) or not isinstance(w, (int, float))]
    if bad:
        raise ValueError(f"weight(s) for {sorted(map(str, bad))} must be numbers")
    outside = [k for k, w in value.items() if isinstance(w, int) and not 0 <= w <= 1]
    if outside:  # also keeps integers too big for a float away from Preference
        raise ValueError(f"weight(s) for {sorted(map(str, outside))} are outside [0, 1]; each weight is a share "
                         "of the whole, and the six sum to 1")
    try:
        return Preference(value).as_dict()
    except PreferenceError as e:
        try:
            Preference(value, normalize=True)
        except PreferenceError:
            raise ValueError(str(e)) from None
    total = math.fsum(value.values())
    raise ValueError(f"weights sum to {total:.4f}, not 1 (an objective left out counts as 0); scale them, "
                     f"e.g. divide each by {total:.4g}")


PREFERENCE_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "object", "description": "Weights in [0, 1] that sum to 1; an objective left out counts as 0.",
     "properties": {o: {"type": "number", "minimum": 0, "maximum": 1} for o in OBJECTIVES},
     "additionalProperties": False},
    {"type": "string", "pattern": PROFILE_NAME, "description": "A profile id from GET /v1/models."},
    {"type": "null"}]}
PreferenceIn = Annotated[dict[str, float] | str | None, WithJsonSchema(PREFERENCE_SCHEMA)]
"""The `preference` field of a request: its schema says what `check_preference` checks (all but the sum)."""


def _record_id(value: str) -> str:
    if not re.match(RECORD_ID, value):
        raise ValueError(f"{value[:80]!r} {NOT_A_RECORD_ID}")
    return value


def _printable(value: str) -> str:
    if not re.match(PRINTABLE, value):
        raise ValueError("contains control characters; use printable characters only")
    return value


RecordId = Annotated[str, AfterValidator(_record_id), WithJsonSchema({"type": "string", "pattern": RECORD_ID})]
Printable = Annotated[str, AfterValidator(_printable)]

def resolve_preference(value: dict[str, float] | str | None,
                       profiles: Mapping[str, Mapping[str, float]], default: str = "balanced") -> Preference:
    """A validated `preference` field as a Preference: weights as given, or a named profile."""
    name = default if value is None else value
    if isinstance(name, str):
        if name not in profiles:
            raise PreferenceError(f"unknown profile {name!r}; known profiles: {sorted(profiles)}")
        return Preference(profiles[name])
    return Preference(name)


class Wire(BaseModel):
    """Drops the fields named in `_omit_none` from the JSON when they are None (as OpenAI does)."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_none)}
