"""The recipe reference (docs/recipes.md), generated from the schema: every section and key with its type, default,
constraints and description, the allowed names of every extension point (read from its table), and the recipes
shipped in recipes/ with the first sentence of each one's header comment.

    python -m compress.recipe.reference                       # print it
    python -m compress.recipe.reference --write docs/recipes.md

The output depends on nothing but the schema, the tables and the recipe files (sorted), so the committed file can
be compared with a fresh one (tests/test_recipe_reference.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from .errors import section_of
from .schema import Recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

# annotated_types bounds -> how the reference writes them
BOUNDS = {annotated_types.Gt: "> {}", annotated_types.Ge: ">= {}", annotated_types.Lt: "< {}",
          annotated_types.Le: "<= {}", annotated_types.MinLen: "at least {} items",
          annotated_types.MaxLen: "at most {} items"}
BOUND_ATTRS = {annotated_types.Gt: "gt", annotated_types.Ge: "ge", annotated_types.Lt: "lt", annotated_types.Le: "le",
               annotated_types.MinLen: "min_length", annotated_types.MaxLen: "max_length"}


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _constraints(metadata) -> list[str]:
    """The bounds, patterns and allowed names among a field's (or a type's) metadata."""
    out = []
    for item in metadata:
        kind = type(item)
        if kind in BOUNDS:
            out.append(BOUNDS[kind].format(getattr(item, BOUND_ATTRS[kind])))
        elif getattr(item, "pattern", None):
            out.append(f"matches `{item.pattern}`")
        elif isinstance(item, AfterValidator) and hasattr(item.func, "names"):
            out.append(f"a name in {item.func.what}: " + ", ".join(f"`{n}`" for n in item.func.names()))
        elif isinstance(item, FieldInfo):
            out.extend(_constraints(item.metadata))
    return out


def _type(annotation) -> tuple[str, list[str]]:
    """A type as the reference writes it, and the constraints carried inside it (list items, Annotated)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null", []
    if origin is typing.Annotated:
        name, inner = _type(args[0])
        return name, inner + _constraints(args[1:])
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args), []
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args]
        return " or ".join(p[0] for p in parts), [c for p in parts for c in p[1]]
    if origin is list:
        name, inner = _type(args[0])
        return f"list of {name}", [f"each {c}" for c in inner]
    if origin is dict:
        (key, key_c), (value, value_c) = _type(args[0]), _type(args[1])
        return f"mapping {key} -> {value}", [f"key {c}" for c in key_c] + [f"value {c}" for c in value_c]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section", []
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path", []
    return getattr(annotation, "__name__", str(annotation)), []


def _default(field: FieldInfo) -> str:
    if isinstance(field.default_factory, type) and issubclass(field.default_factory, BaseModel):
        return "(section)"
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.is_required():
        return "required"
    else:
        value = field.default
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value)}`"


def _rows(cls: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        kind, inner = _type(field.annotation)
        constraints = inner + _constraints(field.metadata)
        rows.append(f"| `{name}` | {_cell(kind)} | {_cell(_default(field))} | {_cell('; '.join(constraints))} "
                    f"| {_cell(field.description or '')} |")
    return rows


def _sections(cls: type[BaseModel], path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, section) of `cls` and of every section below it, depth first, in field order."""
    out = [(path, cls)]
    for name, field in cls.model_fields.items():
        section = section_of(field.annotation)
        if section is not None:
            out.extend(_sections(section, f"{path}.{name}" if path else name))
    return out


def _name_checks(items) -> list:
    """The `one_of` validators among `items` (a field's metadata, a type's arguments) and the types inside them."""
    found = []
    for item in items:
        if isinstance(item, AfterValidator) and hasattr(item.func, "names"):
            found.append(item.func)
        else:
            found += _name_checks(typing.get_args(item))
    return found


def _extension_points() -> list[str]:
    """Every field whose value names an entry of a table: its dotted key and the names allowed."""
    rows = ["| key | table | allowed names |", "|---|---|---|"]
    for path, cls in _sections(Recipe):
        for name, field in cls.model_fields.items():
            for check in _name_checks([field.annotation, *field.metadata]):
                names = ", ".join(f"`{n}`" for n in check.names())
                key = f"{path}.{name}" if path else name
                rows.append(f"| `{key}` | {_cell(check.what)} | {_cell(names)} |")
    return rows


def header_sentence(path: Path) -> str:
    """The first sentence of a recipe file's header comment (its leading `#` lines)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(" ".join(lines).split())
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""


def _recipes() -> list[str]:
    rows = ["| recipe | what it is for |", "|---|---|"]
    for path in sorted(RECIPES.glob("*.yaml")):
        rows.append(f"| `recipes/{path.name}` | {_cell(header_sentence(path))} |")
    return rows


def reference() -> str:
    """docs/recipes.md: the complete recipe reference, as Markdown."""
    out = ["# Recipe reference", "",
           "Generated from the recipe's schema (`compress/recipe/schema.py`) by "
           "`python -m compress.recipe.reference --write docs/recipes.md`: edit the schema's field descriptions, "
           "not this file.", "",
           "A recipe is one YAML file of sections (`python compress.py --recipe R.yaml`); `--set section.key=value` "
           "overrides any key. It is validated once, before anything runs, against every value a stage will use: "
           "UTF-8 text, no key given twice, no unknown key (the closest valid one is suggested), no non-finite "
           "number, every value in its range and consistent with the others. `--dry-run` prints the recipe as the "
           "run resolves it and the stage plan.", "",
           "## Recipes in `recipes/`", "", *_recipes(), "",
           "## Extension points", "",
           "Keys whose values name an entry of a table; registering an entry in the table makes its name valid.", "",
           *_extension_points()]
    for path, cls in _sections(Recipe):
        out += ["", f"## `{path}`" if path else "## Top level", ""]
        doc = " ".join((cls.__doc__ or "").split())
        if doc and cls is not Recipe:
            out += [doc, ""]
        out += _rows(cls)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compress.recipe.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", type=Path, metavar="PATH", help="write it to PATH (docs/recipes.md) instead of printing")
    args = ap.parse_args(argv)
    text = reference()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    from compress.files import write_text

    write_text(args.write, text)
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
