"""The recipe's sections: what each key means, its default and its checks. Validated once, at the door
(`compress.recipe.load`), against every value a stage will use: a recipe that validates runs. Unknown keys are
errors, never silently ignored; non-finite numbers are refused everywhere. Each field's `description` is its
documentation (`python -m compress.recipe.reference` writes docs/recipes.md from them). The allowed names of
extension points (importance criteria, runtimes, study strategies, stages, stem rewrites) come from their tables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

import torch.onnx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from compress.deploy import TARGET_DEVICES, overflow_fix_for, resolve_target
from compress.keys import EVALUATION, KEYED_WHEN_SET, NO_EFFECT, ROLE_WEIGHTS, role_of
from compress.prune import IMPORTANCES, TARGET_KINDS, Target, default_round_to
from compress.registry import STAGE_NAMES, STAGES
from compress.runtime import RUNTIMES
from compress.stem import FP32_STEM_REWRITES, STEM_REWRITES
from compress.study.strategies import STRATEGIES
from compress.timing import BENCH, LATENCY_TABLE
from compress.train_device import (
    PRECISIONS,
    QAT_AUTO_PRECISION,
    block_convs,
    cpu_bf16_hazard,
    resolve_channels_last,
    resolve_precision,
)
from repvgg import CONFIGS
from repvgg.model import block_specs, stage_widths

from .errors import RecipeError, suggest

# Epoch e of a run seeded s shuffles and augments with torch seed s * 1000 + e (`compress.data.Data.train_loader`):
# past 1000 epochs a run would repeat the shuffles of seed s + 1, so 1000 is the most epochs a stage trains.
MAX_EPOCHS = 1000
# torch's generators take seeds up to 2^64 - 1, and the data loader's epoch seeds (above) are seed * 1000 + epoch
MAX_SEED = (2**64 - MAX_EPOCHS) // MAX_EPOCHS
# channels of one layer: beyond this a single 3x3 conv's weights alone take gigabytes (the widest published
# RepVGG, B3, ends at 2560)
MAX_WIDTH = 8192
MAX_BLOCKS = 64  # blocks of one stage (the published models have at most 16)
MAX_CLASSES = 100_000  # a larger head than this is a typo, not a dataset (ImageNet-21k has 21,841 classes)
MAX_IMAGE_SIZE = 4096  # one image's activations at this size already take gigabytes in the first stages
# the TorchScript ONNX exporter the export stage runs writes opsets up to this one (torch's own bound)
MAX_OPSET = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
# a process-group timeout: torch keeps it in milliseconds, and a year is already "never" for a run
MAX_TIMEOUT_S = 365 * 24 * 3600.0
# Counts that reach C APIs or loops: thread counts go to ONNX Runtime and torch as C ints, batch sizes allocate
# their tensors at once, and a timing loop or table grid must finish; each bound is far beyond any useful value.
MAX_THREADS = 1024
MAX_WORKERS = 256
MAX_BATCH = 65_536
MAX_TIMED_CALLS = 100_000  # bench warm-up and timed calls per file and round, and rounds
MAX_GRID = 64  # measured widths per axis of a latency table or a sensitivity curve
MAX_STEPS = 100  # iterative pruning steps, latency re-plans, study seeds
MAX_IMAGES = 1_000_000_000  # a count of images beyond any dataset (ImageNet-21k has 14 M)
# Images at most this many pixels square (augmented as cifar or not at all) are held in memory as uint8 tensors and
# batched in the training process (`DataCfg.tensor_batches`): CIFAR-10 takes 184 MB at 32 px, and per-image
# DataLoader work costs more than the model's step at such sizes. TENSOR_BATCHES names those batches in the keys.
TENSOR_BATCH_MAX_SIZE = 64
TENSOR_BATCHES = "tensor_v1"


def one_of(table: Mapping[str, object], what: str, fits: Callable[[object], bool] = lambda entry: True,
           also: tuple[str, ...] = ()) -> AfterValidator:
    """A validator: the value is the name of an entry of `table` that `fits`, or one of `also` (the table is read
    when validating, so an entry registered later counts). The validator's `names()` lists them (the reference)."""

    def names() -> list[str]:
        return [*also, *(key for key, entry in table.items() if fits(entry))]

    def check(name: str) -> str:
        valid = names()
        if name not in valid:
            raise ValueError(f"unknown {what} '{name}'{suggest(name, valid)}; valid: {', '.join(valid)}")
        return name

    check.names, check.what = names, what
    return AfterValidator(check)


def _distinct(values: list | None) -> list | None:
    if values is not None and len(set(values)) != len(values):
        repeated = next(v for v in values if values.count(v) > 1)
        raise ValueError(f"{repeated!r} is given twice")
    return values


Distinct = AfterValidator(_distinct)


def _usable_path(path: Path) -> Path:
    if "\x00" in str(path):
        raise ValueError("a path cannot hold a NUL character")
    return path


