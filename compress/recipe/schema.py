"""The recipe's sections: what each key means, its default and its checks. Validated once, at the door
(`compress.recipe.load`); unknown keys are errors, never silently ignored. The allowed names of extension points
(importance criteria, runtimes, study strategies, stages) come from their tables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from compress.deploy import TARGET_DEVICES, overflow_fix_for, resolve_target
from compress.keys import EVALUATION, KEYED_WHEN_SET, NO_EFFECT, ROLE_WEIGHTS, role_of
from compress.prune import IMPORTANCES, TARGET_KINDS, Target, default_round_to
from compress.registry import STAGE_NAMES
from compress.runtime import RUNTIMES
from compress.stem import FP32_STEM_REWRITES, STEM_REWRITES
from compress.study.strategies import STRATEGIES
from compress.timing import BENCH, LATENCY_TABLE
from repvgg import CONFIGS

from .errors import suggest


def one_of(table: Mapping[str, object], what: str, fits: Callable[[object], bool] = lambda entry: True,
           also: tuple[str, ...] = ()) -> AfterValidator:
    """A validator: the value is the name of an entry of `table` that `fits`, or one of `also` (the table is read
    when validating, so an entry registered later counts)."""

    def check(name: str) -> str:
        names = [*also, *(key for key, entry in table.items() if fits(entry))]
        if name not in names:
            raise ValueError(f"unknown {what} '{name}'{suggest(name, names)}; valid: {', '.join(names)}")
        return name

    return AfterValidator(check)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # evaluation subsets drawn by `data.stratified_indices`: set, their key names that sampling, so that scores of
    # other images are not reused; unset (all images), the key holds nothing more
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
    name: str | None = None
    num_blocks: list[int] | None = None
    width_multiplier: list[float] | None = None
    widths: list[int] | None = None  # 5 stage widths instead of width_multiplier (narrowed models)
    override_groups_map: dict[int, int] | None = None
    num_classes: int | None = Field(None, gt=0)  # None: taken from the data
    stem_stride: Literal[1, 2] = 2
    checkpoint: Path | None = None  # ours, official or timm's (training- or deploy-form; .pth or .safetensors)
    pretrained: Literal["timm"] | None = None  # timm's pretrained weights for model.name, through timm's cache

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
        elif self.name is None:
            if self.checkpoint is None:
                raise ValueError("model: give a name, num_blocks + width_multiplier, or a checkpoint")
        elif self.name not in CONFIGS and f"RepVGG-{self.name}" not in CONFIGS:
            raise ValueError(f"model.name: unknown model '{self.name}'; valid names: {', '.join(CONFIGS)}")
        return self


class DataCfg(Section):
    _stratified = ("test_subset",)
    kind: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: Path | None = None
    image_size: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)  # per process
    workers: int = Field(0, ge=0, json_schema_extra=NO_EFFECT)
    augment: Literal["none", "cifar", "imagenet"] = "cifar"
    download: bool = Field(False, json_schema_extra=NO_EFFECT)  # cifar10 python batches only
    train_subset: int | None = Field(None, gt=0)  # first N of a fixed shuffled order: CPU-affordable runs
    test_subset: int | None = Field(None, gt=0, json_schema_extra=EVALUATION)  # a stratified sample (seed 0)
    # a run under "fail" only finishes without bad images, where "skip" trains on the same data
    bad_images: Literal["fail", "skip"] = Field("fail", json_schema_extra=NO_EFFECT)

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
    # distil from a trained model of ours (the study's scratch baseline learns from the pruned points' teacher)
    distill: Distill | None = None
    teacher: Path | None = None  # a model file this tool wrote (a run's plain.pt, say): the teacher of `distill`

    @model_validator(mode="after")
    def _teacher_with_distill(self):
        if (self.distill is None) != (self.teacher is None):
            raise ValueError("train: distill and teacher go together (the teacher is the model file to distil from)")
        return self


class FinetuneCfg(OptimCfg):
    epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0)
    distill: Distill | None = None
    # how a pruned plain model trains: as it is, with a temporary BN after each conv (folded back after), or
    # re-branched into RepVGG blocks at its pruned widths (re-parameterized back after, exactly)
    structure: Literal["plain", "bn", "rebranch"] = "bn"
    train_subset: int | None = Field(None, gt=0)  # fine-tune on the first N training images (fixed order); None: all
    # the fine-tune's own seed (its shuffles, training subset and calibration images; the prune stage's fine-tunes
    # between steps too), so that one base yields several fine-tunes (`study.seeds`); None: the recipe's seed
    seed: int | None = Field(None, json_schema_extra=KEYED_WHEN_SET)

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """As `Section.key_values`; the keys of a `bn` or `rebranch` fine-tune also name how its BNs start (the conv
        divided by the root of its output std since it stopped being standardised), so fine-tunes made the old way
        are not reused."""
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

    # a runtime that runs ONNX files: ONNX Runtime's CPU provider, OpenVINO's CPU device, ...; auto: the one that
    # runs the unpruned model fastest here, in the table's precision (timed by the prune stage, recorded in its summary)
    provider: Annotated[str, one_of(RUNTIMES, "runtime of ONNX files", lambda runtime: runtime.opens == "onnx",
                                    also=("auto",))] = "cpu"
    threads: int | None = Field(None, gt=0)  # None: all cores
    batch: int = Field(8, gt=0)
    precision: Literal["fp32", "int8"] = "fp32"  # int8: QDQ layers, as the quantize + export stages deploy them
    grid_points: int = Field(8, ge=2)  # measured widths per axis of each layer's table; bilinear in between
    rounds: int = Field(LATENCY_TABLE.rounds, gt=0)  # every model timed in this many rounds, alternating; its fastest call kept
    # a plan is timed whole against the unpruned model and re-planned (budget scaled by the miss) until it measures
    # within 0.02 of the target, at most this many times; 0: trust the table's prediction
    verify: int = Field(3, ge=0)
    # None: $XDG_CACHE_HOME/repvgg-compress, else ~/.cache/repvgg-compress
    cache_dir: Path | None = Field(None, json_schema_extra=NO_EFFECT)
    # not a setting: the export's stem rewrite for this precision (`export.stem` / `stem_fp32`), copied here at the
    # door (`Recipe.resolved`) so the table times what is deployed and the prune stage's key holds it
    stem: Annotated[str, one_of(STEM_REWRITES, "stem rewrite")] | None = Field(None, json_schema_extra=KEYED_WHEN_SET)


class PruneCfg(Section):
    mode: Literal["plain", "multibranch"] = "plain"
    # taylor: the squared first-order loss change of removing each channel, comparable across layers; with
    # reconstruct it kept 73.10% top-1 before fine-tuning at keep_macs 0.5 on the CPU study's base, against 16.61%
    # for l2 ranking (README, "Pruning in loss units")
    importance: Annotated[str, one_of(IMPORTANCES, "criterion")] = "taylor"
    scope: Literal["local", "global"] = "global"
    # The target: exactly one of these four; none given means keep_macs 0.5.
    keep_macs: float | None = Field(None, gt=0, lt=1)
    channel_ratio: float | None = Field(None, gt=0, lt=1)  # fraction of channels removed per layer
    keep_latency: float | None = Field(None, gt=0, lt=1)  # fraction of the unpruned plain model's measured latency
    target_ms: float | None = Field(None, gt=0)  # latency budget in milliseconds
    latency: LatencyCfg = Field(default_factory=LatencyCfg)
    max_layer_ratio: float = Field(0.8, gt=0, lt=1)
    min_width: int | None = Field(None, gt=0)  # no layer narrower (channels); None: round_to
    isomorphic: bool = False
    round_to: int | None = Field(None, gt=0)  # None: 16 on CPU, 8 on CUDA (`Recipe.resolved`)
    steps: int = Field(1, gt=0)  # iterative pruning, fine-tuning between steps
    steps_finetune_epochs: int = Field(1, ge=0)
    prune_first_layer: bool = False
    gradient_batches: int = Field(4, gt=0)  # taylor / hessian / sensitivity's channel order
    # budget: the widths that keep the most importance within the target's cost (global scope); ranking: bisect
    # the ratio of Torch-Pruning's global ranking (`compress.prune.options.PruneOptions`)
    planner: Literal["budget", "ranking"] = "budget"
    sensitivity_images: int = Field(2048, gt=0)  # training images (a seeded sample) the loss curves are measured on
    sensitivity_grid: int = Field(8, ge=2)  # widths measured per slot; interpolated in between
    # the file caching the loss curves (keyed by the model's weights and the settings above); None: DIR/sensitivity.json
    sensitivity_cache: Path | None = Field(None, json_schema_extra=NO_EFFECT)
    # re-fit each pruned plain layer to the unpruned model's outputs (least squares, `compress.prune.reconstruct`);
    # None: on for mode plain, off for multibranch (which has no plain layers until after fine-tuning)
    reconstruct: bool | None = None
    reconstruct_images: int = Field(512, gt=0)  # training images (a seeded sample) it fits on
    reconstruct_ridge: float = Field(1e-3, ge=0)  # x mean(diag(X^T X)), on the weights, not the bias

    @model_validator(mode="after")
    def _one_target(self):
        given = [name for name in TARGET_KINDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"prune: {' and '.join(given)} given together: give one of {', '.join(TARGET_KINDS)}")
        if not given:
            self.keep_macs = 0.5
        if self.reconstruct is None:
            self.reconstruct = self.mode == "plain"
        elif self.reconstruct and self.mode == "multibranch":
            raise ValueError("prune.reconstruct: re-fits plain layers; prune.mode=multibranch has none until after "
                             "fine-tuning (set it false)")
        return self

    @property
    def target(self) -> Target:
        """The target in force: the one of the four given (keep_macs 0.5 when none is)."""
        kind = next(name for name in TARGET_KINDS if getattr(self, name) is not None)
        return Target(kind, getattr(self, kind))

    @property
    def trains(self) -> bool:
        """Iterative pruning fine-tunes between its steps (`registry`: every rank then prunes)."""
        return self.steps > 1

    def key_values(self, role: str = ROLE_WEIGHTS) -> dict:
        """As `Section.key_values`, with the `latency` settings' own roles (its cache_dir changes nothing), and
        without them unless a latency target is in force (they change nothing else); likewise the sensitivity
        settings without the sensitivity criterion and the reconstruction's without reconstruction."""
        values = super().key_values(role)
        values.pop("latency", None)
        nested = self.latency.key_values(role)
        if self.target.latency and nested:
            values["latency"] = nested
        unused = [*(("sensitivity_images", "sensitivity_grid") if self.importance != "sensitivity" else ()),
                  *(("reconstruct_images", "reconstruct_ridge") if not self.reconstruct else ())]
        for name in unused:  # settings of what this prune does not run change nothing
            values.pop(name, None)
        return values


