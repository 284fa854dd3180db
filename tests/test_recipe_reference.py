"""docs/recipes.md is generated from the recipe's schema (`python -m compress.recipe.reference --write
docs/recipes.md`): the committed file is what the command writes, every key is documented, every extension point
lists its table's names, and every shipped recipe is in its table."""

from conftest import ROOT

from compress.prune import IMPORTANCES
from compress.recipe.errors import section_of
from compress.recipe.reference import header_sentence, main, reference
from compress.recipe.schema import Recipe
from compress.runtime import RUNTIMES
from compress.study.strategies import STRATEGIES


def test_committed_reference_is_what_the_command_generates(tmp_path):
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == reference(), "docs/recipes.md is stale: python -m compress.recipe.reference --write docs/recipes.md"
    assert main(["--write", str(tmp_path / "recipes.md")]) == 0
    assert (tmp_path / "recipes.md").read_text() == committed


def _fields(cls, path=""):
    for name, field in cls.model_fields.items():
        key = f"{path}.{name}" if path else name
        yield key, field
        section = section_of(field.annotation)
        if section is not None:
            yield from _fields(section, key)


def test_every_key_has_a_description_and_a_row():
    text = reference()
    for key, field in _fields(Recipe):
        assert field.description, f"{key} has no description"
        assert f"| `{key.rsplit('.', 1)[-1]}` |" in text


def test_extension_points_list_their_tables_names():
    rows = {line.split("|")[1].strip(): line for line in reference().splitlines() if line.startswith("| `")}
    assert all(f"`{name}`" in rows["`prune.importance`"] for name in IMPORTANCES)
    assert "`sensitivity`" in rows["`prune.importance`"]
    assert all(f"`{name}`" in rows["`study.strategies`"] for name in STRATEGIES)
    assert all(f"`{name}`" in rows["`bench.providers`"] for name in RUNTIMES)
    assert "`auto`" in rows["`prune.latency.provider`"] and "`torch`" not in rows["`prune.latency.provider`"]
    assert "`space_to_depth`" in rows["`export.stem`"] and "`fp32`" not in rows["`export.stem_fp32`"]


def test_every_shipped_recipe_is_in_the_table_with_its_first_sentence():
    text = reference()
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        sentence = header_sentence(path)
        assert sentence.endswith(".") and len(sentence) < 200, path.name
        assert f"| `recipes/{path.name}` | {sentence} |" in text