FilePath = Annotated[Path, AfterValidator(_usable_path)]  # a path the operating system can take
ImageCount = Annotated[int, Field(gt=0, le=MAX_IMAGES)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    # non-finite numbers are refused everywhere: no setting means anything at nan or inf
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # evaluation subsets drawn by `compress.data.stratified_indices`: set, their key names that sampling, so that
    # scores of other images are not reused; unset (all images), the key holds nothing more
    _stratified: tuple[str, ...] = ()

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """This section's values that change `role` (`compress.keys`), for the run directory's keys."""
        values = self.model_dump(mode="json")
        unset = [name for name, field in type(self).model_fields.items()
                 if values[name] is None and (field.json_schema_extra or {}).get("when_set")]
        out = {name: values[name] for name, field in type(self).model_fields.items()
               if role_of(field) == role and name not in unset}
        for name, value in out.items():  # a nested section (prune.latency) keys its unset when_set fields alike
            nested = getattr(self, name)
            if isinstance(nested, Section):
                out[name] = {k: v for k, v in value.items() if v is not None
                             or not (type(nested).model_fields[k].json_schema_extra or {}).get("when_set")}
        for name in self._stratified:
            if name in out and out[name] is not None:
                out[f"{name}_sampling"] = "stratified_sklearn"
        return out


class ModelCfg(Section):
    """The starting model: a named RepVGG, explicit depths and widths, a checkpoint, or timm's pretrained weights."""

    name: str | None = Field(None, description=f"a published RepVGG ({', '.join(CONFIGS)}; the 'RepVGG-' prefix "
                                               "may be left out); ignored when num_blocks is given")
    num_blocks: list[Annotated[int, Field(gt=0, le=MAX_BLOCKS)]] | None = Field(
        None, description="blocks of stages 1-4 (4 values), with width_multiplier or widths: an explicit architecture")
    width_multiplier: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="(a, a, a, b) of the paper: stage widths min(64, 64a), 64a, 128a, 256a, 512b (4 values)")
    widths: list[Annotated[int, Field(gt=0, le=MAX_WIDTH)]] | None = Field(
        None, description="the 5 stage widths instead of width_multiplier (narrowed models)")
    override_groups_map: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(gt=0, le=MAX_WIDTH)]] | None = Field(
        None, description="block index (counted from 1 after stage0) -> groups of its 3x3 conv; the groups must "
                          "divide the block's input and output widths")
    num_classes: int | None = Field(None, gt=0, le=MAX_CLASSES, description="the head's classes; None: the data's")
    stem_stride: Literal[1, 2] = Field(2, description="stride of stage0 (1 keeps a 32x32 input's resolution, as CIFAR "
                                                      "variants of RepVGG do)")
    checkpoint: FilePath | None = Field(None, description="start from this file: ours, official or timm's (training- or "
                                                      "deploy-form; .pth or .safetensors)")
    pretrained: Literal["timm"] | None = Field(None, description="timm's pretrained weights for model.name, through "
                                                                 "timm's cache")

    @model_validator(mode="after")
    def _one_architecture(self):
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("model: give pretrained or checkpoint, not both")
        if self.pretrained is not None and self.name is None:
            raise ValueError("model.pretrained: needs model.name (the RepVGG whose timm weights to load)")
        if self.width_multiplier is not None and self.widths is not None:
            raise ValueError("model: give width_multiplier or widths, not both")
        explicit = self.num_blocks is not None or self.width_multiplier is not None or self.widths is not None
        if explicit and (self.num_blocks is None or (self.width_multiplier is None and self.widths is None)):
            raise ValueError("model: explicit architecture needs num_blocks and width_multiplier (or widths)")
        if explicit:
            self.name = None
            self._check_explicit()
        elif self.name is None:
            if self.checkpoint is None:
                raise ValueError("model: give a name, num_blocks + width_multiplier, or a checkpoint")
        elif self.name not in CONFIGS and f"RepVGG-{self.name}" not in CONFIGS:
            raise ValueError(f"model.name: unknown model '{self.name}'{suggest(self.name, CONFIGS)}; "
                             f"valid names: {', '.join(CONFIGS)}")
        return self

    def _check_explicit(self) -> None:
        """The explicit architecture through the checks the model's constructor runs (`repvgg.model.block_specs`):
        what validates here builds."""
        if len(self.num_blocks) != 4:
            raise ValueError(f"model.num_blocks: needs 4 values (blocks of stages 1-4), got {self.num_blocks}")
        if self.width_multiplier is not None and len(self.width_multiplier) != 4:
            raise ValueError(f"model.width_multiplier: needs 4 values (a, a, a, b), got {self.width_multiplier}")
        if self.widths is not None and len(self.widths) != 5:
            raise ValueError(f"model.widths: needs 5 values (stages 0-4), got {self.widths}")
        widths = self.widths or stage_widths(self.width_multiplier)
        where = "model.widths" if self.widths else "model.width_multiplier"
        if any(w <= 0 for w in widths):
            raise ValueError(f"{where}: makes stage widths {widths}; every one must be at least 1 channel")
        if max(widths) > MAX_WIDTH:
            raise ValueError(f"{where}: makes stage widths {widths}; at most {MAX_WIDTH} channels a layer")
        layers = 1 + sum(self.num_blocks)
        for block in self.override_groups_map or {}:
            if block >= layers:
                raise ValueError(f"model.override_groups_map: block {block} is past the model's last block "
                                 f"({layers - 1})")
        try:
            block_specs(self.num_blocks, widths, self.override_groups_map, self.stem_stride)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None


