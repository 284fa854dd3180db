"""Channel importance: the criteria `prune.importance` names (`IMPORTANCES`: adding one is adding a line there), the
gradients those that need them read (taylor, hessian), and each slot's channel scores for the budget search.

`HessianImportance` fixes TP 1.6's `HessianImportance.accumulate_grad`, which looks parameter *names* up in a dict
keyed by parameters, so each sample overwrites the last instead of summing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm import tqdm

from .errors import PruneError
from .loss_units import (
    TaylorImportance,
    cached_curves,
    kept_sums,
    sensitivity_curves,
    sensitivity_values,
    taylor_values,
    weights_digest,
)
from .options import PruneOptions
from .slots import Slot


class HessianImportance(tp.importance.HessianImportance):
    """TP's Hessian (OBD) importance with a working per-sample accumulation of squared gradients."""

    def accumulate_grad(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is None:
                continue
            if p in self._accu_grad:
                self._accu_grad[p] += p.grad.detach().pow(2)
                self._counter[p] += 1
            else:
                self._accu_grad[p] = p.grad.detach().pow(2)
                self._counter[p] = 1

    def flush(self) -> None:
        """Leave the mean squared gradient in each `.grad`, where TP's scoring (and copies of it) read it."""
        for p, g in self._accu_grad.items():
            p.grad = g / self._counter[p]
        self.zero_grad()


@dataclass(frozen=True)
class Criterion:
    """A channel-importance criterion: what makes its Torch-Pruning importance (which picks the channels within a
    slot), whether that reads gradients (accumulated from training batches before it scores), whether its scores
    are loss changes, comparable across slots (`loss_units`), and whether the planner reads measured loss curves
    (`measured`: `loss_units.sensitivity_curves`) rather than summed scores."""

    factory: Callable[[], tp.importance.Importance]
    needs_gradients: bool = False
    loss_units: bool = False
    measured: bool = False


# every criterion `prune.importance` may name (the recipe's allowed values are these names)
IMPORTANCES: dict[str, Criterion] = {
    "l1": Criterion(lambda: tp.importance.MagnitudeImportance(p=1)),
    "l2": Criterion(lambda: tp.importance.MagnitudeImportance(p=2)),
    # in loss units (`loss_units`): the squared first-order loss change, and the measured loss increase
    "taylor": Criterion(TaylorImportance, needs_gradients=True, loss_units=True),
    "sensitivity": Criterion(TaylorImportance, needs_gradients=True, loss_units=True, measured=True),
    "hessian": Criterion(HessianImportance, needs_gradients=True),
    "lamp": Criterion(tp.importance.LAMPImportance),
    "random": Criterion(tp.importance.RandomImportance),
}


def criterion(name: str) -> Criterion:
    """The criterion `prune.importance` names, from IMPORTANCES."""
    if name not in IMPORTANCES:
        raise PruneError(f"prune.importance: unknown criterion '{name}'; valid: {', '.join(IMPORTANCES)}")
    return IMPORTANCES[name]


def make_importance(name: str) -> tp.importance.Importance:
    """The Torch-Pruning importance of the criterion `prune.importance` names."""
    return criterion(name).factory()


def gradient_batches(options: PruneOptions, batches: Iterable | None) -> list:
    """The (x, y) batches a gradient-reading criterion reads (`options.gradient_batches` of them); none for the
    others."""
    if not criterion(options.importance).needs_gradients:
        return []
    if batches is None:
        raise PruneError(f"prune.importance={options.importance} needs training batches")
    data = list(itertools.islice(iter(batches), options.gradient_batches))
    if not data:
        raise PruneError(f"prune.importance={options.importance} got no training batches")
    return data


def accumulate_gradients(model: nn.Module, importance, data: list, device: torch.device) -> None:
    """Gradients of the cross-entropy on `data` into `.grad` (eval mode: BN statistics are left alone).
    Hessian: per-sample squared gradients, the way TP's examples feed `accumulate_grad`. Taylor: its per-batch
    scores, computed on the model as it is."""
    if isinstance(importance, TaylorImportance):
        importance.refresh(model, data, device)
        return
    model.zero_grad(set_to_none=True)
    for x, y in data:
        x, y = x.to(device), y.to(device)
        if isinstance(importance, HessianImportance):
            losses = F.cross_entropy(model(x), y, reduction="none")
            for i, loss in enumerate(losses):
                model.zero_grad()
                loss.backward(retain_graph=i < len(losses) - 1)
                importance.accumulate_grad(model)
        else:
            (F.cross_entropy(model(x), y) / len(data)).backward()
    if isinstance(importance, HessianImportance):
        importance.flush()


def kept_importance(model: nn.Module, example_input: torch.Tensor, importance, slots: list[Slot]) -> list[list[float]]:
    """For each slot, the importance its channels keep at each of `slot.choices()`: the sum of the scores of the
    channels TP would keep (the most important in-group positions, scored by their mean over the conv groups as
    TP ranks them, each position standing for `groups` channels). Scores are `importance`'s, normalised per group
    as TP's global ranking compares them."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    kept = []
    for slot in slots:
        group = graph.get_pruning_group(slot.convs[0], tp.prune_conv_out_channels, idxs=list(range(slot.init)))
        scores = importance(group)
        per_position = scores.detach().float().cpu().view(slot.groups, -1).mean(0)
        kept.append([slot.groups * value for value in kept_sums(per_position, slot)])
    return kept


def first_images(batches: Iterable, count: int) -> list:
    """The first `count` images of (x, y) `batches`, as batches (fewer if they run out)."""
    out, n = [], 0
    for x, y in batches:
        if n >= count:
            break
        out.append((x[: count - n], y[: count - n]))
        n += len(out[-1][1])
    return out


def slot_values(model: nn.Module, example_input: torch.Tensor, importance, slots: list[Slot], options: PruneOptions,
                batches: Iterable | None) -> tuple[list[list[float]], dict]:
    """For each slot and each of its widths (`slot.choices()`), the value the budget planner maximises the sum of,
    and what the prune report records about it. Magnitude criteria: the kept channels' scores, normalised per
    group as TP's global ranking compares them (`kept_importance`). Taylor: minus the removed channels' squared
    first-order loss changes. Sensitivity: minus the measured loss increase of cutting that slot alone, its
    curves cached in `options.sensitivity_cache` (progress on stderr while measuring)."""
    chosen = criterion(options.importance)
    if not chosen.loss_units:
        return kept_importance(model, example_input, importance, slots), {"units": "normalised score"}
    if not chosen.measured:
        return taylor_values(importance.slot_scores(slots), slots), {"units": "squared first-order loss change"}
    images = first_images(batches or [], options.sensitivity_images)
    count = sum(len(y) for _, y in images)
    if not count:
        raise PruneError("prune.importance=sensitivity got no images")
    key = {"weights": weights_digest(model), "images": count, "grid": options.sensitivity_grid,
           "fingerprint": round(sum(float(x.double().sum()) for x, _ in images), 3),
           "taylor_batches": options.gradient_batches,
           "slots": [[s.init, s.unit, s.groups, s.prunable] for s in slots]}
    began = time.perf_counter()
    with tqdm(desc="sensitivity", unit="cut", leave=False, mininterval=2) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        curves, reused = cached_curves(options.sensitivity_cache, key, lambda: sensitivity_curves(
            model, slots, importance.slot_scores(slots), images, example_input.device, options.sensitivity_grid,
            progress))
    info = {"units": "loss increase", "images": count, "grid": options.sensitivity_grid, "reused": reused,
            "seconds": round(time.perf_counter() - began, 1), "base_loss": curves["base_loss"]}
    return sensitivity_values(curves, slots), info
