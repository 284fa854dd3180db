"""Recipe errors: one line that names the culprit key, with the closest valid name where one is near."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from compress.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe problem, said in one line that names the culprit."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def section_of(annotation) -> type[BaseModel] | None:
    """The section (a pydantic model) a field holds, through Optional, Annotated and unions; None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_of(arg)
        if found is not None:
            return found
    return None


def _section_at(cls: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The section at the dotted `path` below `cls` (None where the path leaves the sections)."""
    section = cls
    for part in path:
        field = section.model_fields.get(str(part))
        section = section_of(field.annotation) if field is not None else None
        if section is None:
            return None
    return section


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def first_error(err: ValidationError, cls: type[BaseModel]) -> str:
    """pydantic's first error as one line: the dotted key, what is wrong, and what was given. An unknown key comes
    first: a misspelt key often causes the other errors (its section or value left at the default)."""
    errors = err.errors()
    e = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = _section_at(cls, e["loc"][:-1])
        near = suggest(str(e["loc"][-1]), section.model_fields) if section is not None else ""
        return f"unknown recipe key '{loc}'{near}"
    msg = " ".join(e["msg"].removeprefix("Value error, ").split())  # one line, whatever the message held
    head = msg.split(":")[0]
    if not loc or head.startswith(loc):
        return msg
    section = _section_at(cls, e["loc"])
    if section is not None and head in section.model_fields:  # a section's check naming its own field
        return f"recipe key '{loc}.{head}':{msg[len(head) + 1:]}"
    return f"recipe key '{loc}': {msg} (got {_shown(e.get('input'))})"