class DataCfg(Section):
    """The dataset and how it is read."""

    _stratified = ("test_subset",)
    kind: Literal["digits", "imagefolder", "cifar10"] = Field(
        "digits", description="digits: scikit-learn's embedded 8x8 digits, upsampled (no download); imagefolder: "
                              "train/ and val/ (or test/) class folders under root; cifar10: torchvision's python "
                              "batches under root")
    root: FilePath | None = Field(None, description="the dataset's folder (imagefolder, cifar10), relative to the working "
                                                "directory; run keys hash its resolved path, so a link and its "
                                                "target share runs")
    image_size: int = Field(32, gt=0, le=MAX_IMAGE_SIZE, description="input height and width")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="per process (under torchrun, the global batch is this x ranks)")
    workers: int = Field(0, ge=0, le=MAX_WORKERS, json_schema_extra=NO_EFFECT,
                         description="DataLoader worker processes. An ImageFolder or CIFAR-10 of at most 64 px, "
                                     "augmented as cifar or none, is held in memory and its training batches are made "
                                     "in the training process, without workers: there, workers only decode an "
                                     "ImageFolder too large for memory (over 4 GiB decoded)")
    augment: Literal["none", "cifar", "imagenet"] = Field(
        "cifar", description="training augmentation: none, cifar (random crop with 4-pixel padding, flip) or imagenet "
                             "(random resized crop, flip)")
    download: bool = Field(False, json_schema_extra=NO_EFFECT, description="fetch CIFAR-10's python batches into "
                                                                           "root when missing (kind cifar10 only)")
    train_subset: int | None = Field(None, gt=0, le=MAX_IMAGES, description="train on the first N images of a fixed shuffled order "
                                                             "(CPU-affordable runs); None: all")
    test_subset: int | None = Field(None, gt=0, le=MAX_IMAGES, json_schema_extra=EVALUATION,
                                    description="evaluate on a stratified sample of N test images (seed 0, the same "
                                                "for every run); None: all")
    bad_images: Literal["fail", "skip"] = Field(
        "fail", json_schema_extra=NO_EFFECT,
        description="an undecodable image stops the run with its path (fail) or is skipped and counted (skip); a run "
                    "under fail only finishes without bad images, where skip trains on the same data")
    cache_dir: FilePath | None = Field(
        None, json_schema_extra=NO_EFFECT,
        description="where an ImageFolder held in memory (see workers) is cached once decoded, for later runs; "
                    "None: $XDG_CACHE_HOME/repvgg-compress/data, else ~/.cache/repvgg-compress/data")

    @property
    def tensor_batches(self) -> bool:
        """Whether training batches are cut and augmented as tensors in the training process (`compress.data`): an
        ImageFolder or CIFAR-10 at most TENSOR_BATCH_MAX_SIZE pixels square, augmented as cifar or not at all. The
        digits keep their DataLoader batches."""
        return (self.kind in ("imagefolder", "cifar10") and self.image_size <= TENSOR_BATCH_MAX_SIZE
                and self.augment in ("cifar", "none"))

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """As `Section.key_values`; under tensor batches the weight keys also name them (`batches`), since their
        shuffles and crops differ from the DataLoader's: runs trained on the DataLoader's batches are not reused."""
        values = super().key_values(role)
        if role == ROLE_WEIGHTS and self.tensor_batches:
            values["batches"] = TENSOR_BATCHES
        return values

    @model_validator(mode="after")
    def _root_needed(self):
        if self.kind != "digits" and self.root is None:
            raise ValueError(f"data.root: required for data.kind={self.kind}")
        return self


class Distill(Section):
    """Knowledge distillation from a teacher model."""

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1 - alpha on the cross-entropy")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of both models' logits")


def _refuse_amp(data):
    """A section's `amp` (a boolean that meant FP16 autocast on CUDA only) is refused, naming what replaced it."""
    if isinstance(data, dict) and "amp" in data:
        raise ValueError("amp: replaced by precision (auto | fp32 | bf16 | fp16); auto picks BF16 or FP16 autocast "
                         "where the device computes it natively, fp32 turns autocast off")
    return data


class OptimCfg(Section):
    """An optimisation schedule (train, finetune)."""

    epochs: int = Field(10, ge=0, le=MAX_EPOCHS, description=f"passes over the training data (at most {MAX_EPOCHS}: "
                                                             "epoch seeds are seed x 1000 + epoch)")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (with momentum) or adamw")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="on conv and linear weights only, as the official recipe")
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up to lr over this many epochs (at most epochs)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine decay to 0, or "
                                                                          "constant")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    precision: Literal[PRECISIONS] = Field(
        "auto", description="autocast precision of the forward and backward passes: auto (bf16 on CPUs with "
                            "AVX512-BF16 or AMX, unless a stride-2 conv meets a 1x1 map, and on CUDA with BF16; fp16 "
                            "with loss scaling on older CUDA; else fp32; resolved at the door), fp32, bf16 or fp16 "
                            "(docs/training.md)")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last memory format; auto: on CUDA and on CPUs with AVX-512 (resolved at the "
                            "door)")
    compile: bool = Field(False, description="train through torch.compile (a compilation at each start; off, with a "
                                             "warning, where the compiler toolchain is missing)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the weights "
                                                                  "and buffers with this decay per step, evaluated "
                                                                  "each epoch; the stage's model is the average")

    @model_validator(mode="before")
    @classmethod
    def _amp_renamed(cls, data):
        return _refuse_amp(data)

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        if self.epochs > 0 and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs: {self.warmup_epochs:g} is more than epochs={self.epochs} (the learning "
                             f"rate would never reach lr)")
        return self


class TrainCfg(OptimCfg):
    """Training the multi-branch model (stage train)."""

    distill: Distill | None = Field(None, description="distil from a trained model of ours (`teacher`)")
    teacher: FilePath | None = Field(None, description="a model file this tool wrote (a run's plain.pt, say): the "
                                                   "teacher of `distill`")

    @model_validator(mode="after")
    def _teacher_with_distill(self):
        if (self.distill is None) != (self.teacher is None):
            raise ValueError("train: distill and teacher go together (the teacher is the model file to distil from)")
        return self


