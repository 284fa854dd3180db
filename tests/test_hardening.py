import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from torch import nn

from compress.cli import main
from compress.data import build_data
from compress.env import Env
from compress.files import CheckpointError, atomic_path, load_model, model_record, save_model
from compress.recipe import DataCfg, TrainCfg
from compress.rundir import RunLock
from compress.train import TrainingError, fit
from repvgg import RepVGG, reparameterize


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_changed_recipe_recomputes_only_changed_stages(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = str(tiny_recipe(stages=["train", "reparam"]))
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())["stages"]
    train_mtime = (out / "train.pt").stat().st_mtime_ns
    # a change to the data section changes what both stages saw: both recomputed
    assert main(["--recipe", recipe, "--out", str(out), "--set", "data.train_subset=1000"]) == 0
    second = json.loads((out / "summary.json").read_text())["stages"]
    assert second["train"]["key"] != first["train"]["key"] and second["reparam"]["key"] != first["reparam"]["key"]
    assert second["train"]["artifact_key"] != first["train"]["artifact_key"]
    assert (out / "train.pt").stat().st_mtime_ns != train_mtime
    # a change to a section no stage here reads changes nothing
    train_mtime = (out / "train.pt").stat().st_mtime_ns
    assert main(["--recipe", recipe, "--out", str(out), "--set", "data.train_subset=1000",
                 "--set", "bench.rounds=7"]) == 0
    third = json.loads((out / "summary.json").read_text())["stages"]
    assert third["train"]["key"] == second["train"]["key"]
    assert (out / "train.pt").stat().st_mtime_ns == train_mtime


def test_run_dir_lock_names_the_holder(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--out", str(out)])
    import os

    assert f"run dir {out} is in use by another run (pid {os.getpid()})" in line


def _tiny_fit(tmp_path, model, cfg, key="k"):
    data = build_data(DataCfg(image_size=16, augment="none", batch_size=64))
    env = Env(device=torch.device("cpu"), out_dir=tmp_path)
    return fit(model, cfg, data, env, tag="t", ckpt_path=tmp_path / "t.ckpt", key=key)


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 8, 8, 8], num_classes=10)
    _tiny_fit(tmp_path, model, TrainCfg(epochs=1, lr=0.01))
    good = (tmp_path / "t.ckpt").read_bytes()
    # another recipe (another key: trained afresh) whose absurd learning rate blows the weights up within a few
    # steps: the checkpoint already there is the last good one
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch 1 step \d+; stopped, last good checkpoint kept: .*t\.ckpt"):
        _tiny_fit(tmp_path, model, TrainCfg(epochs=2, lr=1e30, schedule="constant"), key="absurd")
    assert (tmp_path / "t.ckpt").read_bytes() == good


