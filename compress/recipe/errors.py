"""Recipe errors: one line that names the culprit key, with the closest valid name where one is near."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from compress.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe problem, said in one line that names the culprit."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_error(err: ValidationError, cls: type[BaseModel]) -> str:
    """pydantic's first error as one line: the dotted key, what is wrong, and what was given."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = cls
        for part in e["loc"][:-1]:
            field = section.model_fields.get(str(part))
            section = field.annotation if field is not None and isinstance(field.annotation, type) else section
        return f"unknown recipe key '{loc}'{suggest(str(e['loc'][-1]), section.model_fields)}"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if msg.split(":")[0].startswith(loc) else f"recipe key '{loc}': {msg} (got {e.get('input')!r})"