class FinetuneCfg(OptimCfg):
    """Fine-tuning the pruned model (stage finetune, and prune's fine-tunes between iterative steps)."""

    epochs: int = Field(5, ge=0, le=MAX_EPOCHS, description="passes over the training data")
    lr: float = Field(0.01, gt=0, description="peak learning rate")
    distill: Distill | None = Field(None, description="distil from the unpruned plain model")
    structure: Literal["plain", "bn", "rebranch"] = Field(
        "bn", description="how a pruned plain model trains: as it is (plain), with a temporary BN after each conv, "
                          "folded back after (bn), or re-branched into RepVGG blocks at its pruned widths, "
                          "re-parameterized back after, exactly (rebranch); docs/pruning.md compares them")
    train_subset: int | None = Field(None, gt=0, le=MAX_IMAGES, description="fine-tune on the first N training images (fixed order); "
                                                             "None: all")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, json_schema_extra=KEYED_WHEN_SET,
                            description="the fine-tune's own seed (its shuffles, training subset and calibration "
                                        "images; prune's fine-tunes between steps too), so that one base yields "
                                        "several fine-tunes (`study.seeds`); None: the recipe's seed")

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """As `Section.key_values`; the keys of a `bn` or `rebranch` fine-tune also name how its BNs start (the conv
        divided by the root of its output std), so fine-tunes whose BNs started otherwise are not reused."""
        values = super().key_values(role)
        if role == ROLE_WEIGHTS and self.structure in ("bn", "rebranch"):
            values["bn_init"] = "conv_over_root_std"
        return values

    @model_validator(mode="before")
    @classmethod
    def _insert_bn_renamed(cls, data):
        if isinstance(data, dict) and "insert_bn" in data:
            raise ValueError("finetune.insert_bn: replaced by finetune.structure (insert_bn: true is structure: bn, "
                             "false is structure: plain; structure: rebranch fine-tunes re-branched blocks)")
        return data


class LatencyCfg(Section):
    """How `prune.keep_latency` / `prune.target_ms` measure latency: a per-layer table timed on this machine's runtime
    (its own settings, not `bench`'s, so that changing the benchmark never recomputes the prune stage)."""

    provider: Annotated[str, one_of(RUNTIMES, "runtime of ONNX files", lambda runtime: runtime.opens == "onnx",
                                    also=("auto",))] = Field(
        "cpu", description="a runtime that runs ONNX files; auto: the one that runs the unpruned model fastest here, "
                           "in the table's precision (timed by the prune stage, recorded in its summary)")
    threads: int | None = Field(None, gt=0, le=MAX_THREADS, description="intra-op threads; None: all cores")
    batch: int = Field(8, gt=0, le=MAX_BATCH, description="batch size the table is timed at")
    precision: Literal["fp32", "int8"] = Field("fp32", description="int8: QDQ layers, as the quantize and export "
                                                                   "stages deploy them")
    grid_points: int = Field(8, ge=2, le=MAX_GRID, description="measured widths per axis of each layer's table; bilinear in "
                                                         "between")
    rounds: int = Field(LATENCY_TABLE.rounds, gt=0, le=MAX_TIMED_CALLS, description="every model timed in this many rounds, round-robin; its fastest call kept")
    verify: int = Field(3, ge=0, le=MAX_STEPS, description="a plan is timed whole against the unpruned model and re-planned (budget "
                                             "scaled by the miss) until it measures within 0.02 of the target, at most "
                                             "this many times; 0: trust the table's prediction")
    cache_dir: FilePath | None = Field(None, json_schema_extra=NO_EFFECT,
                                   description="where tables are cached; None: $XDG_CACHE_HOME/repvgg-compress, else "
                                               "~/.cache/repvgg-compress")
    stem: Annotated[str, one_of(STEM_REWRITES, "stem rewrite")] | None = Field(
        None, json_schema_extra=KEYED_WHEN_SET,
        description="not a setting: the export's stem rewrite for this precision (`export.stem` / `stem_fp32`), "
                    "copied here at the door (`Recipe.resolved`) so the table times what is deployed and the prune "
                    "stage's key holds it")


class ResRepCfg(Section):
    """ResRep (`prune.method: resrep`): its training budget and its schedule, as fractions of that training's steps
    (docs/pruning.md, "ResRep")."""

    epochs: int = Field(1, gt=0, le=MAX_EPOCHS, description="its training, in epochs of the fine-tune's data "
                                                            "(finetune.train_subset) at the fine-tune's optimizer "
                                                            "settings (lr, schedule, distill, structure)")
    first_mask: float = Field(0.1, ge=0, lt=1, description="fraction of its steps before the first mask is chosen")
    mask_every: float = Field(0.05, gt=0, le=1, description="fraction of its steps between two mask choices")
    target_by: float = Field(0.5, ge=0, lt=1, description="fraction of its steps by which the masks meet the target; "
                                                          "they are held after")
    lasso: float | None = Field(None, gt=0, description="group-lasso strength on masked compactor rows; None: "
                                                        "twice the strength whose steps take a row of norm 1 to zero "
                                                        "over the steps after target_by")

    @model_validator(mode="after")
    def _ordered(self):
        if self.first_mask > self.target_by:
            raise ValueError(f"prune.resrep: first_mask ({self.first_mask:g}) is after target_by ({self.target_by:g})")
        return self


