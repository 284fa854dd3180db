"""What `fit` keeps across a resume: the learning-rate schedule, the AMP GradScaler's state, and a fresh evaluation
when nothing is left to train."""

import pytest
import torch

from compress.data import Data, build_data
from compress.env import Env
from compress.files import load_checkpoint, torch_save
from compress.recipe import DataCfg, TrainCfg
from compress.train import evaluate, fit
from repvgg import RepVGG

DATA = DataCfg(image_size=16, augment="none", batch_size=64, train_subset=128)


def _fit(out_dir, epochs: int, data_cfg: DataCfg = DATA, **cfg) -> tuple[RepVGG, dict]:
    """A tiny model fitted in `out_dir`, resuming from its checkpoint when one is there."""
    torch.manual_seed(0)
    model = RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10)
    env = Env(device=torch.device("cpu"), out_dir=out_dir)
    # constant lr unless `cfg` says otherwise: one epoch then a resumed second one train exactly as two epochs in one go
    result = fit(model, TrainCfg(**{"epochs": epochs, "lr": 0.05, "schedule": "constant", **cfg}), build_data(data_cfg), env,
                 tag="t", ckpt_path=out_dir / "t.ckpt", key="k")
    return model, result


def test_fp16_scaler_state_is_checkpointed_and_restored_on_resume(tmp_path):
    # FP16 autocast + GradScaler on the CPU: the code path fit takes on older CUDA, on a machine without a GPU
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    small = DATA.model_copy(update={"image_size": 8, "batch_size": 32, "train_subset": 64})  # FP16 is emulated
    _fit(whole, epochs=2, data_cfg=small, precision="fp16")
    _fit(resumed, epochs=1, data_cfg=small, precision="fp16")
    after_one_epoch = load_checkpoint(resumed / "t.ckpt")["scaler"]
    # it moved (counted its steps, backed off after an FP16 overflow): a fresh one would not go on the same way
    assert after_one_epoch and after_one_epoch != torch.amp.GradScaler("cpu").state_dict()
    _fit(resumed, epochs=2, data_cfg=small, precision="fp16")
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


# a warm-up then a cosine decay: a different rate at every step (4 steps per epoch)
SCHEDULED = {"lr": 0.05, "warmup_epochs": 0.5, "schedule": "cosine"}
SMALL = DATA.model_copy(update={"image_size": 8, "batch_size": 32, "test_subset": 50})


class Killed(Exception):
    """The process stopping between two epochs."""


def _fit_killed_after_one_epoch(out_dir, monkeypatch, data_cfg: DataCfg = SMALL) -> None:
    """A 2-epoch fit stopped after its first epoch's checkpoint."""
    train_loader = Data.train_loader

    def killed_at_epoch_two(self, epoch):
        if epoch == 1:
            raise Killed
        return train_loader(self, epoch)

    with monkeypatch.context() as m:
        m.setattr(Data, "train_loader", killed_at_epoch_two)
        with pytest.raises(Killed):
            _fit(out_dir, epochs=2, data_cfg=data_cfg, **SCHEDULED)


def _same_run(got: dict, expected: dict) -> None:
    assert [h["lr"] for h in got["history"]] == [h["lr"] for h in expected["history"]]
    assert got["scheduler"] == expected["scheduler"]
    assert all(torch.equal(got["model"][k], expected["model"][k]) for k in expected["model"])


def test_a_killed_run_resumes_the_learning_rate_schedule_exactly(tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _fit(whole, epochs=2, data_cfg=SMALL, **SCHEDULED)
    _fit_killed_after_one_epoch(resumed, monkeypatch)
    assert load_checkpoint(resumed / "t.ckpt")["scheduler"]["last_epoch"] == SMALL.train_subset // SMALL.batch_size
    _fit(resumed, epochs=2, data_cfg=SMALL, **SCHEDULED)
    _same_run(load_checkpoint(resumed / "t.ckpt"), load_checkpoint(whole / "t.ckpt"))


def test_a_checkpoint_without_the_schedule_resumes_at_its_step(tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _fit(whole, epochs=2, data_cfg=SMALL, **SCHEDULED)
    _fit_killed_after_one_epoch(resumed, monkeypatch)
    state = load_checkpoint(resumed / "t.ckpt")
    del state["scheduler"]
    for group in state["optimizer"]["param_groups"]:  # as a fit that set the rate before each step left them
        group["lr"] = state["history"][-1]["lr"]
        del group["initial_lr"]
    torch_save(state, resumed / "t.ckpt")
    _fit(resumed, epochs=2, data_cfg=SMALL, **SCHEDULED)
    _same_run(load_checkpoint(resumed / "t.ckpt"), load_checkpoint(whole / "t.ckpt"))


def test_a_resume_with_other_steps_per_epoch_follows_its_own_schedule(tmp_path, monkeypatch):
    # another number of processes shares the same images out into other numbers of steps: here, other batches
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _fit(whole, epochs=2, data_cfg=SMALL, **SCHEDULED)
    _fit_killed_after_one_epoch(resumed, monkeypatch, SMALL.model_copy(update={"batch_size": 16}))
    _fit(resumed, epochs=2, data_cfg=SMALL, **SCHEDULED)
    got, expected = load_checkpoint(resumed / "t.ckpt"), load_checkpoint(whole / "t.ckpt")
    assert got["history"][-1]["lr"] == expected["history"][-1]["lr"]
    assert got["scheduler"] == expected["scheduler"]
