"""How a training runs on its device: `auto` precision and layout resolved from faked device facts, `amp` refused,
the compile switch's fallback, EMA across a resume, and BF16 training holding FP32's accuracy."""

import pytest
import torch

from compress import train_device
from compress.data import build_data
from compress.env import Env
from compress.files import load_checkpoint
from compress.recipe import DataCfg, RecipeError, TrainCfg, validate_recipe
from compress.report import training_table
from compress.train import TrainingError, fit
from compress.train_device import block_convs, cpu_bf16_hazard, model_convs, resolve_channels_last, resolve_precision
from repvgg import RepVGG

ZEN5 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = ["avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"]
AVX2_ONLY = ["avx2", "fma"]


@pytest.mark.parametrize("flags, expected", [(ZEN5, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (AVX2_ONLY, "fp32"), ([], "fp32")])
def test_auto_precision_on_cpu_follows_its_bf16_flags(flags, expected):
    assert resolve_precision("auto", "cpu", flags=flags) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_follows_its_bf16_capability(bf16, expected):
    assert resolve_precision("auto", "cuda", cuda_bf16=bf16) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(precision):
    assert resolve_precision(precision, "cpu", flags=AVX2_ONLY) == precision
    assert resolve_precision(precision, "cuda", cuda_bf16=False) == precision


def test_a_stride_2_conv_on_a_1x1_map_is_the_cpu_bf16_hazard():
    # stem stride 2 at 16x16: 8, then stages 4, 2, 1, and stage 4's first block (block 4) strides over 1x1
    assert cpu_bf16_hazard(block_convs([2, 2, 2, 2, 2], 16)) == "conv 4 is a stride-2 conv on a 1x1 map"
    assert cpu_bf16_hazard(block_convs([1, 2, 2, 2, 2], 16)) is None  # stage 4 sees 2x2
    assert cpu_bf16_hazard(block_convs([1, 2, 1, 2, 1, 2, 1, 2, 1], 16)) is None  # a 1x1 map at stride 1 is fine
    assert resolve_precision("auto", "cpu", flags=ZEN5, cpu_hazard="conv 4") == "fp32"
    assert resolve_precision("auto", "cuda", cuda_bf16=True, cpu_hazard="conv 4") == "bf16"  # oneDNN only
    # the model's own convs, seen in a forward, agree with the recipe's block arithmetic (3x3 branches only)
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10, stem_stride=2)
    assert model_convs(model, torch.zeros(1, 3, 16, 16)) == block_convs([2, 2, 2, 2, 2], 16)
    # a named model's strides at the door are those its built model runs (CONFIGS count stage 0's block too)
    from compress.recipe.schema import _block_strides
    from repvgg.model import create_model

    named = validate_recipe({"name": "r", "model": {"name": "A0"}}).model
    built = model_convs(create_model("A0", num_classes=10), torch.zeros(1, 3, 32, 32))
    assert block_convs(_block_strides(named), 32) == built


def test_fit_trains_a_model_with_the_hazard_in_fp32_under_auto_and_refuses_bf16(tmp_path):
    dtypes = set()
    _fit(tmp_path / "auto", epochs=1, dtypes=dtypes, stem_stride=2, precision="auto")
    assert dtypes == {torch.float32}
    with pytest.raises(TrainingError, match=r"^\[t\] precision: bf16 trains wrongly on CPU here \(conv 4"):
        _fit(tmp_path / "bf16", epochs=1, stem_stride=2, precision="bf16")


def test_bf16_on_a_model_with_the_hazard_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(train_device, "cpu_flags", lambda: ZEN5)
    tiny = _recipe(data={"image_size": 16}, model={"num_blocks": [1, 1, 1, 1], "width_multiplier": [0.25] * 4,
                                                   "stem_stride": 2})
    assert validate_recipe(tiny).resolved("cpu").train.precision == "fp32"
    with pytest.raises(RecipeError, match=r"^train\.precision: bf16 trains wrongly on CPU here \(conv 4 is a "
                                          r"stride-2 conv on a 1x1 map"):
        validate_recipe({**tiny, "train": {"precision": "bf16"}}).resolved("cpu")


def test_auto_channels_last_follows_the_device():
    assert resolve_channels_last("auto", "cuda", flags=[]) is True
    assert resolve_channels_last("auto", "cpu", flags=ZEN5) is True
    assert resolve_channels_last("auto", "cpu", flags=AVX2_ONLY) is False
    assert resolve_channels_last(False, "cuda") is False


def _recipe(**sections) -> dict:
    return {"name": "r", "model": {"num_blocks": [1, 1, 1, 1], "width_multiplier": [0.25] * 4}, **sections}