class PruneCfg(Section):
    """Pruning (stage prune): the target, the criterion, and how widths are planned."""

    method: Literal["importance", "resrep"] = Field(
        "importance", description="importance: remove the channels the criterion ranks lowest, at once; resrep: "
                                  "train compactors that the masked channels fade out of, then cut them (`resrep`)")
    resrep: ResRepCfg = Field(default_factory=ResRepCfg, description="ResRep's training and schedule "
                                                                     "(method: resrep)")
    mode: Literal["plain", "multibranch"] = Field(
        "plain", description="prune the re-parameterized plain model (plain) or the training-time multi-branch model "
                             "(multibranch, re-parameterized after fine-tuning)")
    importance: Annotated[str, one_of(IMPORTANCES, "criterion")] = Field(
        "taylor", description="the channel criterion; taylor: the squared first-order loss change of removing each "
                              "channel, comparable across layers (docs/pruning.md compares the criteria)")
    scope: Literal["local", "global"] = Field("global", description="one ratio for every layer (local), or widths "
                                                                    "planned across layers (global)")
    keep_macs: float | None = Field(None, gt=0, lt=1, description="target: fraction of the MACs kept (one of the four "
                                                                  "targets; none given means keep_macs 0.5)")
    channel_ratio: float | None = Field(None, gt=0, lt=1, description="target: fraction of channels removed per layer")
    keep_latency: float | None = Field(None, gt=0, lt=1, description="target: fraction of the unpruned plain model's "
                                                                     "measured latency (`prune.latency`)")
    target_ms: float | None = Field(None, gt=0, description="target: latency budget in milliseconds (`prune.latency`)")
    latency: LatencyCfg = Field(default_factory=LatencyCfg, description="how a latency target is measured")
    max_layer_ratio: float = Field(0.8, gt=0, lt=1, description="at most this fraction of one layer's channels removed")
    min_width: int | None = Field(None, gt=0, le=MAX_WIDTH, description="no layer narrower (channels); None: round_to")
    isomorphic: bool = Field(False, description="Torch-Pruning's isomorphic global ranking (planner: ranking)")
    round_to: int | None = Field(None, gt=0, le=MAX_WIDTH, description="widths rounded to multiples of this; None: 16 on CPU, 8 on "
                                                         "CUDA (`Recipe.resolved`)")
    steps: int = Field(1, gt=0, le=MAX_STEPS, description="iterative pruning in this many steps, fine-tuning between them")
    steps_finetune_epochs: int = Field(1, ge=0, le=MAX_EPOCHS, description="epochs of each fine-tune between steps")
    prune_first_layer: bool = Field(False, description="also prune stage0's output channels")
    gradient_batches: int = Field(4, gt=0, le=MAX_IMAGES, description="training batches the gradients of taylor / hessian / "
                                                       "sensitivity's channel order are accumulated over")
    planner: Literal["budget", "ranking"] = Field(
        "budget", description="budget: the widths that keep the most importance within the target's cost (global "
                              "scope); ranking: bisect the ratio of Torch-Pruning's global ranking")
    sensitivity_images: int = Field(2048, gt=0, le=MAX_IMAGES, description="training images (a seeded sample) sensitivity's loss "
                                                            "curves are measured on")
    sensitivity_grid: int = Field(8, ge=2, le=MAX_GRID, description="widths measured per slot by sensitivity; "
                                                              "interpolated in between")
    sensitivity_cache: FilePath | None = Field(None, json_schema_extra=NO_EFFECT,
                                           description="the file caching sensitivity's loss curves (keyed by the "
                                                       "model's weights and the settings above); None: "
                                                       "DIR/sensitivity.json")
    reconstruct: bool | None = Field(None, description="re-fit each pruned plain layer to the unpruned model's outputs "
                                                       "(least squares); None: on for mode plain, off for multibranch "
                                                       "(which has no plain layers until after fine-tuning)")
    reconstruct_images: int = Field(512, gt=0, le=MAX_IMAGES, description="training images (a seeded sample) the re-fit uses")
    reconstruct_ridge: float = Field(1e-3, ge=0, description="ridge of the re-fit, x mean(diag(X^T X)), on the "
                                                             "weights, not the bias")

    @model_validator(mode="after")
    def _one_target(self):
        given = [name for name in TARGET_KINDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"prune: {' and '.join(given)} given together: give one of {', '.join(TARGET_KINDS)}")
        if not given:
            self.keep_macs = 0.5
        if self.reconstruct is None:
            self.reconstruct = self.mode == "plain" and self.method == "importance"
        elif self.reconstruct and self.mode == "multibranch":
            raise ValueError("prune.reconstruct: re-fits plain layers; prune.mode=multibranch has none until after "
                             "fine-tuning (set it false)")
        if self.method == "resrep":
            wrong = [f"{key}={value}" for key, value, fine in (
                ("mode", self.mode, self.mode == "plain"), ("reconstruct", self.reconstruct, not self.reconstruct),
                ("steps", self.steps, self.steps == 1),
                ("channel_ratio", self.channel_ratio, self.channel_ratio is None),
            ) if not fine]
            if wrong:
                raise ValueError(f"prune.method=resrep trains compactors on the plain model to a cost target: "
                                 f"{', '.join('prune.' + w for w in wrong)} does not go with it")
        return self

    @property
    def target(self) -> Target:
        """The target in force: the one of the four given (keep_macs 0.5 when none is)."""
        kind = next(name for name in TARGET_KINDS if getattr(self, name) is not None)
        return Target(kind, getattr(self, kind))

    @property
    def trains(self) -> bool:
        """Iterative pruning fine-tunes between its steps, and ResRep trains (`registry`: every rank then prunes)."""
        return self.steps > 1 or self.method == "resrep"

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """As `Section.key_values`, with the `latency` settings' own roles (its cache_dir changes nothing), and
        without them unless a latency target is in force (they change nothing else); likewise the sensitivity
        settings without the sensitivity criterion and the reconstruction's without reconstruction."""
        values = super().key_values(role)
        values.pop("latency", None)
        values.pop("resrep", None)
        if self.method == "importance":  # as every prune keyed before ResRep existed: their keys stay valid
            values.pop("method", None)
        elif self.resrep.key_values(role):
            values["resrep"] = self.resrep.key_values(role)
        nested = self.latency.key_values(role)
        if self.target.latency and nested:
            values["latency"] = nested
        unused = [*(("sensitivity_images", "sensitivity_grid") if self.importance != "sensitivity" else ()),
                  *(("reconstruct_images", "reconstruct_ridge") if not self.reconstruct else ())]
        for name in unused:  # settings of what this prune does not run change nothing
            values.pop(name, None)
        return values


