"""Channel coupling as Torch-Pruning's DependencyGraph sees it: the groups of layers that must be pruned
together. In the multi-branch model the identity adds tie every layer of a stage into one group; in the
plain model each layer is a group of its own."""

from __future__ import annotations

import torch
from torch import nn


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[list[str]]:
    """Each prunable channel group as the names of the convs whose output channels it removes.

    The head is not pruned (its outputs are the classes). No `torch.no_grad()` here: the graph is traced with
    autograd."""
    import torch_pruning as tp  # here, not at import: the model itself must not need Torch-Pruning

    names = {m: n for n, m in model.named_modules()}
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    groups = []
    for group in graph.get_all_groups(ignored_layers=head, root_module_types=[nn.Conv2d]):
        convs = {
            names[dep.target.module]
            for dep, _ in group
            if isinstance(dep.target.module, nn.Conv2d) and dep.handler in (tp.prune_conv_out_channels,)
        }
        groups.append(sorted(convs))
    return groups
