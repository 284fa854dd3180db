"""Loading a recipe: the YAML file, `--set section.key=value` overrides, and one validation at the door.

The YAML is read strictly: UTF-8 text, a key given twice in one mapping is an error with both lines (YAML itself
lets the last one win silently), and a syntax error keeps its line and column."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from compress.prune import TARGET_KINDS

from .errors import RecipeError, first_error
from .schema import Recipe


def _duplicate(node: yaml.Node, path: tuple[str, ...] = ()) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping below `node`: (its dotted path, first line, second line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":  # a merge key may repeat what it merges
                if key in seen:
                    return ".".join([*path, key]), seen[key], line
                seen[key] = line
            found = _duplicate(value_node, (*path, str(key)))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate(item, (*path, str(i)))
            if found:
                return found
    return None


def parse_yaml(text: str, where: str):
    """`text` as YAML data; a syntax error (with its line and column) or a duplicate key is a RecipeError that
    starts with `where`."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        found = _duplicate(node) if node is not None else None
        if found:
            key, first, second = found
            raise RecipeError(f"{where}: key '{key}' given twice (lines {first} and {second}): give it once")
        return loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = f"{e.problem} ({e.context})" if e.context else e.problem
        raise RecipeError(f"{where} is not valid YAML: {at}{problem}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _apply_override(raw: dict, assignment: str) -> str:
    """Set `section.key=value` (YAML-parsed) in `raw`; returns the dotted key."""
    if "=" not in assignment:
        raise RecipeError(f"--set '{assignment}': expected section.key=value")
    dotted, value = assignment.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise RecipeError(f"--set '{assignment}': expected section.key=value")
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise RecipeError(f"--set '{assignment}': '{part}' is not a section")
    node[leaf] = parse_yaml(value, f"--set '{assignment}'")
    return dotted


def read_recipe_file(path: str | Path) -> dict:
    """The YAML mapping in the recipe file `path`, read strictly (UTF-8, no duplicate key)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"recipe {path} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                          f"save it as UTF-8") from None
    raw = parse_yaml(text, f"recipe {path}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, not a {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe in the YAML file `path`, with `overrides` applied, validated; its name defaults to the file's."""
    path = Path(path)
    raw = read_recipe_file(path)
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
