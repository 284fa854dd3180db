"""The recipe: one YAML file, validated once at the door. Unknown keys are errors, never silently ignored."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from repvgg import CONFIGS

STAGES = ("train", "reparam", "prune", "finetune", "quantize", "export", "bench")


class RecipeError(ValueError):
    """A recipe problem, said in one line that names the culprit."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCfg(Section):
    name: str | None = None
    num_blocks: list[int] | None = None
    width_multiplier: list[float] | None = None
    widths: list[int] | None = None  # 5 stage widths instead of width_multiplier (narrowed models)
    override_groups_map: dict[int, int] | None = None
    num_classes: int | None = Field(None, gt=0)  # None: taken from the data
    stem_stride: Literal[1, 2] = 2
    checkpoint: Path | None = None  # ours or an official one (training- or inference-time)

    @model_validator(mode="after")
    def _one_architecture(self):
        if self.width_multiplier is not None and self.widths is not None:
            raise ValueError("model: give width_multiplier or widths, not both")
        explicit = self.num_blocks is not None or self.width_multiplier is not None or self.widths is not None
        if explicit and (self.num_blocks is None or (self.width_multiplier is None and self.widths is None)):
            raise ValueError("model: explicit architecture needs num_blocks and width_multiplier (or widths)")
        if explicit:
            self.name = None
        elif self.name is None:
            if self.checkpoint is None:
                raise ValueError("model: give a name, num_blocks + width_multiplier, or a checkpoint")
        elif self.name not in CONFIGS and f"RepVGG-{self.name}" not in CONFIGS:
            raise ValueError(f"model.name: unknown model '{self.name}'; valid names: {', '.join(CONFIGS)}")
        return self


class DataCfg(Section):
    kind: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: Path | None = None
    image_size: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)  # per process
    workers: int = Field(0, ge=0)
    augment: Literal["none", "cifar", "imagenet"] = "cifar"
    download: bool = False  # cifar10 python batches only
    train_subset: int | None = Field(None, gt=0)  # first N of a fixed shuffled order: CPU-affordable runs
    test_subset: int | None = Field(None, gt=0)
    bad_images: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _root_needed(self):
        if self.kind != "digits" and self.root is None:
            raise ValueError(f"data.root: required for data.kind={self.kind}")
        return self


class Distill(Section):
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KL term; 1 - alpha on cross-entropy
    temperature: float = Field(4.0, gt=0)


class OptimCfg(Section):
    epochs: int = Field(10, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)  # conv and linear weights only, as the official recipe
    warmup_epochs: float = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only


class TrainCfg(OptimCfg):
    pass


class FinetuneCfg(OptimCfg):
    epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0)
    distill: Distill | None = None
    insert_bn: bool = True  # temporary BN after each plain conv, folded back afterwards


class PruneCfg(Section):
    mode: Literal["plain", "multibranch"] = "plain"
    importance: Literal["l1", "l2", "taylor", "hessian", "lamp", "random"] = "l2"
    scope: Literal["local", "global"] = "global"
    keep_macs: float | None = Field(0.5, gt=0, lt=1)
    channel_ratio: float | None = Field(None, gt=0, lt=1)  # fraction of channels removed per layer
    max_layer_ratio: float = Field(0.8, gt=0, lt=1)
    isomorphic: bool = False
    round_to: int | None = Field(None, gt=0)  # None: 16 on CPU, 8 on CUDA
    steps: int = Field(1, gt=0)  # iterative pruning, fine-tuning between steps
    steps_finetune_epochs: int = Field(1, ge=0)
    prune_first_layer: bool = False
    gradient_batches: int = Field(4, gt=0)  # taylor / hessian

    @model_validator(mode="after")
    def _one_target(self):
        if (self.keep_macs is None) == (self.channel_ratio is None):
            raise ValueError("prune: give exactly one of keep_macs or channel_ratio")
        return self


class QuantCfg(Section):
    mode: Literal["qat", "ptq"] = "qat"
    calibration_size: int = Field(256, gt=0)
    epochs: int = Field(1, ge=0)  # QAT only
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    distill: Distill | None = None
    fp32_first_last: bool = False  # keep the first conv and the head in FP32
    # NNCF's overflow fix: weights on 7 bits, so INT8 kernels without VNNI (AVX2 pmaddubsw) cannot saturate
    overflow_fix: Literal["enable", "first_layer_only", "disable"] = "enable"


ARTIFACT_NAMES = ("train_fp32", "plain_fp32", "plain_int8", "pruned_fp32", "pruned_int8")


class ExportCfg(Section):
    opset: int = Field(17, ge=17)
    artifacts: list[Literal[ARTIFACT_NAMES]] | None = None  # None: every model the run produced


class BenchCfg(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [8])
    main_batch: int | None = None  # the batch size of the accuracy-latency curve; default the first
    threads: int | None = Field(None, gt=0)  # None: all cores
    warmup: int = Field(10, ge=0)
    iters: int = Field(20, gt=0)
    rounds: int = Field(3, gt=0)
    providers: list[Literal["cpu", "cuda", "tensorrt", "torch"]] | None = None  # None: all available
    image_size: int | None = Field(None, gt=0)  # None: data.image_size


class StudyCfg(Section):
    """Sweep keep_macs over pruning strategies; each point fine-tuned, QAT-quantized, exported and benchmarked."""

    keep_macs: list[float] = Field(default_factory=lambda: [0.7, 0.5, 0.3])
    strategies: list[Literal["plain", "plain-uniform", "multibranch", "scratch"]] = Field(
        default_factory=lambda: ["plain", "plain-uniform", "multibranch", "scratch"]
    )

    @model_validator(mode="after")
    def _fractions(self):
        for k in self.keep_macs:
            if not 0 < k < 1:
                raise ValueError(f"study.keep_macs: {k} is not in (0, 1)")
        return self


class Recipe(Section):
    name: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    prune: PruneCfg = Field(default_factory=PruneCfg)
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg)
    quantize: QuantCfg = Field(default_factory=QuantCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    bench: BenchCfg = Field(default_factory=BenchCfg)
    study: StudyCfg | None = None  # present: the recipe runs the study instead of one pipeline

    @model_validator(mode="after")
    def _known_stages(self):
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"stages: unknown stage '{stage}'{_suggest(stage, STAGES)}")
        self.stages = [s for s in STAGES if s in self.stages]  # always run in pipeline order
        return self

    def section_hash(self, *sections: str) -> str:
        """Hash of the recipe parts a stage depends on: a changed input means a recomputed stage."""
        blob = json.dumps([self.seed, *(getattr(self, s).model_dump(mode="json") for s in sections)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _first_error(err: ValidationError, cls: type[BaseModel]) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = cls
        for part in e["loc"][:-1]:
            field = section.model_fields.get(str(part))
            section = field.annotation if field is not None and isinstance(field.annotation, type) else section
        return f"unknown recipe key '{loc}'{_suggest(str(e['loc'][-1]), section.model_fields)}"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if msg.split(":")[0].startswith(loc) else f"recipe key '{loc}': {msg} (got {e.get('input')!r})"


def _apply_override(raw: dict, assignment: str) -> None:
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


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
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
    for assignment in overrides:
        _apply_override(raw, assignment)
    return validate_recipe(raw)


def validate_recipe(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_first_error(e, Recipe)) from None
