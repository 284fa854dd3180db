"""The training loop shared by multi-branch training, fine-tuning and QAT.

One epoch at a time, evaluated after each, checkpointed atomically after each: a killed run resumes from the
last completed epoch and ends with the same weights as an uninterrupted one (data order and augmentation are
reseeded per epoch, see `Data.train_loader`).
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .data import Data
from .env import Env
from .errors import UserError
from .files import load_checkpoint, torch_save
from .recipe import Distill, OptimCfg
from .tensorboard_log import add_scalar
from .train_device import (
    AUTOCAST_DTYPES,
    compiled,
    cpu_bf16_hazard,
    model_convs,
    resolve_channels_last,
    resolve_precision,
)

# TensorBoard gets a training's loss and learning rate every this many steps (and at each epoch's last step), so a
# one-epoch fine-tune or QAT is a curve
LOG_EVERY_STEPS = 10

# what each per-epoch scalar of `fit` holds: (tag suffix, metrics key, description); the step is images seen
EPOCH_SCALARS = (
    ("top1", "top1", "top-1 (%) on the test set after the epoch, in PyTorch; step: training images seen"),
    ("top5", "top5", "top-5 (%) on the test set after the epoch, in PyTorch; step: training images seen"),
    ("test_loss", "loss", "mean cross-entropy on the test set after the epoch; step: training images seen"),
    ("epoch_train_loss", "train_loss", "the epoch's mean training loss; step: training images seen"),
    ("epoch_seconds", "train_seconds", "the epoch's training time (s), its evaluation left out; step: training "
                                       "images seen"),
)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory): said in one line."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, all_reduce: bool = False) -> dict:
    """Top-1 and top-5 (percent) and mean cross-entropy over the whole loader. With `all_reduce`, a collective:
    every process of the default group passes its own shard (`Data.test_loader(shard=True)`) and all of them
    get the numbers of the whole test set."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    model.train(was_training)
    if all_reduce:
        sums = torch.tensor([correct1, correct5, total, loss], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        correct1, correct5, total, loss = sums.tolist()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss / total}


def evaluate_test_set(model: nn.Module, data: Data, env: Env) -> dict:
    """`evaluate` over `data`'s test set: under DDP each rank evaluates its shard and every rank gets the totals,
    so every rank must call it."""
    distributed = env.world_size > 1
    return evaluate(model, data.test_loader(shard=distributed), env.device, all_reduce=distributed)