class QuantCfg(Section):
    """INT8 quantization with NNCF (stage quantize): PTQ, or PTQ then QAT."""

    mode: Literal["qat", "ptq"] = Field("qat", description="ptq: calibration only; qat: calibration, then training "
                                                           "with fake quantization")
    calibration_size: int = Field(256, gt=0, le=MAX_IMAGES, description="training images (test-time transforms) the activation "
                                                         "ranges are calibrated on")
    epochs: int = Field(1, ge=0, le=MAX_EPOCHS, description="QAT epochs (mode qat)")
    lr: float = Field(1e-4, gt=0, description="QAT's learning rate; docs/int8.md gives the evidence for the default")
    weight_decay: float = Field(0.0, ge=0, description="QAT's weight decay")
    distill: Distill | None = Field(None, description="QAT distilled from the model's own FP32 weights")
    fp32_first_last: bool = Field(False, description="keep the first conv and the head in FP32")
    train_subset: int | None = Field(None, gt=0, le=MAX_IMAGES, description="QAT on the first N training images (fixed order); None: "
                                                             "all")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="QAT's optimizer (with weight_decay 0, adamw is Adam)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, json_schema_extra=KEYED_WHEN_SET,
                            description="QAT's and calibration's own seed (its shuffles, training subset, calibration "
                                        "images); None: the recipe's seed")
    activation_ranges: Literal["mean_minmax", "minmax", "mean_quantile", "histogram"] = Field(
        "mean_minmax", description="per-tensor activation ranges from the calibration images: a sample is one "
                                   "calibration batch with batchwise_statistics, else one image")
    batchwise_statistics: bool = Field(True, description="calibration statistics per batch (true) or per image")
    target_device: Literal[("auto", *TARGET_DEVICES)] = Field(
        "auto", description="where the INT8 model will run (`compress.deploy`); auto: this machine, resolved at the "
                            "door (`Recipe.resolved`)")
    overflow_fix: Literal["auto", "enable", "first_layer_only", "disable"] = Field(
        "auto", description="NNCF's overflow fix: weights on 7 bits, so INT8 kernels without VNNI (AVX2 pmaddubsw) "
                            "cannot saturate; auto: enable for cpu-avx2, disable for VNNI/AMX CPUs and GPUs")

    precision: Literal[PRECISIONS] = Field(
        "auto", description="QAT's autocast precision; auto is fp32: under autocast NNCF's activation quantizers "
                            "round in BF16/FP16, off the INT8 grid the exported file uses (docs/training.md)")
    channels_last: bool | Literal["auto"] = Field("auto", description="QAT's memory format, as train.channels_last")

    @model_validator(mode="before")
    @classmethod
    def _amp_renamed(cls, data):
        return _refuse_amp(data)

    @property
    def trains(self) -> bool:
        """QAT trains (`registry`: every rank then runs the stage); PTQ has nothing to train."""
        return self.mode == "qat"


ARTIFACT_NAMES = ("train_fp32", "plain_fp32", "plain_int8", "pruned_fp32", "pruned_int8")


class ExportCfg(Section):
    """ONNX export (stage export): which models, their checks, and their stem rewrites."""

    _stratified = ("eval_subset", "parity_images")
    opset: int = Field(17, ge=17, le=MAX_OPSET, description="ONNX opset (17 is the first with the QDQ and "
                                                            "normalisation ops the files use; the upper bound is the "
                                                            "exporter's)")
    artifacts: Annotated[list[Literal[ARTIFACT_NAMES]], Field(min_length=1)] | None = Field(
        None, description="the models to export; None: every model the run produced")
    eval_subset: int | None = Field(None, gt=0, le=MAX_IMAGES, json_schema_extra=EVALUATION,
                                    description="test images each exported file is evaluated on (a stratified "
                                                "sample, seed 0); None: all of them")
    parity_images: int = Field(512, gt=0, le=MAX_IMAGES, json_schema_extra=EVALUATION,
                               description="INT8 parity: each INT8 file against its fake-quant model on this many "
                                           "test images, on every CPU runtime here")
    int8_agreement: float = Field(0.97, gt=0, le=1, json_schema_extra=EVALUATION,
                                  description="the run stops unless an INT8 file and its fake-quant model predict the "
                                              "same class on at least this fraction of the parity images (INT8 "
                                              "kernels round apart from the fake-quant model and flip a few "
                                              "low-margin predictions; a wrong scale flips far more: docs/int8.md)")
    stem: Annotated[str, one_of(STEM_REWRITES, "export.stem", also=("auto",))] | None = Field(
        None, json_schema_extra=KEYED_WHEN_SET,
        description="the rewrite of the INT8 files' first conv (`compress.stem`); None or none: the file as exported; "
                    "auto: the fastest, by a microbenchmark of the stem alone on the deployment target's runtime "
                    "(cached), resolved at the door")
    stem_fp32: Annotated[str, one_of({k: STEM_REWRITES[k] for k in FP32_STEM_REWRITES}, "export.stem_fp32",
                                     also=("auto",))] | None = Field(
        None, json_schema_extra=KEYED_WHEN_SET, description="the same for the FP32 files")

    @staticmethod
    def stem_field(int8: bool) -> str:
        """The setting naming the stem rewrite of the INT8 files (`stem`) or of the FP32 files (`stem_fp32`)."""
        return "stem" if int8 else "stem_fp32"

    @model_validator(mode="after")
    def _none_is_unset(self):
        # "none" and None both mean the file as exported: one key for both
        self.stem = None if self.stem == "none" else self.stem
        self.stem_fp32 = None if self.stem_fp32 == "none" else self.stem_fp32
        return self


