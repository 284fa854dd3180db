"""The recipe's allowed names for each extension point come from that point's table: a criterion or a study
strategy registered in its table (here, in the test only) is accepted by name, and an unknown name is one line that
lists the table's names."""

import dataclasses

import pytest

from compress.prune import IMPORTANCES
from compress.recipe import RecipeError, validate_recipe
from compress.study.points import pruned_recipe
from compress.study.strategies import STRATEGIES

A0 = {"name": "r", "model": {"name": "RepVGG-A0"}}


def test_a_registered_criterion_is_a_valid_prune_importance(monkeypatch):
    monkeypatch.setitem(IMPORTANCES, "l2-copy", IMPORTANCES["l2"])
    assert validate_recipe({**A0, "prune": {"importance": "l2-copy"}}).prune.importance == "l2-copy"
    with pytest.raises(RecipeError) as err:
        validate_recipe({**A0, "prune": {"importance": "lamb"}})
    assert str(err.value).startswith("recipe key 'prune.importance': unknown criterion 'lamb' (did you mean 'lamp'?)")
    assert "valid: l1, l2, taylor, sensitivity, hessian, lamp, random, l2-copy" in str(err.value)


def test_a_registered_strategy_is_a_study_strategy_with_its_own_settings(monkeypatch):
    record = dataclasses.replace(STRATEGIES["plain"], prune={"scope": "local", "min_width": 24}, structure="plain")
    monkeypatch.setitem(STRATEGIES, "plain-floor", record)
    recipe = validate_recipe({**A0, "study": {"strategies": ["plain", "plain-floor"]}})
    assert recipe.study.strategies == ["plain", "plain-floor"]
    point = pruned_recipe(recipe, "plain-floor", 0.4)
    assert (point.prune.keep_macs, point.prune.scope, point.prune.min_width) == (0.4, "local", 24)
    assert point.finetune.structure == "plain" and point.study is None
    with pytest.raises(RecipeError, match="unknown strategy 'plane'"):
        validate_recipe({**A0, "study": {"strategies": ["plane"]}})


@pytest.mark.parametrize("strategy,expect", [
    ("plain", {"mode": "plain", "scope": "global", "keep_macs": 0.5, "keep_latency": None, "structure": "bn"}),
    ("plain-uniform", {"mode": "plain", "scope": "local", "keep_macs": 0.5, "keep_latency": None, "structure": "bn"}),
    ("plain-latency", {"mode": "plain", "scope": "global", "keep_macs": None, "keep_latency": 0.5, "structure": "bn"}),
    ("plain-rebranch", {"mode": "plain", "scope": "global", "keep_macs": 0.5, "keep_latency": None,
                        "structure": "rebranch"}),
    ("multibranch", {"mode": "multibranch", "scope": "global", "keep_macs": 0.5, "keep_latency": None,
                     "structure": "plain"}),
])
def test_each_strategy_record_makes_its_points_recipe(strategy, expect):
    recipe = validate_recipe({**A0, "finetune": {"structure": "rebranch"}, "study": {}})
    point = pruned_recipe(recipe, strategy, 0.5)
    got = {"mode": point.prune.mode, "scope": point.prune.scope, "keep_macs": point.prune.keep_macs,
           "keep_latency": point.prune.keep_latency, "structure": point.finetune.structure}
    assert got == expect
    if strategy == "plain-latency":  # the study's latency points: FP32 at batch 8, the recipe's other settings kept
        assert (point.prune.latency.precision, point.prune.latency.batch) == ("fp32", 8)