def param_groups(model: nn.Module, weight_decay: float, bare: frozenset[str] = frozenset()) -> list[dict]:
    """The official recipe: weight decay on conv and linear weights, none on BN parameters and biases. The
    parameters named in `bare` form a third group, stepped without momentum or weight decay (ResRep's compactors)."""
    decay, no_decay, bare_steps = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (bare_steps if name in bare else decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": bare_steps, "weight_decay": 0.0, "momentum": 0.0}] if bare_steps else [])


def make_optimizer(model: nn.Module, cfg: OptimCfg, bare: frozenset[str] = frozenset()) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over `param_groups` (`bare` parameters: SGD only)."""
    groups = param_groups(model, cfg.weight_decay, bare)
    if bare and cfg.optimizer != "sgd":
        raise ValueError("parameters stepped without momentum need optimizer sgd")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimCfg, total_steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-iteration learning rate: a linear warm-up over `cfg.warmup_epochs` (its first step at lr / warm-up
    steps, its last at lr), then a cosine decay to zero at `total_steps` (or the constant lr). Stepped once after
    each iteration, so the optimizer holds the rate of the coming step."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        after = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    else:
        after = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return after
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def lr_sequence(cfg: OptimCfg, steps_per_epoch: int) -> list[float]:
    """The learning rate of each of the `cfg.epochs * steps_per_epoch` steps `fit` takes, as its schedule sets them."""
    total = max(1, steps_per_epoch) * cfg.epochs
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, total, max(1, steps_per_epoch))
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        advance(scheduler)
    return rates


def advance(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int = 1) -> None:
    """`steps` steps of the schedule. GradScaler skips the optimizer's step after an FP16 overflow; the schedule
    still counts it (the loop's iterations set the rate), so torch's warning about a scheduler stepping before its
    optimizer says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"),
                                category=UserWarning)
        for _ in range(steps):
            scheduler.step()


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                      state: dict, step: int) -> None:
    """Load a checkpoint's optimizer and schedule, `step` iterations into training. The schedule's saved state
    is used where it stopped at `step`; otherwise (a checkpoint without it, or one written under another number
    of processes, so another number of steps per epoch) the fresh `scheduler` is advanced to `step`, as an
    uninterrupted run of this shape would be."""
    saved = state.get("scheduler")
    if saved is not None and saved["last_epoch"] == step:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(saved)
        return
    advance(scheduler, step)
    scheduled = [{k: group[k] for k in ("lr", "initial_lr")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # its groups' rates are those of the checkpoint's last step
    for group, rates in zip(optimizer.param_groups, scheduled):
        group.update(rates)


def distill_loss(logits, teacher_logits, targets, distill: Distill, label_smoothing: float) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T)."""
    t = distill.temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return (1 - distill.alpha) * ce + distill.alpha * t * t * kl


def _out_of_memory(tag: str, data: Data) -> TrainingError:
    """The one line for a training that ran out of device memory."""
    return TrainingError(f"[{tag}] CUDA out of memory at data.batch_size={data.cfg.batch_size}; lower it")


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of `model`'s parameters and buffers (BN statistics too, so the average is
    evaluated as it is), updated after each optimizer step with `decay`; None when `decay` is None."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _log_step(writer, tag: str, loss: float, lr: float, images: int) -> None:
    """One training step's loss and learning rate, at `images` training images seen."""
    add_scalar(writer, f"{tag}/train_loss", loss, images, "training loss of one batch, every "
               f"{LOG_EVERY_STEPS} steps and each epoch's last; step: training images seen")
    add_scalar(writer, f"{tag}/lr", lr, images, "learning rate of that step; step: training images seen")


def fit(
    model: nn.Module,
    cfg: OptimCfg,
    data: Data,
    env: Env,
    *,
    tag: str,
    ckpt_path: Path,
    key: str,
    teacher: nn.Module | None = None,
    distill: Distill | None = None,
    before_step: Callable[[int], None] | None = None,
    bare_steps: frozenset[str] = frozenset(),
) -> dict:
    """Train `model` in place for `cfg.epochs`, resuming from `ckpt_path` when it holds the same `key`.

    Returns the last evaluation (made afresh when no epoch was left to train: the test set may differ from the
    checkpoint's) and the per-epoch history. Under DDP every rank calls it, and each evaluates its shard of the
    test set. The checkpoint holds the learning-rate schedule's and the GradScaler's state too. With
    `cfg.ema_decay` it holds the weights' average as well, each epoch evaluates the average, and `model` ends as it.
    Precision and layout follow `compress.train_device` (an `auto` still here is resolved for this model and
    device). `before_step(step)` runs after each backward pass, before the optimizer's step (`step`: 0-based over
    the whole training; FP16 gradients unscaled first), and may change the gradients (ResRep's masks); the
    parameters named in `bare_steps` take plain gradient steps, without momentum or weight decay. TensorBoard gets
    `<tag>/train_loss` and `<tag>/lr` every `LOG_EVERY_STEPS` steps and `EPOCH_SCALARS` per epoch, all with the
    training images seen (over every process) as the step."""
    device_type = env.device.type
    try:
        # only a precision that may become BF16 on this CPU needs the model's conv shapes (a one-image forward)
        may_bf16 = device_type == "cpu" and cfg.precision in ("auto", "bf16")
        hazard = cpu_bf16_hazard(model_convs(model, data.example_input())) if may_bf16 else None
    except torch.cuda.OutOfMemoryError:
        raise _out_of_memory(tag, data) from None
    try:
        autocast_dtype = AUTOCAST_DTYPES[resolve_precision(cfg.precision, device_type, cpu_hazard=hazard)]
    except ValueError as e:
        raise TrainingError(f"[{tag}] {e}") from None
    channels_last = resolve_channels_last(cfg.channels_last, device_type)
    model.to(env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, bare_steps)
    steps_per_epoch = max(1, data.steps_per_epoch())
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = make_scheduler(optimizer, cfg, total_steps, steps_per_epoch)
    # loss scaling for FP16 only: BF16 has FP32's exponent range
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype is torch.float16)
    ema = weight_average(model, cfg.ema_decay)
    history, start = [], 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            restore_optimizer(optimizer, scheduler, state, (state["epoch"] + 1) * steps_per_epoch)
            if state.get("scaler"):  # empty when saved without FP16
                scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            history, start = state["history"], state["epoch"] + 1
            if env.main and start < cfg.epochs:
                print(f"[{tag}] resuming after epoch {start} of {cfg.epochs} from {ckpt_path}", file=sys.stderr)
    if teacher is not None:
        teacher.to(env.device).eval()
    net = model
    if env.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[env.device.index] if env.cuda else None)
    if cfg.compile:
        net = compiled(net, device_type, f"[{tag}]")
    images_per_step = data.cfg.batch_size * env.world_size  # full batches only: the last, incomplete one is dropped
    logged = -1  # the step whose loss and lr TensorBoard has last
    for epoch in range(start, cfg.epochs):
        net.train()
        running, seen, began = 0.0, 0, time.perf_counter()
        step = epoch * steps_per_epoch
        loader = data.train_loader(epoch)
        bar = tqdm(loader, desc=f"{tag} {epoch + 1}/{cfg.epochs}", leave=False, disable=not env.main or None, mininterval=2)
        for i, (x, y) in enumerate(bar):
            lr = optimizer.param_groups[0]["lr"]
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = net(x)
                    if teacher is not None and distill is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        loss = distill_loss(logits.float(), teacher_logits.float(), y, distill, cfg.label_smoothing)
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"[{tag}] loss is {loss.item()} at epoch {epoch + 1} step {i + 1}; "
                        f"stopped, last good checkpoint kept: {ckpt_path if ckpt_path.exists() else 'none yet'}"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if before_step is not None:
                    scaler.unscale_(optimizer)
                    before_step(epoch * steps_per_epoch + i)
                scaler.step(optimizer)
                scaler.update()
                advance(scheduler)
                if ema is not None:
                    ema.update_parameters(model)
            except torch.cuda.OutOfMemoryError:
                raise _out_of_memory(tag, data) from None
            running += loss.item() * len(y)
            seen += len(y)
            step = epoch * steps_per_epoch + i + 1
            if env.main and i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if env.main and env.writer is not None and (step - 1) % LOG_EVERY_STEPS == 0:
                _log_step(env.writer, tag, loss.item(), lr, step * images_per_step)
                logged = step
        if env.main and env.writer is not None and logged != step and seen:  # the epoch's last step: the curve's end
            _log_step(env.writer, tag, loss.item(), lr, step * images_per_step)
            logged = step
        if env.world_size > 1:
            # DDP hands rank 0's buffers to the others at the start of each forward, so the last step left every
            # rank its own BN statistics: evaluate rank 0's model, the one the checkpoint keeps, on every shard
            for buffer in [*model.buffers(), *(() if ema is None else ema.module.buffers())]:
                dist.broadcast(buffer, src=0)
        train_seconds = time.perf_counter() - began  # the epoch's training, its evaluation not included
        metrics = evaluate_test_set(model if ema is None else ema.module, data, env)
        metrics.update(epoch=epoch + 1, train_loss=running / max(1, seen), lr=lr, train_seconds=train_seconds,
                       wall_seconds=time.perf_counter() - began)
        history.append(metrics)
        if env.main:
            if env.writer is not None:
                for suffix, name, description in EPOCH_SCALARS:
                    add_scalar(env.writer, f"{tag}/{suffix}", metrics[name], (epoch + 1) * steps_per_epoch * images_per_step,
                               description)
            print(
                f"[{tag}] epoch {epoch + 1}/{cfg.epochs} train_loss {metrics['train_loss']:.4f} "
                f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} ({train_seconds:.0f} s)",
                file=sys.stderr,
            )
            torch_save(
                {"key": key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
                 **({} if ema is None else {"ema": ema.state_dict()})},
                ckpt_path,
            )
    if ema is not None:  # the stage's model is the average
        model.load_state_dict(ema.module.state_dict())
    model.to(memory_format=torch.contiguous_format)
    final = history[-1] if start < cfg.epochs else evaluate_test_set(model, data, env)
    return {**{k: final[k] for k in ("top1", "top5", "loss")}, "epochs": cfg.epochs, "history": history}
