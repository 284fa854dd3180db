"""ResRep (Ding et al., ICCV 2021, "Lossless CNN Channel Pruning via Decoupling Remembering and Forgetting") on a
plain RepVGG: pruning through re-parameterization itself.

1. A compactor, a 1x1 conv without bias initialised to the identity, follows each prunable plain layer's conv (and
   its temporary BN while one is inserted), before its ReLU (`add_compactors`).
2. Training is ordinary SGD on the task loss, except for the masked compactor rows: they lose the task gradient and
   get a group-lasso gradient toward zero (`ResRepSchedule.before_step`). Compactors are stepped without momentum
   or weight decay, and a masked row's lasso step is capped at its norm: a proximal group-lasso step, which lands
   on zero and stays there instead of circling it.
3. The masks are chosen from the compactor rows' L2 norms, globally: the rows of smallest norm are masked, as many
   as bring the cost (MACs or a latency table's milliseconds) under the step's goal, each layer's kept count rounded
   up to a width the prune allows (`prune.round_to`, `min_width`, `max_layer_ratio`). The goal falls linearly from
   the unpruned cost to the target over the mask choices, the last of them at `target_by`; the masks are then held.
4. Afterwards the masked rows are cut and each compactor is folded into its conv, exactly (`merge_compactors`): a
   masked row's output is zero and ReLU keeps it zero, so the cut model computes what the compactor model does with
   those rows zeroed.

The schedule is a fraction of the training's steps (`ResRepOptions`), so it holds at any budget. The lasso
strength cannot: the reference code's 1e-4, at lr 0.01 with momentum, walks a row of norm 1 to zero in about 10^5
steps, which its 480 CIFAR-10 epochs have and a one-epoch fine-tune does not. `lasso: None` therefore sets it from
the budget: twice the strength whose steps take a row of norm 1 to zero over the held stretch (the steps after
`target_by`), 2 / sum(lr), so that a row masked at the last choice is at zero by the middle of that stretch. At
such strengths a subgradient step with momentum would overshoot zero by about lr * lasso / (1 - m)^2, hence the
bare, capped step above. Kept rows get no lasso (the reference adds it to every row): at these strengths it would
shrink them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repvgg import PlainRepVGG

from .cost import ChainMacCost, LatencyCost
from .errors import PruneError
from .options import PruneOptions, default_round_to
from .pruning import size_after, size_before
from .slots import Slot, slots_of


@dataclass(frozen=True)
class ResRepOptions:
    """ResRep's schedule, as fractions of its training's steps: the first mask is chosen after `first_mask`, the
    masks are chosen again every `mask_every` until `target_by`, when the target is met and the masks are held.
    `lasso`: the group-lasso strength on masked rows (None: from the budget, see the module's docstring)."""

    first_mask: float = 0.1
    mask_every: float = 0.05
    target_by: float = 0.5
    lasso: float | None = None

    def __post_init__(self):
        if not 0 <= self.first_mask <= self.target_by < 1:
            raise PruneError(f"prune.resrep: first_mask ({self.first_mask}) <= target_by ({self.target_by}) < 1 "
                             f"must hold (fractions of the training's steps)")
        if not 0 < self.mask_every <= 1:
            raise PruneError(f"prune.resrep.mask_every: {self.mask_every} is not in (0, 1]")


class Compactor(nn.Module):
    """A 1x1 conv without bias, initialised to the identity, and which of its rows (output channels) are kept."""

    def __init__(self, channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        eye = torch.eye(channels, device=device, dtype=dtype)
        self.weight = nn.Parameter(eye.reshape(channels, channels, 1, 1))
        self.register_buffer("mask", torch.ones(channels, dtype=torch.bool, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)

    def row_norms(self) -> torch.Tensor:
        """Each row's L2 norm, on the CPU: ResRep's channel score."""
        return self.weight.detach().flatten(1).float().norm(dim=1).cpu()


def add_compactors(model: PlainRepVGG, slots: Sequence[Slot]) -> list[Compactor | None]:
    """Put a compactor before the ReLU of every prunable layer of `model` (in place): `layer.act` becomes
    compactor -> ReLU, so a temporary BN (`layer.bn`) stays between the conv and the compactor, as ResRep's conv ->
    BN -> compactor. Returns each slot's compactor (None where the slot is not pruned)."""
    compactors = []
    for layer, slot in zip(model.layers, slots):
        if not slot.prunable:
            compactors.append(None)
            continue
        if slot.groups != 1:
            raise PruneError(f"prune.method=resrep: layer {len(compactors)} has grouped convs (groups {slot.groups}); "
                             f"a compactor folds only into dense convs")
        w = layer.conv.weight
        compactor = Compactor(layer.conv.out_channels, device=w.device, dtype=w.dtype)
        layer.act = nn.Sequential(compactor, nn.ReLU())
        compactors.append(compactor)
    return compactors


def compactors_of(model: PlainRepVGG) -> list[Compactor | None]:
    """Each layer's compactor (None where it has none)."""
    return [layer.act[0] if isinstance(layer.act, nn.Sequential) else None for layer in model.layers]


def compactor_weights(model: nn.Module) -> set[str]:
    """The names of `model`'s compactor weights: ResRep steps them without momentum or weight decay."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Compactor)}


@torch.no_grad()
def merge_compactors(model: PlainRepVGG) -> list[int]:
    """Cut every compactor's masked rows and fold the compactor into its conv, in place (any temporary BN folded
    first): conv' = C_kept * conv and bias' = C_kept * bias, and the next layer (or the head) reads only the kept
    channels. Returns the kept channel count of each layer."""
    kept_widths = []
    for i, (layer, compactor) in enumerate(zip(model.layers, compactors_of(model))):
        if compactor is None:
            kept_widths.append(layer.conv.out_channels)
            continue
        if not isinstance(layer.bn, nn.Identity):
            raise RuntimeError(f"merge_compactors: layer {i} still has a temporary BN; fold it first")
        keep = compactor.mask.nonzero().flatten()
        c = compactor.weight[keep, :, 0, 0].double()
        conv = layer.conv
        merged = nn.Conv2d(conv.in_channels, len(keep), 3, conv.stride, 1, bias=True, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        merged.weight.copy_(torch.einsum("km,mchw->kchw", c, conv.weight.double()))
        merged.bias.copy_(c @ conv.bias.double())
        layer.conv, layer.act = merged, nn.ReLU()
        if i + 1 < len(model.layers):
            reader = model.layers[i + 1].conv
            narrowed = nn.Conv2d(len(keep), reader.out_channels, 3, reader.stride, 1, bias=True,
                                 device=reader.weight.device, dtype=reader.weight.dtype)
            narrowed.weight.copy_(reader.weight[:, keep])
            narrowed.bias.copy_(reader.bias)
            model.layers[i + 1].conv = narrowed
        else:
            head = model.linear
            narrowed = nn.Linear(len(keep), head.out_features, device=head.weight.device, dtype=head.weight.dtype)
            narrowed.weight.copy_(head.weight[:, keep])
            narrowed.bias.copy_(head.bias)
            model.linear = narrowed
        kept_widths.append(len(keep))
    return kept_widths


def lasso_for(lrs: Sequence[float], held_from: int) -> float:
    """Twice the group-lasso strength whose plain gradient steps take a row of norm 1 to zero over steps
    `held_from` ... end of the learning rates `lrs` (one per step)."""
    total = sum(lrs[held_from:])
    if total <= 0:
        raise PruneError("prune.resrep: the learning rate is zero over the steps after target_by; no mask could act")
    return 2 / total


class ResRepSchedule:
    """The masks and gradients of one ResRep training whose steps have the learning rates `lrs`: call
    `before_step(step)` after each backward pass, before the optimizer's step (`step`: 0-based over the whole
    training), with the compactors stepped by plain SGD. Masks are chosen at `mask_steps`, for the costs in
    `goals`; `lasso` is the strength in force."""

    def __init__(self, compactors: list[Compactor | None], slots: Sequence[Slot],
                 cost: Callable[[Sequence[int]], float], target: float, target_name: str, options: ResRepOptions,
                 lasso: float, lrs: Sequence[float]):
        self.compactors, self.slots, self.cost, self.target, self.lasso = compactors, slots, cost, target, lasso
        self.target_name, self.lrs = target_name, lrs
        total_steps = len(lrs)
        first = round(options.first_mask * total_steps)
        last = max(first, min(total_steps - 1, round(options.target_by * total_steps)))
        every = max(1, round(options.mask_every * total_steps))
        self.mask_steps = [*range(first, last, every), last]
        before = cost([s.init for s in slots])
        floor = cost([s.choices()[0] for s in slots])
        if floor > target * (1 + 1e-9):
            raise PruneError(f"{target_name} is not reachable: the narrowest widths allowed cost {floor:.4g}, the "
                             f"target {target:.4g}")
        n = len(self.mask_steps)
        self.goals = [before - (before - target) * (k + 1) / n for k in range(n)]
        self.trace: list[dict] = []

    def widths(self) -> list[int]:
        """The slot widths the current masks leave."""
        return [s.init if c is None else int(c.mask.sum()) for s, c in zip(self.slots, self.compactors)]

    def choose_masks(self, goal: float) -> list[int]:
        """Mask the rows of smallest norm, globally, as few as bring the cost to `goal`, every slot's kept count
        rounded up to a width it may take; within a slot, its rows of smallest norm. Returns the widths."""
        norms = [None if c is None else c.row_norms() for c in self.compactors]
        ranked = sorted((float(v), i, r) for i, n in enumerate(norms) if n is not None for r, v in enumerate(n))
        choices = [s.choices() for s in self.slots]

        def widths_for(m: int) -> list[int]:
            masked = [0] * len(self.slots)
            for _, i, _ in ranked[:m]:
                masked[i] += 1
            return [next(w for w in ch if w >= s.init - k) for s, ch, k in zip(self.slots, choices, masked)]

        lo, hi = 0, len(ranked)  # the fewest masked rows whose widths cost at most the goal: cost falls with m
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.cost(widths_for(mid)) <= goal * (1 + 1e-9) else (mid + 1, hi)
        widths = widths_for(lo)
        for compactor, norm, width in zip(self.compactors, norms, widths):
            if compactor is not None:
                mask = torch.zeros_like(compactor.mask)
                mask[norm.argsort(descending=True, stable=True)[:width].to(mask.device)] = True
                compactor.mask.copy_(mask)
        return widths

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """At a mask step, choose the masks; then replace the masked rows' gradient by the lasso's, capped so that
        this step's plain SGD update (learning rate `lrs[step]`) stops at zero."""
        if step in self.mask_steps:
            k = self.mask_steps.index(step)
            widths = self.choose_masks(self.goals[k])
            self.trace.append({"step": step, "goal": self.goals[k], "cost": self.cost(widths), "widths": widths})
        lr = self.lrs[min(step, len(self.lrs) - 1)]
        for compactor in self.compactors:
            if compactor is None or compactor.weight.grad is None or bool(compactor.mask.all()):
                continue
            masked = ~compactor.mask
            w = compactor.weight[masked]
            norms = w.flatten(1).norm(dim=1)
            pull = torch.minimum(torch.full_like(norms, self.lasso), norms / lr) if lr > 0 else torch.zeros_like(norms)
            compactor.weight.grad[masked] = w * (pull / norms.clamp_min(1e-30))[:, None, None, None]

    def masked_norms(self) -> dict:
        """The masked rows' largest norm and the kept rows' median, before the cut: how far the lasso took them."""
        scored = [(c.row_norms(), c.mask.cpu()) for c in self.compactors if c is not None]
        masked = torch.cat([norms[~mask] for norms, mask in scored] or [torch.zeros(0)])
        kept = torch.cat([norms[mask] for norms, mask in scored] or [torch.zeros(0)])
        return {"masked_max": float(masked.max()) if len(masked) else 0.0,
                "kept_median": float(kept.median()) if len(kept) else 0.0}


def resrep_prune(model: PlainRepVGG, options: PruneOptions, resrep: ResRepOptions, example_input: torch.Tensor,
                 train: Callable[[nn.Module, Callable[[int], None]], dict], lrs: Sequence[float],
                 latency_cost: LatencyCost | None = None) -> dict:
    """Prune `model` in place by ResRep to `options.target` (keep_macs; keep_latency or target_ms through
    `latency_cost`): compactors added, `train(model, before_step)` run (it must call `before_step(step)` after
    each backward pass, before the optimizer's step, over the `len(lrs)` steps whose learning rates `lrs` are,
    and step `compactor_weights(model)` by plain SGD), then the masked rows cut and the compactors merged. Returns
    the report the prune stage records (as `prune_model`'s, with ResRep's trace)."""
    if not isinstance(model, PlainRepVGG):
        raise PruneError(f"prune.method=resrep prunes a PlainRepVGG, got a {type(model).__name__}")
    target = options.target
    if target.kind == "channel_ratio":
        raise PruneError("prune.method=resrep meets a cost: give keep_macs, keep_latency or target_ms, not "
                         "channel_ratio")
    round_to = options.round_to or default_round_to(example_input.device.type)
    slots = slots_of(model, options, round_to)
    model.eval()
    size = size_before(model, example_input)
    if target.latency:
        if latency_cost is None:
            raise PruneError(f"{target.name}: ResRep needs the latency table (prune.latency)")
        cost = latency_cost.cost
    else:
        cost = ChainMacCost(model, example_input).summed
    before = cost([s.init for s in slots])
    budget = target.value if target.kind == "target_ms" else target.value * before
    held_from = min(len(lrs) - 1, round(resrep.target_by * len(lrs)))
    lasso = resrep.lasso if resrep.lasso is not None else lasso_for(lrs, held_from)
    compactors = add_compactors(model, slots)
    schedule = ResRepSchedule(compactors, slots, cost, budget, target.name, resrep, lasso, lrs)
    trained = train(model, schedule.before_step)  # a resumed training restores the masks with the weights
    if cost(schedule.widths()) > budget * (1 + 1e-9):
        raise RuntimeError(f"ResRep: the training's masks leave widths {schedule.widths()} above {target.name}: did it "
                           f"run its {len(lrs)} steps?")
    norms = schedule.masked_norms()
    widths = merge_compactors(model)
    model.eval()
    report = {
        **size_after(model, example_input, size, slots, widths), "channel_ratio": None, "round_to": round_to,
        "planner": "resrep",
        "resrep": {"lasso": lasso, "mask_steps": schedule.mask_steps, "trace": schedule.trace,
                   "steps": len(lrs), "top1_before_cut": trained.get("top1"), **norms,
                   "options": {"first_mask": resrep.first_mask, "mask_every": resrep.mask_every,
                               "target_by": resrep.target_by}},
    }
    if target.latency:
        report["latency"] = {"before_ms": before, "budget_ms": budget, "predicted_ms": cost(widths),
                             "table": latency_cost.table.summary()}
    return report