class QuantCfg(Section):
    mode: Literal["qat", "ptq"] = "qat"
    calibration_size: int = Field(256, gt=0)
    epochs: int = Field(1, ge=0)  # QAT only
    # SGD at 1e-3 wrecked the CPU study's keep-0.3 points (QAT below its own PTQ start, down to chance); on models
    # pruned by the loss-unit defaults 1e-4 held every CPU study point within 0.6 pt of FP32 in one epoch, where 1e-5
    # lost up to 1.75 (README, "What the INT8 grid found" and "What the CPU studies found")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    distill: Distill | None = None
    fp32_first_last: bool = False  # keep the first conv and the head in FP32
    train_subset: int | None = Field(None, gt=0)  # QAT on the first N training images (fixed order); None: all
    optimizer: Literal["sgd", "adamw"] = "sgd"  # QAT's (with weight_decay 0, adamw is Adam)
    # QAT's and calibration's own seed (its shuffles, training subset, calibration images); None: the recipe's seed
    seed: int | None = Field(None, json_schema_extra=KEYED_WHEN_SET)
    # per-tensor activation ranges from the calibration images (`quant.quantize_model`): a sample is one
    # calibration batch with batchwise_statistics, else one image
    activation_ranges: Literal["mean_minmax", "minmax", "mean_quantile", "histogram"] = "mean_minmax"
    batchwise_statistics: bool = True
    # where the INT8 model will run (`compress.deploy`); auto: this machine, resolved at the door (`Recipe.resolved`)
    target_device: Literal[("auto", *TARGET_DEVICES)] = "auto"
    # NNCF's overflow fix: weights on 7 bits, so INT8 kernels without VNNI (AVX2 pmaddubsw) cannot saturate;
    # auto: enable for cpu-avx2, disable for VNNI/AMX CPUs and GPUs (`deploy.overflow_fix_for`)
    overflow_fix: Literal["auto", "enable", "first_layer_only", "disable"] = "auto"

    @property
    def trains(self) -> bool:
        """QAT trains (`registry`: every rank then runs the stage); PTQ has nothing to train."""
        return self.mode == "qat"


