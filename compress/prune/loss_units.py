"""Importance in loss units, comparable across layers: what removing channels costs the training loss.

- `TaylorImportance` (`prune.importance: taylor`): the first-order estimate of the loss change from removing a
  channel, i.e. setting its activation to zero: dL = -sum(a * dL/da) over the batch and the positions of every
  output that carries the channel (all blocks of a multi-branch stage). Following Molchanov et al. 2019
  ("Importance Estimation for Neural Network Pruning"), it is squared per batch and averaged over batches, so that
  signs that cancel in the mean gradient of a trained model (whose mean gradient is near zero) still count. Not
  normalised per layer: a score means the same loss change in every slot.
- `sensitivity_curves` (`prune.importance: sensitivity`): measured, not estimated. Each slot alone is cut to each
  width of a grid, keeping the channels its Taylor scores rank highest, and the loss increase on a sample of
  training images is recorded. The planner interpolates the curves between grid widths.

The planner adds the slots' values (`slot_values`): minus the summed loss increase of a plan. That is exact to first
order, which is what the loss change of a trained model is near its minimum when each cut is small; it breaks when
many slots are cut hard at once, where the errors compound through the following layers and the joint loss rises
more than the sum (the prune report gives the measured loss of the plan beside the predicted sum).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from repvgg import PlainRepVGG

from .slots import Slot, width_axis


def slot_outputs(model: nn.Module) -> list[list[nn.Module]]:
    """For each slot, in order, the modules whose outputs carry its channels (after the ReLU): a plain layer, or
    every block of a multi-branch stage (its identity adds carry the channels through)."""
    if isinstance(model, PlainRepVGG):
        return [[layer] for layer in model.layers]
    return [[model.stage0], *(list(getattr(model, f"stage{s}")) for s in range(1, 5))]


def taylor_scores(model: nn.Module, batches: Iterable, device: torch.device) -> list[torch.Tensor]:
    """Per slot, per output channel: the mean over `batches` of (sum a * dL/da)^2, the squared first-order loss
    change of zeroing the channel (module docstring). The model's parameter gradients are left cleared."""
    outputs = slot_outputs(model)
    captured: dict[int, list[torch.Tensor]] = {}

    def keep(i):
        def hook(_module, _inputs, out):
            out.retain_grad()
            captured.setdefault(i, []).append(out)
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, mods in enumerate(outputs) for m in mods]
    scores = [torch.zeros(output_conv(mods[0]).out_channels, dtype=torch.float64) for mods in outputs]
    n = 0
    try:
        with torch.enable_grad():
            for x, y in batches:
                captured.clear()
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                for i, outs in captured.items():
                    change = sum((a * a.grad).sum(dim=(0, 2, 3)) for a in outs)
                    scores[i] += change.detach().double().cpu() ** 2
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [s / max(n, 1) for s in scores]


def output_conv(module: nn.Module) -> nn.Conv2d:
    """The 3x3 conv writing a plain layer's or a block's output channels."""
    return module.conv if hasattr(module, "conv") else module.rbr_dense.conv


class TaylorImportance(tp.importance.Importance):
    """Torch-Pruning importance from `taylor_scores`, so that realising a plan removes the lowest-scored channels.
    `refresh` recomputes the scores on the model as it is (before each iterative step)."""

    def __init__(self):
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def refresh(self, model: nn.Module, batches: list, device: torch.device) -> None:
        per_slot = taylor_scores(model, batches, device)
        self.scores = {output_conv(m): s for mods, s in zip(slot_outputs(model), per_slot) for m in mods}

    def slot_scores(self, slots: list[Slot]) -> list[torch.Tensor]:
        """The scores of each slot's channels, as the last `refresh` left them."""
        return [self.scores[slot.convs[0]] for slot in slots]

    def __call__(self, group) -> torch.Tensor | None:
        for dep, idxs in group:  # the group's score is its output conv's channels' scores
            score = self.scores.get(dep.target.module)
            if score is not None and dep.handler == tp.prune_conv_out_channels:
                return score[torch.as_tensor(idxs)].float()
        return None


