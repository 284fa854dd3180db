"""What `fit` keeps across a resume: the AMP GradScaler's state, and a fresh evaluation when nothing is left to
train."""

import torch

from compress import train
from compress.data import build_data
from compress.env import Env
from compress.files import load_checkpoint
from compress.recipe import DataCfg, TrainCfg
from compress.train import evaluate, fit
from repvgg import RepVGG

DATA = DataCfg(image_size=16, augment="none", batch_size=64, train_subset=128)


def _fit(out_dir, epochs: int, data_cfg: DataCfg = DATA, **cfg) -> tuple[RepVGG, dict]:
    """A tiny model fitted in `out_dir`, resuming from its checkpoint when one is there."""
    torch.manual_seed(0)
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10)
    env = Env(device=torch.device("cpu"), out_dir=out_dir)
    # constant lr: one epoch then a resumed second one train exactly as two epochs in one go
    result = fit(model, TrainCfg(epochs=epochs, lr=0.05, schedule="constant", **cfg), build_data(data_cfg), env,
                 tag="t", ckpt_path=out_dir / "t.ckpt", key="k")
    return model, result


def test_amp_scaler_state_is_checkpointed_and_restored_on_resume(tmp_path, monkeypatch):
    # FP16 autocast + GradScaler on the CPU: the code path fit takes on CUDA, on a machine without a GPU
    monkeypatch.setattr(train, "AMP_DEVICE_TYPES", {"cpu"})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    small = DATA.model_copy(update={"image_size": 8, "batch_size": 32, "train_subset": 64})  # FP16 is emulated
    _fit(whole, epochs=2, data_cfg=small, amp=True)
    _fit(resumed, epochs=1, data_cfg=small, amp=True)
    after_one_epoch = load_checkpoint(resumed / "t.ckpt")["scaler"]
    # it moved (counted its steps, backed off after an FP16 overflow): a fresh one would not go on the same way
    assert after_one_epoch and after_one_epoch != torch.amp.GradScaler("cpu").state_dict()
    _fit(resumed, epochs=2, data_cfg=small, amp=True)
    expected, got = load_checkpoint(whole / "t.ckpt"), load_checkpoint(resumed / "t.ckpt")
    assert got["scaler"] == expected["scaler"]
    assert all(torch.equal(got["model"][k], expected["model"][k]) for k in expected["model"])


def test_resume_with_nothing_left_to_train_evaluates_the_current_test_set(tmp_path):
    _, first = _fit(tmp_path, epochs=1)
    fewer_test_images = DATA.model_copy(update={"test_subset": 100})
    model, again = _fit(tmp_path, epochs=1, data_cfg=fewer_test_images)
    assert again["history"] == first["history"]  # trained once, kept
    now = evaluate(model, build_data(fewer_test_images).test_loader(), torch.device("cpu"))
    assert {k: again[k] for k in ("top1", "top5", "loss")} == now
    assert now["loss"] != first["history"][-1]["loss"]  # a different test set: the old entry would be stale
