"""The recipe: one YAML file, validated once at the door (`load`), its sections (`schema`), its errors (`errors`).
Stages translate sections into the typed options of the algorithms they call; nothing below the stages reads a
recipe."""

from .errors import RecipeError
from .load import load_recipe, validate_recipe
from .schema import (
    ARTIFACT_NAMES,
    BenchCfg,
    DataCfg,
    Distill,
    DistributedCfg,
    ExportCfg,
    FinetuneCfg,
    LatencyCfg,
    ModelCfg,
    OptimCfg,
    PruneCfg,
    QuantCfg,
    Recipe,
    Section,
    StudyCfg,
    TrainCfg,
)

__all__ = ["ARTIFACT_NAMES", "BenchCfg", "DataCfg", "Distill", "DistributedCfg", "ExportCfg", "FinetuneCfg", "LatencyCfg",
           "ModelCfg", "OptimCfg", "PruneCfg", "QuantCfg", "Recipe", "RecipeError", "Section", "StudyCfg", "TrainCfg",
           "load_recipe", "validate_recipe"]
