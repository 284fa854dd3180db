"""Loading a recipe: the YAML file, `--set section.key=value` overrides, and one validation at the door."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from compress.prune import TARGET_KINDS

from .errors import RecipeError, first_error
from .schema import Recipe


def _apply_override(raw: dict, assignment: str) -> str:
    """Set `section.key=value` (YAML-parsed) in `raw`; returns the dotted key."""
    if "=" not in assignment:
        raise RecipeError(f"--set '{assignment}': expected section.key=value")
    dotted, value = assignment.split("=", 1)
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set '{assignment}': '{part}' is not a section")
    node[leaf] = yaml.safe_load(value)
    return dotted


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe in the YAML file `path`, with `overrides` applied, validated; its name defaults to the file's."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    targets = {f"prune.{t}" for t in TARGET_KINDS}
    given = set()  # pruning targets given with --set
    for assignment in overrides:
        dotted = _apply_override(raw, assignment)
        if dotted in targets:  # replaces the recipe file's target, which then needs no null; two --set collide
            given.add(dotted)
            for other in targets - given:
                raw["prune"].pop(other.split(".")[1], None)
    return validate_recipe(raw)


def validate_recipe(raw: dict) -> Recipe:
    """A Recipe from plain data, or a RecipeError naming the first culprit key."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(first_error(e, Recipe)) from None
