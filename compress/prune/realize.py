"""Realising a plan: Torch-Pruning prunes the real model to the planned slot widths, its importance picking the
channels.

TP 1.6 prunes grouped (non-depthwise) convs correctly (importance averaged over the conv groups, the same in-group
positions removed from every group, so divisibility and re-parameterization hold), but its `round_to` rounds the
per-group count against the whole layer's channels: steps of groups x round_to, and it may empty a group. Planned
widths are therefore already multiples of lcm(round_to, groups), and the pruner here gets `round_to=None` and one
exact ratio per slot (`pruning_ratio_dict`).

`realize` returns the channels each slot kept (indices into its unpruned channels, from TP's pruning history), which
layer-wise reconstruction (`reconstruct`) needs to know which of the unpruned model's outputs a pruned layer stands in
for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from .importance import accumulate_gradients
from .options import PruneOptions
from .slots import Slot, ignored_layers


def realize(
    model: nn.Module,
    options: PruneOptions,
    example_input: torch.Tensor,
    importance,
    slots: list[Slot],
    widths: tuple[int, ...],
    data: list,
    seed: int,
    between_steps: Callable[[nn.Module, int], None] | None,
    was_training: bool,
) -> list[torch.Tensor]:
    """Prune `model` in place to `widths` over TP's `options.steps` iterative steps, `importance` choosing (its
    gradients re-accumulated from `data` before each later step, `seed` fixing random draws), and
    `between_steps(model, step)` run in `was_training` mode after every step but the last. Returns the channels
    each slot kept, one ascending LongTensor per slot: indices into its unpruned output channels (`arange(init)`
    for a slot left whole), read from TP's pruning history (`kept_channels`)."""
    ratios = {s.convs[0]: s.ratio_for(w) for s, w in zip(slots, widths) if w < s.init}
    if not ratios:
        return [torch.arange(s.init) for s in slots]
    pruner = tp.pruner.BasePruner(
        model,
        example_input,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        max_pruning_ratio=options.max_layer_ratio,
        iterative_steps=options.steps,
        ignored_layers=ignored_layers(model, options),
        round_to=None,  # widths are already rounded (see the module docstring)
    )
    for step in range(options.steps):
        if step and data:
            accumulate_gradients(model, importance, data, example_input.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)
            pruner.step()
        if between_steps is not None and step < options.steps - 1:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            between_steps(model, step)
            model.eval()
    return kept_channels(model, slots, pruner.DG.pruning_history())


def kept_channels(model: nn.Module, slots: list[Slot], history: list) -> list[torch.Tensor]:
    """The unpruned output channels each slot kept, from TP's `history` ([module name, out-channel pruning?,
    removed indices] per pruned group, in the order pruned). Each entry's indices count the channels its slot had
    left when it ran, so they are composed in order over the iterative steps."""
    slot_of = {conv: i for i, s in enumerate(slots) for conv in s.convs}
    kept = [torch.arange(s.init) for s in slots]
    for name, out_channels, removed in history:
        i = slot_of.get(model.get_submodule(name))
        if i is None or not out_channels:
            raise RuntimeError(f"prune: TP pruned {'out' if out_channels else 'in'} channels of {name}, not a slot")
        left = torch.ones(len(kept[i]), dtype=torch.bool)
        left[torch.as_tensor(removed, dtype=torch.long)] = False
        kept[i] = kept[i][left]
    for i, s in enumerate(slots):
        if len(kept[i]) != s.convs[0].out_channels:
            raise RuntimeError(f"prune: slot {i} kept {len(kept[i])} channels by TP's history, "
                               f"has {s.convs[0].out_channels}")
    return kept
