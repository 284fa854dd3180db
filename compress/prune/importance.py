"""Channel importance: the criteria `prune.importance` names (`IMPORTANCES`: adding one is adding a line there), the
gradients those that need them read (taylor, hessian), and each slot's channel scores for the budget search.

`HessianImportance` fixes TP 1.6's `HessianImportance.accumulate_grad`, which looks parameter *names* up in a dict
keyed by parameters, so each sample overwrites the last instead of summing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .errors import PruneError
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
    """A channel-importance criterion: what makes its Torch-Pruning importance, and whether that reads gradients
    (accumulated from training batches before it scores)."""

    factory: Callable[[], tp.importance.Importance]
    needs_gradients: bool = False


# every criterion `prune.importance` may name (the recipe's allowed values are these names)
IMPORTANCES: dict[str, Criterion] = {
    "l1": Criterion(lambda: tp.importance.MagnitudeImportance(p=1)),
    "l2": Criterion(lambda: tp.importance.MagnitudeImportance(p=2)),
    "taylor": Criterion(tp.importance.TaylorImportance, needs_gradients=True),
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
    Hessian: per-sample squared gradients, the way TP's examples feed `accumulate_grad`."""
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
        per_position = scores.detach().float().cpu().view(slot.groups, -1).mean(0).sort(descending=True).values
        total = torch.cat([per_position.new_zeros(1), per_position.cumsum(0)]) * slot.groups
        kept.append([float(total[w // slot.groups]) for w in slot.choices()])
    return kept