ARTIFACT_NAMES = ("train_fp32", "plain_fp32", "plain_int8", "pruned_fp32", "pruned_int8")


class ExportCfg(Section):
    _stratified = ("eval_subset", "parity_images")
    opset: int = Field(17, ge=17)
    artifacts: list[Literal[ARTIFACT_NAMES]] | None = None  # None: every model the run produced
    # test images each exported file is evaluated on (a stratified sample, seed 0); None: all of it
    eval_subset: int | None = Field(None, gt=0, json_schema_extra=EVALUATION)
    # INT8 parity: each INT8 file against its fake-quant model on this many test images, on every CPU runtime here;
    # the run stops unless they predict the same class on at least `int8_agreement` of them
    # (0.97: ORT CPU's INT8 kernels round apart from the fake-quant model and flip 1-2% of a low-margin model's
    # predictions at unchanged top-1, where OpenVINO agrees on all; a wrong scale flips far more: README)
    parity_images: int = Field(512, gt=0, json_schema_extra=EVALUATION)
    int8_agreement: float = Field(0.97, gt=0, le=1, json_schema_extra=EVALUATION)
    # the rewrite of the INT8 files' / the FP32 files' first conv (compress.stem: pad4/8/16, space_to_depth, and
    # fp32 for INT8 files; README "Where the time goes"); None or none: the file as exported; auto: the fastest, by a
    # microbenchmark of the stem alone on the deployment target's runtime (cached), resolved at the door
    stem: Annotated[str, one_of(STEM_REWRITES, "export.stem", also=("auto",))] | None = Field(
        None, json_schema_extra=KEYED_WHEN_SET)
    stem_fp32: Annotated[str, one_of({k: STEM_REWRITES[k] for k in FP32_STEM_REWRITES}, "export.stem_fp32",
                                     also=("auto",))] | None = Field(None, json_schema_extra=KEYED_WHEN_SET)

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
    batch_sizes: list[int] = Field(default_factory=lambda: [8])
    main_batch: int | None = None  # the batch size of the accuracy-latency curve; default the first
    threads: int | None = Field(None, gt=0)  # None: all cores
    warmup: int = Field(BENCH.warmup, ge=0)  # untimed calls of each file per round (compress.timing.BENCH)
    iters: int = Field(BENCH.iters, gt=0)  # timed calls of each file per round; its latency: its fastest call
    rounds: int = Field(BENCH.rounds, gt=0)
    # more rounds, up to this many in all, until every file has compress.timing.QUIET_ROUNDS undisturbed ones
    # (None: `rounds`)
    max_rounds: int | None = Field(None, gt=0)
    # ONNX Runtime's cpu/cuda/tensorrt, OpenVINO's CPU runtime, PyTorch eager; None: all available
    providers: list[Annotated[str, one_of(RUNTIMES, "runtime")]] | None = None
    image_size: int | None = Field(None, gt=0)  # None: data.image_size

    @model_validator(mode="after")
    def _max_rounds_at_least_rounds(self):
        if self.max_rounds is not None and self.max_rounds < self.rounds:
            raise ValueError(f"bench.max_rounds={self.max_rounds} is below bench.rounds={self.rounds}")
        return self