class BenchCfg(Section):
    """The latency benchmark of the exported files (stage bench)."""

    batch_sizes: Annotated[list[Annotated[int, Field(gt=0, le=MAX_BATCH)]], Field(min_length=1)] = Field(
        default_factory=lambda: [8], description="batch sizes every file is timed at")
    main_batch: int | None = Field(None, gt=0, le=MAX_BATCH, description="the batch size of the accuracy-latency curve and the "
                                                           "INT8 speed-ups (one of batch_sizes); None: the first")
    threads: int | None = Field(None, gt=0, le=MAX_THREADS, description="intra-op threads; None: all cores")
    warmup: int = Field(BENCH.warmup, ge=0, le=MAX_TIMED_CALLS, description="untimed calls before each file's timed calls in a round")
    iters: int = Field(BENCH.iters, gt=0, le=MAX_TIMED_CALLS, description="timed calls per file and round")
    rounds: int = Field(BENCH.rounds, gt=0, le=MAX_TIMED_CALLS, description="rounds, every file once per round in turn; a file's latency is its "
                                             "fastest call (docs/timing.md)")
    max_rounds: int | None = Field(None, gt=0, le=MAX_TIMED_CALLS, description="more rounds, up to this many in all, until every file has "
                                                           "compress.timing.QUIET_ROUNDS undisturbed ones; None: rounds")
    providers: Annotated[list[Annotated[str, one_of(RUNTIMES, "runtime")]], Field(min_length=1)] | None = Field(
        None, description="runtimes to time on (ONNX Runtime's cpu/cuda/tensorrt, OpenVINO's CPU runtime, PyTorch "
                          "eager); None: all available")
    image_size: int | None = Field(None, gt=0, le=MAX_IMAGE_SIZE, description="input height and width; None: "
                                                                              "data.image_size")

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_rounds is not None and self.max_rounds < self.rounds:
            raise ValueError(f"bench.max_rounds={self.max_rounds} is below bench.rounds={self.rounds}")
        if self.main_batch is not None and self.main_batch not in self.batch_sizes:
            raise ValueError(f"bench.main_batch: {self.main_batch} is not one of bench.batch_sizes={self.batch_sizes}")
        return self


class DistributedCfg(Section):
    """torchrun runs: process-group timeouts (they change no result)."""

    timeout_s: float = Field(1800, gt=0, le=MAX_TIMEOUT_S, description="the training group's collectives (NCCL on "
                                                                       "GPU, gloo on CPU)")
    wait_timeout_s: float = Field(7 * 24 * 3600, gt=0, le=MAX_TIMEOUT_S,
                                  description="other ranks waiting while rank 0 runs a stage alone")


class StudyCfg(Section):
    """Sweep keep_macs over pruning strategies; each point fine-tuned, QAT-quantized, exported and benchmarked."""

    keep_macs: Annotated[list[Fraction], Distinct, Field(min_length=1)] = Field(
        default_factory=lambda: [0.7, 0.5, 0.3], description="the points: fractions of the MACs kept")
    strategies: Annotated[list[Annotated[str, one_of(STRATEGIES, "strategy")]], Distinct,
                          Field(min_length=1)] = Field(
        default_factory=lambda: ["plain", "plain-uniform", "multibranch", "scratch"],
        description="the strategies compared (`compress.study.strategies`)")
    scratch_keep_macs: Annotated[list[Fraction], Distinct, Field(min_length=1)] | None = Field(
        None, description="the keep points of the costliest strategy, scratch; None: keep_macs")
    keep_latency: Annotated[list[Fraction], Distinct, Field(min_length=1)] | None = Field(
        None, description="the latency strategies' points, fractions of the unpruned latency; None: keep_macs. "
                          "Latency floors sooner than MACs (each layer keeps a fixed cost), so a keep_macs fraction "
                          "may be out of their reach")
    scratch_distill: bool = Field(True, description="scratch distils from the pruned points' teacher (the unpruned "
                                                    "plain model)")
    base_dir: FilePath | None = Field(None, description="a run (or study) directory whose trained base this study shares, "
                                                    "after checking its keys; its finished points made under the "
                                                    "same settings are reused too")
    seeds: int = Field(1, ge=1, le=MAX_STEPS, description="every pruned point fine-tuned and quantized this many times on the one "
                                            "base (finetune.seed and quantize.seed the recipe's seed + 0, 1, ...), "
                                            "every scratch point trained as many times; the curves and comparisons "
                                            "use the first, the points table lists them all")
    added_images: Annotated[list[ImageCount], Distinct, Field(min_length=1)] | None = Field(
        None, description="the prune-or-retrain curve (`compress.study.budget`): at budget_keep_latency of the "
                          "unpruned latency, the pruned model fine-tuned and a latency-matched model trained from "
                          "scratch on each number of added images; None: no such curve")
    budget_keep_latency: float = Field(0.5, gt=0, lt=1, description="the prune-or-retrain curve's latency fraction")
    budget_resrep: bool = Field(True, description="the prune-or-retrain curve's third side: ResRep to the pruned "
                                                  "side's latency target, trained on the same added images")
    budget_equal_total: bool = Field(True, description="also scratch on the base's images plus the recipe's fine-tune "
                                                       "(equal total images): each seed costs about as much as "
                                                       "training the base")
    bootstrap_resamples: int = Field(2000, ge=100, le=1_000_000, description="bootstrap resamples of the test set for the "
                                                               "comparisons' intervals")


def _block_strides(model: ModelCfg) -> list[int] | None:
    """The stride of every block of `model`, stem first (`repvgg.model.block_specs`, as the model is built); None
    where only its checkpoint knows the architecture."""
    if model.num_blocks is not None:
        blocks, widths = model.num_blocks, model.widths or stage_widths(model.width_multiplier)
    elif model.name is not None:
        blocks, multiplier, _ = CONFIGS[model.name if model.name in CONFIGS else f"RepVGG-{model.name}"]
        blocks, widths = blocks[1:], stage_widths(multiplier)  # CONFIGS count stage 0's block too
    else:
        return None
    return [spec.stride for spec in block_specs(blocks, widths, stem_stride=model.stem_stride)]