def test_auto_is_resolved_at_the_door_and_keyed(monkeypatch):
    recipe = validate_recipe(_recipe())
    monkeypatch.setattr(train_device, "cpu_flags", lambda: ZEN5)
    on_zen5 = recipe.resolved("cpu")
    monkeypatch.setattr(train_device, "cpu_flags", lambda: AVX2_ONLY)
    on_avx2 = recipe.resolved("cpu")
    assert (on_zen5.train.precision, on_zen5.finetune.precision) == ("bf16", "bf16")
    assert (on_avx2.train.precision, on_avx2.train.channels_last) == ("fp32", False)
    assert on_zen5.train.key_values() != on_avx2.train.key_values()  # a run moved between them retrains
    assert on_zen5.quantize.precision == "fp32"  # QAT's auto: NNCF's quantizers would round in BF16


@pytest.mark.parametrize("section", ["train", "finetune", "quantize"])
def test_amp_is_refused_in_one_line_naming_precision(section):
    with pytest.raises(RecipeError) as err:
        validate_recipe(_recipe(**{section: {"amp": True}}))
    message = str(err.value)
    assert "\n" not in message and f"{section}" in message and "precision" in message


DIGITS = DataCfg(kind="digits", image_size=16, augment="none", batch_size=64, train_subset=256, test_subset=200)


def _fit(out_dir, data_cfg: DataCfg = DIGITS, seed: int = 0, dtypes: set | None = None, stem_stride: int = 1,
         **cfg) -> tuple[RepVGG, dict]:
    """A tiny model fitted in `out_dir` (resuming from its checkpoint); `dtypes` collects the first conv's output
    types in training steps."""
    torch.manual_seed(seed)
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10, stem_stride=stem_stride)
    if dtypes is not None:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype) if m.training else None)
    env = Env(device=torch.device("cpu"), out_dir=out_dir)
    result = fit(model, TrainCfg(**{"epochs": 2, "lr": 0.05, "schedule": "constant", **cfg}), build_data(data_cfg),
                 env, tag="t", ckpt_path=out_dir / "t.ckpt", key="k")
    return model, result


def test_ema_state_survives_a_resume_and_is_the_stages_model(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    model, result = _fit(whole, ema_decay=0.9, precision="fp32")
    _fit(resumed, epochs=1, ema_decay=0.9, precision="fp32")
    again, _ = _fit(resumed, ema_decay=0.9, precision="fp32")
    expected, got = load_checkpoint(whole / "t.ckpt"), load_checkpoint(resumed / "t.ckpt")
    assert set(got["ema"]) == set(expected["ema"])
    assert all(torch.equal(got["ema"][k], expected["ema"][k]) for k in expected["ema"])
    assert int(got["ema"]["n_averaged"]) == 2 * (256 // 64)  # one update per step, across the resume
    # the stage's model is the average, not the last step's weights
    averaged = {k.removeprefix("module."): v for k, v in got["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(again.state_dict()[k], averaged[k]) for k in averaged)
    assert any(not torch.equal(got["model"][k], averaged[k]) for k in averaged if averaged[k].is_floating_point())
    # the report's epoch table: one row per epoch, its evaluation's wall time beside the training's
    history = result["history"]
    assert all(h["wall_seconds"] >= h["train_seconds"] > 0 for h in history)
    rows = training_table(history)
    assert len(rows) == 2 + len(history) + 2 and rows[2].startswith(f"| 1 | {history[0]['top1']:.2f} |")
    assert rows[-1].startswith("2 epochs: ") and rows[-1].endswith("min with evaluations")


def test_compile_without_a_toolchain_warns_and_trains_eagerly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_device.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled without a compiler"))
    _, result = _fit(tmp_path, epochs=1, compile=True, precision="fp32")
    assert "compile is off: no C++ compiler on the PATH" in capsys.readouterr().err
    assert len(result["history"]) == 1


def test_bf16_training_of_the_digits_ends_within_2_points_of_fp32(tmp_path):
    data = DataCfg(kind="digits", image_size=16, augment="none", batch_size=64)  # all 1,347 training images
    dtypes = {"fp32": set(), "bf16": set()}
    top1 = {p: _fit(tmp_path / p, data_cfg=data, dtypes=dtypes[p], epochs=5, lr=0.05, schedule="cosine",
                    precision=p)[1]["top1"] for p in dtypes}
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert top1["fp32"] > 80  # a trained model, not chance, on both sides
    assert abs(top1["bf16"] - top1["fp32"]) <= 2.0, top1