class DistributedCfg(Section):
    """torchrun runs: process-group timeouts (they change no result)."""

    timeout_s: float = Field(1800, gt=0)  # the training group's collectives (NCCL on GPU, gloo on CPU)
    wait_timeout_s: float = Field(7 * 24 * 3600, gt=0)  # other ranks waiting while rank 0 runs a stage alone


class StudyCfg(Section):
    """Sweep keep_macs over pruning strategies; each point fine-tuned, QAT-quantized, exported and benchmarked."""

    keep_macs: list[float] = Field(default_factory=lambda: [0.7, 0.5, 0.3])
    strategies: list[Annotated[str, one_of(STRATEGIES, "strategy")]] = Field(
        default_factory=lambda: ["plain", "plain-uniform", "multibranch", "scratch"]
    )
    # the costliest strategy: its keep points (None: keep_macs)
    scratch_keep_macs: list[float] | None = None
    # the latency strategies' points, fractions of the unpruned latency (None: keep_macs); latency floors sooner
    # than MACs (each layer keeps a fixed cost), so a keep_macs fraction may be out of their reach
    keep_latency: list[float] | None = None
    scratch_distill: bool = True  # scratch distils from the pruned points' teacher (the unpruned plain model)
    # a run (or study) directory whose trained base this study shares, after checking its keys; a study's
    # finished points made under the same settings are reused too
    base_dir: Path | None = None
    # every pruned point fine-tuned and quantized this many times on the one base (finetune.seed and quantize.seed
    # the recipe's seed + 0, 1, ...), every scratch point trained as many times (seed + 0, 1, ...); the curves and
    # comparisons use the first, the points table lists them all
    seeds: int = Field(1, ge=1)
    # the prune-or-retrain curve (`compress.study.budget`): at `budget_keep_latency` of the unpruned latency, the
    # pruned model fine-tuned and a latency-matched model trained from scratch on each number of added images
    added_images: list[Annotated[int, Field(gt=0)]] | None = None
    budget_keep_latency: float = Field(0.5, gt=0, lt=1)
    # and scratch once more on the base's images plus the recipe's fine-tune (equal total images): each seed of it
    # costs about as much as training the base, so a recipe on a tight budget may leave it out
    budget_equal_total: bool = True
    bootstrap_resamples: int = Field(2000, ge=100)

    @model_validator(mode="after")
    def _fractions(self):
        for name in ("keep_macs", "scratch_keep_macs", "keep_latency"):
            for k in getattr(self, name) or []:
                if not 0 < k < 1:
                    raise ValueError(f"study.{name}: {k} is not in (0, 1)")
        return self


