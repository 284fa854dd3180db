"""The learning-rate schedule `fit` steps: torch's schedulers reproduce the per-iteration formula (a linear warm-up,
then a cosine decay to zero or a constant rate) at every step."""

import math

import pytest
import torch

from compress.recipe import FinetuneCfg, OptimCfg, TrainCfg
from compress.train import advance, make_optimizer, make_scheduler


def formula_lr(cfg: OptimCfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The oracle: the rate of iteration `step` (from 0) written out."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


CASES = {
    "no warm-up": (TrainCfg(epochs=3, lr=0.1), 7),
    "fractional warm-up epochs": (TrainCfg(epochs=3, lr=0.1, warmup_epochs=0.5), 7),  # int(3.5): 3 steps
    "one-step warm-up": (TrainCfg(epochs=3, lr=0.1, warmup_epochs=0.2), 5),
    "one epoch, warm-up over all of it": (TrainCfg(epochs=1, lr=0.05, warmup_epochs=1), 10),
    "warm-up over all of training": (TrainCfg(epochs=2, lr=0.1, warmup_epochs=2), 4),
    "several epochs": (TrainCfg(epochs=6, lr=0.2, warmup_epochs=2), 13),
    "one step per epoch": (TrainCfg(epochs=8, lr=0.1, warmup_epochs=1.5), 1),
    "constant": (TrainCfg(epochs=2, lr=0.1, schedule="constant"), 5),
    "constant after warm-up": (TrainCfg(epochs=3, lr=0.1, warmup_epochs=1, schedule="constant"), 4),
    "fine-tune (between prune steps too), adamw": (FinetuneCfg(epochs=4, optimizer="adamw", warmup_epochs=0.5), 9),
    "long": (TrainCfg(epochs=40, lr=0.1, warmup_epochs=5), 97),
}


@pytest.mark.parametrize("cfg, steps_per_epoch", CASES.values(), ids=CASES.keys())
def test_the_schedule_gives_the_formula_rate_at_every_step(cfg, steps_per_epoch):
    optimizer = make_optimizer(torch.nn.Linear(3, 2), cfg)  # two groups: with and without weight decay
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps, steps_per_epoch)
    for step in range(total_steps):
        expected = formula_lr(cfg, step, total_steps, steps_per_epoch)
        # the schedulers multiply step to step: equal up to rounding (a few 1e-12 relative after 50k steps)
        assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(expected, rel=1e-12, abs=1e-15)] * 2
        advance(scheduler)


def test_advancing_without_an_optimizer_step_warns_nothing(recwarn):
    # GradScaler skips the optimizer's step after an FP16 overflow, typically on the very first iteration
    cfg = TrainCfg(epochs=2, warmup_epochs=1)
    scheduler = make_scheduler(make_optimizer(torch.nn.Linear(3, 2), cfg), cfg, 8, 4)
    advance(scheduler, 8)
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