def _resolved_layout(section: Section, name: str, device_type: str, cpu_hazard: str | None,
                     qat: bool = False) -> dict:
    """A training section's (`name`) `precision` and `channels_last` made explicit for `device_type`
    (`compress.train_device`); QAT's `auto` precision is `QAT_AUTO_PRECISION`."""
    precision = QAT_AUTO_PRECISION if qat and section.precision == "auto" else section.precision
    try:
        precision = resolve_precision(precision, device_type, cpu_hazard=cpu_hazard)
    except ValueError as e:
        raise RecipeError(f"{name}.{e}") from None
    return {"precision": precision,
            "channels_last": resolve_channels_last(section.channels_last, device_type)}


class Recipe(Section):
    """A recipe: its name and seed, the stages it runs, and one section per stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="names the run directory (runs/NAME) and the reports; default: the file's name")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds initialisation, shuffles, subsets and calibration "
                                                        "samples (at most (2^64 - 1000) / 1000: torch's generators "
                                                        "take 64-bit seeds, and epochs seed with seed x 1000 + epoch)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA where there is one, else the CPU")
    stages: Annotated[list[Annotated[str, one_of(STAGES, "stage")]], Field(min_length=1)] = Field(
        default_factory=lambda: list(STAGE_NAMES), description="the stages to run, always in pipeline order; a "
                                                              "skipped stage passes its input through")
    model: ModelCfg = Field(description="the starting model (required: it has no default)")
    data: DataCfg = Field(default_factory=DataCfg, description="the dataset")
    train: TrainCfg = Field(default_factory=TrainCfg, description="training the multi-branch model")
    prune: PruneCfg = Field(default_factory=PruneCfg, description="pruning")
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg, description="fine-tuning the pruned model")
    quantize: QuantCfg = Field(default_factory=QuantCfg, description="INT8 quantization")
    export: ExportCfg = Field(default_factory=ExportCfg, description="ONNX export")
    bench: BenchCfg = Field(default_factory=BenchCfg, description="the latency benchmark")
    distributed: DistributedCfg = Field(default_factory=DistributedCfg, description="torchrun timeouts")
    study: StudyCfg | None = Field(None, description="present: the recipe runs the study instead of one pipeline")

    @model_validator(mode="after")
    def _consistent(self):
        self.stages = [s for s in STAGE_NAMES if s in self.stages]  # always run in pipeline order
        ft = self.finetune
        if self.prune.method == "resrep" and (ft.structure == "rebranch" or ft.ema_decay or ft.optimizer != "sgd"):
            culprit = ("finetune.structure=rebranch" if ft.structure == "rebranch" else
                       f"finetune.ema_decay={ft.ema_decay}" if ft.ema_decay else f"finetune.optimizer={ft.optimizer}")
            raise ValueError(f"{culprit}: prune.method=resrep trains compactors in the plain model's layers with "
                             f"finetune's settings; it needs structure plain or bn, optimizer sgd (compactors step "
                             f"without momentum) and no weight average (it would average the compactors across "
                             f"their masks)")
        if self.prune.mode == "multibranch" and self.finetune.structure == "rebranch":
            raise ValueError("finetune.structure: rebranch re-branches a plain-pruned model; prune.mode: multibranch "
                             "models keep their branches (use structure: bn or plain)")
        for field in ("stem", "stem_fp32"):
            if getattr(self.export, field) == "space_to_depth" and self.model.stem_stride != 2:
                raise ValueError(f"export.{field}: space_to_depth rewrites a stride-2 stem; model.stem_stride is "
                                 f"{self.model.stem_stride}")
        if self.study is not None and self.study.seeds > 1:
            last = max(self.seed, self.finetune.seed or 0, self.quantize.seed or 0) + self.study.seeds - 1
            if last > MAX_SEED:
                raise ValueError(f"study.seeds: the last point's seed {last} is past the largest seed, {MAX_SEED}")
        return self

    def resolved(self, device_type: str) -> Recipe:
        """The recipe with every default that depends on where it runs made explicit, so that keys hash what
        actually runs: `prune.round_to` for the device, `quantize.target_device` (auto: this machine) and the
        `quantize.overflow_fix` it calls for, every training section's `precision` and `channels_last`
        (`compress.train_device`), `prune.latency.stem` from the export's stem rewrite, `data.root`,
        `model.checkpoint` and `train.teacher` as absolute paths. A run directory reused on another kind of machine
        then recomputes what was made for the other one."""
        target = resolve_target(self.quantize.target_device, device_type)
        strides = _block_strides(self.model)
        hazard = None if strides is None else cpu_bf16_hazard(block_convs(strides, self.data.image_size))
        fix = overflow_fix_for(target) if self.quantize.overflow_fix == "auto" else self.quantize.overflow_fix
        # the latency table times the first layer through the export's stem rewrite for its precision (once concrete)
        stem = getattr(self.export, ExportCfg.stem_field(self.prune.latency.precision == "int8"))
        latency = self.prune.latency.model_copy(update={"stem": None if stem == "auto" else stem})
        update = {"prune": self.prune.model_copy(update={"round_to": self.prune.round_to or default_round_to(device_type),
                                                         "latency": latency}),
                  "quantize": self.quantize.model_copy(update={"target_device": target, "overflow_fix": fix,
                                                               **_resolved_layout(self.quantize, "quantize",
                                                                                  device_type, hazard, qat=True)}),
                  "finetune": self.finetune.model_copy(update=_resolved_layout(self.finetune, "finetune", device_type,
                                                                               hazard))}
        if self.data.root is not None:
            update["data"] = self.data.model_copy(update={"root": self.data.root.resolve()})
        if self.model.checkpoint is not None:
            update["model"] = self.model.model_copy(update={"checkpoint": self.model.checkpoint.resolve()})
        train = _resolved_layout(self.train, "train", device_type, hazard)
        if self.train.teacher is not None:
            train["teacher"] = self.train.teacher.resolve()
        update["train"] = self.train.model_copy(update=train)
        return self.model_copy(update=update)