class Recipe(Section):
    name: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stages: list[str] = Field(default_factory=lambda: list(STAGE_NAMES))
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    prune: PruneCfg = Field(default_factory=PruneCfg)
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg)
    quantize: QuantCfg = Field(default_factory=QuantCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    bench: BenchCfg = Field(default_factory=BenchCfg)
    distributed: DistributedCfg = Field(default_factory=DistributedCfg)
    study: StudyCfg | None = None  # present: the recipe runs the study instead of one pipeline

    @model_validator(mode="after")
    def _known_stages(self):
        for stage in self.stages:
            if stage not in STAGE_NAMES:
                raise ValueError(f"stages: unknown stage '{stage}'{suggest(stage, STAGE_NAMES)}")
        self.stages = [s for s in STAGE_NAMES if s in self.stages]  # always run in pipeline order
        if self.prune.mode == "multibranch" and self.finetune.structure == "rebranch":
            raise ValueError("finetune.structure: rebranch re-branches a plain-pruned model; prune.mode: multibranch "
                             "models keep their branches (use structure: bn or plain)")
        return self

    def resolved(self, device_type: str) -> Recipe:
        """The recipe with every default that depends on where it runs made explicit, so that keys hash what
        actually runs: `prune.round_to` for the device, `quantize.target_device` (auto: this machine) and the
        `quantize.overflow_fix` it calls for, `prune.latency.stem` from the export's stem rewrite, `data.root`,
        `model.checkpoint` and `train.teacher` as absolute paths. A run directory reused on another kind of machine
        then recomputes what was made for the other one."""
        target = resolve_target(self.quantize.target_device, device_type)
        fix = overflow_fix_for(target) if self.quantize.overflow_fix == "auto" else self.quantize.overflow_fix
        # the latency table times the first layer through the export's stem rewrite for its precision (once concrete)
        stem = getattr(self.export, ExportCfg.stem_field(self.prune.latency.precision == "int8"))
        latency = self.prune.latency.model_copy(update={"stem": None if stem == "auto" else stem})
        update = {"prune": self.prune.model_copy(update={"round_to": self.prune.round_to or default_round_to(device_type),
                                                         "latency": latency}),
                  "quantize": self.quantize.model_copy(update={"target_device": target, "overflow_fix": fix})}
        if self.data.root is not None:
            update["data"] = self.data.model_copy(update={"root": self.data.root.resolve()})
        if self.model.checkpoint is not None:
            update["model"] = self.model.model_copy(update={"checkpoint": self.model.checkpoint.resolve()})
        if self.train.teacher is not None:
            update["train"] = self.train.model_copy(update={"teacher": self.train.teacher.resolve()})
        return self.model_copy(update=update)