def positions(score: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A slot's channel scores summed over its conv groups: pruning removes the same in-group positions from each."""
    return score.view(slot.groups, -1).sum(0)


def kept_sums(per_position: torch.Tensor, slot: Slot) -> list[float]:
    """For each of the slot's widths (`slot.choices()`), the summed score of the in-group positions it keeps: the
    width // groups highest of `per_position`."""
    ranked = per_position.sort(descending=True).values
    kept = torch.cat([ranked.new_zeros(1), ranked.cumsum(0)])
    return [float(kept[w // slot.groups]) for w in slot.choices()]


def taylor_values(scores: list[torch.Tensor], slots: list[Slot]) -> list[list[float]]:
    """For each slot and each of its widths: minus the summed score of the channels that width removes."""
    values = []
    for score, slot in zip(scores, slots):
        per_position = positions(score, slot)
        total = float(per_position.sum())
        values.append([kept - total for kept in kept_sums(per_position, slot)])
    return values


def grid_widths(slot: Slot, points: int) -> list[int]:
    """Up to `points` widths of the slot's unit, spread from one unit to all its channels: not bounded by the
    floors (`min_width`, `max_layer_ratio`), so that curves measured once serve any floor."""
    choices = width_axis(slot.init, slot.unit)
    picks = np.unique(np.linspace(0, len(choices) - 1, min(points, len(choices))).round().astype(int))
    return [choices[i] for i in picks]


def mean_loss(model: nn.Module, batches: list, device: torch.device) -> float:
    """The cross-entropy over `batches`, image-weighted."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum"))
            n += len(y)
    return total / n


def sensitivity_curves(model: nn.Module, slots: list[Slot], scores: list[torch.Tensor], batches: list,
                       device: torch.device, points: int, progress: Callable[[int, int], None] | None = None,
                       ) -> dict:
    """Per slot: the loss increase on `batches` when that slot alone keeps each width of `grid_widths`, the
    channels kept being its highest Taylor `scores`. `progress(done, total)` after each measurement."""
    outputs = slot_outputs(model)
    base = mean_loss(model, batches, device)
    grids = [grid_widths(s, points) if s.prunable else [s.init] for s in slots]
    total, done = sum(len(g) - 1 for g in grids), 0
    curves = []
    for slot, mods, score, grid in zip(slots, outputs, scores, grids):
        order = positions(score, slot).argsort(descending=True)
        increase = []
        for width in grid[:-1]:
            mask = torch.zeros(slot.init // slot.groups, device=device)
            mask[order[: width // slot.groups].to(device)] = 1
            mask = mask.repeat(slot.groups).view(1, -1, 1, 1)
            handles = [m.register_forward_hook(lambda _m, _i, out, keep=mask: out * keep) for m in mods]
            try:
                increase.append(mean_loss(model, batches, device) - base)
            finally:
                for h in handles:
                    h.remove()
            done += 1
            if progress is not None:
                progress(done, total)
        curves.append({"widths": grid, "loss_increase": [*increase, 0.0]})
    return {"base_loss": base, "images": sum(len(y) for _, y in batches), "curves": curves}


def sensitivity_values(curves: dict, slots: list[Slot]) -> list[list[float]]:
    """For each slot and each of its widths: minus the loss increase, interpolated linearly between grid widths,
    made non-decreasing with width (a wider slot keeps the narrower one's channels, so it can lose no more; a
    narrower width measured cheaper is noise), plus a slope far below any measurable loss change (1e-6 of the
    loss per slot), so that where the curve is flat the plan keeps channels rather than leave budget unspent."""
    values = []
    for curve, slot in zip(curves["curves"], slots):
        widths = np.asarray(slot.choices(), dtype=np.float64)
        v = -np.interp(widths, curve["widths"], curve["loss_increase"])
        values.append((np.maximum.accumulate(v) + 1e-6 * curves["base_loss"] * widths / slot.init).tolist())
    return values


def weights_digest(model: nn.Module) -> str:
    """A hash of the model's weights and buffers: what identifies the model the curves were measured on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_curves(path: Path | None, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The curves stored in the file `path` under `key` (one file holds any number of keys), else computed and
    added to it. Returns (curves, reused)."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stored = json.loads(path.read_text()) if path is not None and path.exists() else {}
    if name in stored:
        return stored[name]["curves"], True
    curves = compute()
    if path is not None:
        stored[name] = {"key": key, "curves": curves}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(path)
    return curves, False
