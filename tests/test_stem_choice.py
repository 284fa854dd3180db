"""`export.stem` / `stem_fp32`: the rewrite applied at export and checked like any file, `auto` chosen by timing the
stem alone (cached, with a margin), and the latency table timing the same stem."""

import json

import onnx
import pytest

from compress import stem_choice
from compress.cli import main
from compress.prune.options import LatencyOptions
from compress.recipe import load_recipe
from compress.stages.prune import latency_options
from compress.stem import find_stem
from repvgg import LayerSpec


def stem_input_channels(path) -> int:
    """The input channels of the file's stem kernel (through its DequantizeLinear in an INT8 file)."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    name = find_stem(model).input[1]
    if name in producer:
        name = producer[name].input[0]
    return next(i.dims[1] for i in model.graph.initializer if i.name == name)


def test_export_writes_and_checks_the_rewritten_stems(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = tiny_recipe(stages=["train", "reparam", "quantize", "export"], train={"epochs": 1, "lr": 0.05},
                         quantize={"mode": "ptq", "calibration_size": 64},
                         export={"stem": "fp32", "stem_fp32": "pad8", "parity_images": 64, "int8_agreement": 0.9})
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    artifacts = json.loads((out / "summary.json").read_text())["stages"]["export"]["artifacts"]
    fp32, int8 = artifacts["plain_fp32"], artifacts["plain_int8"]
    assert (fp32["stem"], int8["stem"]) == ("pad8", "fp32")
    assert stem_input_channels(fp32["path"]) == 8  # padded, and still the PyTorch model within parity tolerance
    assert fp32["max_abs_diff"] <= 1e-4 * max(1.0, fp32["max_abs_logit"])
    stem = find_stem(onnx.load(int8["path"]))
    assert stem.input[0] == "input"  # the INT8 file's stem reads the float image: no Q/DQ before it
    assert int8["int8_parity"]["cpu"]["agreement"] >= 0.9
    # a rewrite that does not fit the stem (space-to-depth of a stride-1 stem) is refused at the door, in one line
    bad = tiny_recipe(stages=["train", "reparam", "export"], train={"epochs": 1, "lr": 0.05},
                      model={"num_blocks": [1, 1, 1, 1], "width_multiplier": [0.25, 0.25, 0.25, 0.125],
                             "stem_stride": 1},
                      export={"stem_fp32": "space_to_depth", "parity_images": 64})
    assert main(["--recipe", str(bad), "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: export.stem_fp32: space_to_depth rewrites a stride-2 stem; model.stem_stride is 1", err
    assert not (tmp_path / "bad").exists()  # before any training


def test_auto_takes_a_rewrite_only_past_the_margin_and_caches_the_timing(tiny_recipe, tmp_path, monkeypatch):
    timed = []
    speedups = {"none": 1.0, "pad4": 1.0 + stem_choice.MARGIN / 2, "fp32": 0.9}

    def fake_timing(*args, **kwargs):
        timed.append(args)
        return dict(speedups)

    monkeypatch.setattr(stem_choice, "time_stem_rewrites", fake_timing)
    spec = LayerSpec(3, 16, 2)
    choice, got = stem_choice.choose_stem(spec, 32, True, "cpu", 1, 8, tmp_path)
    assert choice == "none" and got == speedups and len(timed) == 1  # within the margin: the file as exported
    assert stem_choice.choose_stem(spec, 32, True, "cpu", 1, 8, tmp_path)[0] == "none" and len(timed) == 1  # cached
    speedups["pad4"] = 1.0 + 2 * stem_choice.MARGIN
    assert stem_choice.choose_stem(spec, 32, True, "cpu", 2, 8, tmp_path)[0] == "pad4" and len(timed) == 2  # new key

    # resolved into the recipe: auto replaced, and the latency table of that precision times the same stem
    recipe = load_recipe(tiny_recipe(), ["data.image_size=32", "export.stem=auto", "export.stem_fp32=none",
                                         "prune.keep_latency=0.5", "prune.latency.precision=int8",
                                         f"prune.latency.cache_dir={tmp_path}", "bench.threads=2"]).resolved("cpu")
    assert recipe.prune.latency.stem is None
    resolved = stem_choice.resolve_stems(recipe, spec, "cpu")
    assert (resolved.export.stem, resolved.export.stem_fp32, resolved.prune.latency.stem) == ("pad4", None, "pad4")
    assert latency_options(resolved.prune.latency).stem == "pad4"  # what the prune stage's table times
    assert latency_options(recipe.prune.latency).stem == "none"


def test_the_stem_is_timed_as_exported_and_through_every_rewrite_that_fits():
    speedups = stem_choice.time_stem_rewrites(LayerSpec(3, 8, 1), 8, True, "cpu", 1, 2, rounds=1)
    assert speedups["none"] == 1.0 and set(speedups) == {"none", "pad4", "pad8", "pad16", "fp32"}  # no s2d: stride 1
    assert set(stem_choice.time_stem_rewrites(LayerSpec(3, 8, 2), 8, False, "cpu", 1, 2, rounds=1)) == {
        "none", "pad4", "pad8", "pad16", "space_to_depth"}  # FP32: no fp32 stem to choose


@pytest.mark.parametrize("stem,keyed", [("none", False), ("pad4", True)])
def test_the_latency_table_key_holds_a_stem_rewrite(stem, keyed):
    key = LatencyOptions(stem=stem).cache_key()
    assert ("stem" in key) == keyed and key.get("stem", "none") == stem