class _OutOfMemory(nn.Module):
    """Raises what CUDA raises when a batch does not fit (this machine has no GPU to fill)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_size(tmp_path):
    with pytest.raises(TrainingError, match="out of memory at data.batch_size=64"):
        _tiny_fit(tmp_path, _OutOfMemory(), TrainCfg(epochs=1))


def test_misspelled_key_suggests_the_closest(tiny_recipe, capsys, tmp_path):
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--set", "train.warmup_epoch=1"])
    assert "train.warmup_epoch" in line and "did you mean 'warmup_epochs'" in line


def test_wrong_range_is_one_line(tiny_recipe, capsys, tmp_path):
    argv = ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "x"), "--set", "data.batch_size=0"]
    assert "data.batch_size" in one_line_error(capsys, argv)


def _image_tree(root: Path, bad: bool) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(40):
                Image.new("RGB", (8, 8), (c * 200, i, 0)).save(root / split / cls / f"{i}.png")
    if bad:
        (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    return root


def test_undecodable_image_fails_with_its_path_or_is_skipped(tiny_recipe, capsys, tmp_path):
    root = _image_tree(tmp_path / "imgs", bad=True)
    argv = ["--recipe", str(tiny_recipe(stages=["train"], train={"epochs": 1}, data={"batch_size": 16})),
            "--out", str(tmp_path / "run"), "--set", "data.kind=imagefolder", "--set", f"data.root={root}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert "broken.png" in one_line_error(capsys, argv)
    assert main([*argv, "--set", "data.bad_images=skip"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["train"]["skipped_images"] == 1


def test_truncated_and_foreign_checkpoints(tiny_recipe, capsys, tmp_path):
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 8, 8, 8], num_classes=10)
    path = tmp_path / "m.pt"
    save_model(model, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    # the file named, damaged, and what to do; not torch's advice to retry with weights_only=False
    assert str(err.value).startswith(f"checkpoint {path} cannot be read: it is damaged or truncated (")
    assert str(err.value).endswith("delete it and rerun the stage that writes it (or copy it again)")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    pickled = tmp_path / "module.pt"
    torch.save(model, pickled)  # a whole module: intact, but a safe load does not run its class
    with pytest.raises(CheckpointError, match=r"holds a pickled repvgg\.model\.RepVGG.*save its state_dict"):
        load_model(pickled)
    foreign = tmp_path / "f.pt"
    torch.save({"features.0.weight": torch.zeros(3)}, foreign)
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--set", f"model.checkpoint={foreign}"])
    assert "features.0.weight" in line


def test_checkpoint_of_another_architecture_names_first_mismatch(tiny_recipe, capsys, tmp_path):
    other = RepVGG([1, 1, 1, 1], widths=[16, 16, 16, 16, 16], num_classes=10)  # the recipe's stage0 is 16, stage1 16
    path = tmp_path / "other.pt"
    save_model(other, path)
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "r"),
                                   "--set", f"model.checkpoint={path}"])
    assert "does not match the recipe's model" in line and "stage2.0.rbr_dense.conv.weight" in line


def test_inspect_describes_checkpoints(tmp_path, capsys):
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 32], num_classes=10).eval()
    save_model(reparameterize(model), tmp_path / "plain.pt")
    assert main(["inspect", str(tmp_path / "plain.pt"), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "plain (inference-time)" in out and "widths: [8, 8, 16, 16, 32]" in out and "FP32" in out
    assert "MACs:" in out and "params:" in out
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2


def test_inspect_describes_onnx_and_int8(tmp_path, capsys):
    from compress.export import export_onnx
    from compress.quant import quantize_model, save_quantized

    plain = reparameterize(RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 32], num_classes=10).eval())
    x = torch.randn(16, 3, 32, 32)
    export_onnx(plain, tmp_path / "plain.onnx", x[:1])
    assert main(["inspect", str(tmp_path / "plain.onnx")]) == 0
    out = capsys.readouterr().out
    assert "conv layers: 5   widths: [8, 8, 16, 16, 32]" in out and "precision: FP32" in out
    qmodel = quantize_model(plain, [(x, None)], x[:1], calibration_size=16)
    export_onnx(qmodel, tmp_path / "int8.onnx", x[:1], int8=True)
    save_quantized(qmodel, tmp_path / "int8.pt", model_record(plain))
    assert main(["inspect", str(tmp_path / "int8.onnx")]) == 0
    out = capsys.readouterr().out
    assert "INT8 (QuantizeLinear/DequantizeLinear)" in out and "widths: [8, 8, 16, 16, 32]" in out
    assert main(["inspect", str(tmp_path / "int8.pt"), "--image-size", "32"]) == 0
    assert "INT8 (NNCF" in capsys.readouterr().out
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == 2


def test_cifar10_batches_missing_is_one_line(tiny_recipe, capsys, tmp_path):
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "x"),
                                   "--set", "data.kind=cifar10", "--set", f"data.root={tmp_path / 'nothing'}"])
    assert "data.download: true" in line and "nothing" in line


def test_evaluation_subsets_of_a_class_sorted_test_set_are_stratified_and_seed_free():
    """An ImageFolder lists its test images class by class: the first 100 of 1,000 would all be class 0."""
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from compress.data import Data, stratified_indices
    from compress.recipe import DataCfg

    labels = torch.arange(10).repeat_interleave(torch.tensor([200, 200, 100, 100, 100, 100, 50, 50, 50, 50]))
    test = TensorDataset(torch.zeros(len(labels), 1), labels)
    for seed in (0, 7):  # the run's seed does not move the evaluation sample
        data = Data(test, test, 10, DataCfg(), seed)
        scored = torch.cat([y for _, y in data.test_loader(limit=100)]).numpy()
        assert np.bincount(scored, minlength=10).tolist() == [20, 20, 10, 10, 10, 10, 5, 5, 5, 5]
        assert data.test_images(100) == Data(test, test, 10, DataCfg(), 0).test_images(100)
    assert data.test_images(None)["images"] == 1000 and data.test_images(100) != data.test_images(99)
    few = np.array([0] * 5 + [1] * 3 + [2] * 2)
    odd = stratified_indices(few, 5)  # quotas 2.5, 1.5, 1: floors 2, 1, 1, the one left to a tied remainder
    assert sorted(odd) == odd and np.bincount(few[odd]).tolist() in ([3, 1, 1], [2, 2, 1])
    assert stratified_indices(few, 5) == odd  # the tie is drawn from the fixed seed


def test_stratified_indices_take_any_class_sizes_and_sample_sizes():
    import numpy as np

    from compress.data import stratified_indices

    one_of_a_class = np.array([0] * 6 + [1] + [2] * 3)  # quotas at n=5: 3, 0.5, 1.5
    picked = stratified_indices(one_of_a_class, 5)
    assert len(set(picked)) == 5 and np.bincount(one_of_a_class[picked], minlength=3).tolist() in ([3, 1, 1], [3, 0, 2])
    ten_classes = np.repeat(np.arange(10), 10)
    fewer_than_classes = stratified_indices(ten_classes, 4)  # a class each for 4 of the 10 tied remainders
    assert np.bincount(ten_classes[fewer_than_classes], minlength=10).tolist().count(1) == 4
    all_but_one = stratified_indices(ten_classes, 99)
    assert len(set(all_but_one)) == 99 and sorted(np.bincount(ten_classes[all_but_one]).tolist()) == [9] + [10] * 9
    assert stratified_indices(ten_classes, 100) == list(range(100))


def test_a_stratified_subset_keys_its_sampling_and_no_subset_keys_nothing_new():
    from compress.recipe import DataCfg, ExportCfg

    assert DataCfg().key_values("evaluation") == {"test_subset": None}  # all images: as before
    assert DataCfg(test_subset=500).key_values("evaluation") == {"test_subset": 500,
                                                                 "test_subset_sampling": "stratified_sklearn"}
    assert ExportCfg(eval_subset=100).key_values("evaluation")["eval_subset_sampling"] == "stratified_sklearn"


def test_recipe_file_errors_keep_the_line(tmp_path, capsys):
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("model:\n  name: RepVGG-A0\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    line = one_line_error(capsys, ["--recipe", str(duplicate), "--dry-run"])
    assert line == f"error: recipe {duplicate}: key 'train.lr' given twice (lines 4 and 6): give it once"
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("model:\n  name: RepVGG-A0\ntrain: {lr: 0.1\n")
    line = one_line_error(capsys, ["--recipe", str(syntax), "--dry-run"])
    assert line.startswith(f"error: recipe {syntax} is not valid YAML: line 4, column 1: expected ',' or '}}'")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# r\xe9glage\nmodel: {name: RepVGG-A0}\n".encode("latin-1"))
    line = one_line_error(capsys, ["--recipe", str(latin1), "--dry-run"])
    assert line == f"error: recipe {latin1} is not UTF-8 text (byte 0xe9 at offset 3): save it as UTF-8"


def test_misspelt_key_two_levels_down_suggests_the_closest(tiny_recipe, capsys):
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--dry-run", "--set", "finetune.distill.alpah=0.5"])
    assert line == "error: unknown recipe key 'finetune.distill.alpah' (did you mean 'alpha'?)"
    # a misspelt section is the error, not the default its absence leaves
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--dry-run", "--set", "modl.name=RepVGG-A0"])
    assert line == "error: unknown recipe key 'modl' (did you mean 'model'?)"


def test_seed_bound_is_what_the_data_loader_seeds_torch_with(tiny_recipe, capsys):
    from compress.recipe.schema import MAX_EPOCHS, MAX_SEED

    torch.Generator().manual_seed(MAX_SEED * 1000 + MAX_EPOCHS - 1)  # the last epoch of the largest seed: taken
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed((MAX_SEED + 1) * 1000 + MAX_EPOCHS - 1)
    assert main(["--recipe", str(tiny_recipe()), "--dry-run", "--set", f"seed={MAX_SEED}"]) == 0
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--dry-run", "--set", f"seed={MAX_SEED + 1}"])
    assert line.startswith("error: recipe key 'seed': Input should be less than or equal to 18446744073709550")


def test_missing_data_root_says_the_layout_and_how_to_fill_it(tiny_recipe, capsys, tmp_path):
    root = tmp_path / "cifar10"
    argv = ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "run"), "--set", "data.kind=imagefolder",
            "--set", f"data.root={root}"]
    line = one_line_error(capsys, argv)
    assert line.startswith(f"error: data.root {root} not found: it must hold train/ and val/ (or test/)")
    assert f"ln -s /path/to/cifar10 {root}" in line and "--set data.root=" in line and "download: true" in line
    (root / "train").mkdir(parents=True)
    assert f"data.root {root} lacks train/ and val/ (or test/)" in one_line_error(capsys, argv)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
