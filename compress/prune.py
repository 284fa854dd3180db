"""Structured channel pruning of RepVGG with Torch-Pruning (TP), to a MAC budget or a channel ratio.

How a prune runs:

1. *Plan* the output width of every prunable channel group ("slot": a plain layer, or a multi-branch stage whose
   identity adds tie its blocks together). `scope=local` gives every slot the same ratio; `scope=global` (or
   `isomorphic`) lets a TP pruner rank all channels with the chosen importance, queried in interactive mode so
   nothing is pruned while planning. Widths are then floored to multiples of `round_to` (and of the conv
   groups), never below `max_layer_ratio`, as TP's own `round_to` does for ungrouped layers.
2. *Search* the ratio by bisection so the planned architecture keeps `keep_macs` of the MACs (counted by
   `tp.utils.count_ops_and_params` on an uninitialised copy built with the planned widths). When rounding makes
   the MACs jump over the ±2% window, single slots are rounded the other way one unit at a time, those whose
   unrounded width lies nearest that way first (largest-remainder rounding), until the MACs are inside.
3. *Realize* the plan on the real model with a TP pruner given one exact ratio per slot
   (`pruning_ratio_dict`), TP's `iterative_steps` and the same importance, which picks the channels.

What Torch-Pruning 1.6 does that this works around:
- In a single step it ignores `max_pruning_ratio` (only checked before a step), so a global ranking can strip
  a layer; a layer it would empty is skipped altogether. Planning protects each slot's `max_layer_ratio` share.
- Grouped (non-depthwise) convs are pruned correctly (importance averaged over the conv groups, the same
  in-group positions removed from every group, so divisibility and re-parameterization hold), but its
  `round_to` rounds the per-group count against the whole layer's channels: steps of groups x round_to, and
  it may empty a group. Widths are therefore rounded here, to multiples of lcm(round_to, groups), and the
  realizing pruner gets `round_to=None`.
- `HessianImportance.accumulate_grad` looks parameter *names* up in a dict keyed by parameters, so each sample
  overwrites the last instead of summing; `_HessianImportance` fixes the accumulation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress.data import split_batch
from compress.recipe import PruneCfg, default_round_to
from repvgg import LayerSpec, PlainRepVGG, RepVGG, channel_groups, fuse_bn

TOLERANCE = 0.02  # |macs_after / macs_before - keep_macs| allowed
_PROTECTED = 1e6  # added to the importance of channels a slot must keep: ranked after every other channel
_NEEDS_GRADIENTS = ("taylor", "hessian")


class _HessianImportance(tp.importance.HessianImportance):
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


def make_importance(name: str):
    """The Torch-Pruning importance criterion for `prune.importance`."""
    factories = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": tp.importance.TaylorImportance,
        "hessian": _HessianImportance,
        "lamp": tp.importance.LAMPImportance,
        "random": tp.importance.RandomImportance,
    }
    if name not in factories:
        raise ValueError(f"prune.importance: unknown criterion '{name}'; valid: {', '.join(factories)}")
    return factories[name]()


@dataclass(eq=False)
class _Slot:
    """One prunable channel group: the convs writing these channels and the widths they may take."""

    convs: list[nn.Conv2d]
    init: int  # width before pruning
    groups: int  # conv groups touching these channels: pruning stays symmetric over them
    unit: int  # widths are multiples of this: lcm(round_to, groups)
    min_width: int  # max_layer_ratio, rounded up to a unit
    prunable: bool

    def legal(self, width: int) -> int:
        """Floor to a unit (as TP's round_to), never below `min_width`; an untouched slot keeps its width."""
        if not self.prunable or width >= self.init:
            return self.init
        return max(self.min_width, width // self.unit * self.unit)

    def step(self, width: int, direction: int) -> int | None:
        """The next legal width below (direction -1) or above (+1) `width`, None at the end of the range."""
        if not self.prunable:
            return None
        if direction < 0:
            nxt = (width - 1) // self.unit * self.unit
            return nxt if nxt >= self.min_width else None
        nxt = width // self.unit * self.unit + self.unit
        return min(nxt, self.init) if width < self.init else None

    def ratio_for(self, width: int) -> float:
        """TP pruning ratio that leaves exactly `width` channels (TP counts per conv group and truncates)."""
        per_group = self.init // self.groups
        return 1.0 - (width // self.groups + 0.5) / per_group


def _slots(model: nn.Module, cfg: PruneCfg, round_to: int) -> list[_Slot]:
    if isinstance(model, PlainRepVGG):
        convs = [[layer.conv] for layer in model.layers]
        # a plain layer's channels are read by the next layer's conv
        readers = [[layer.conv] for layer in model.layers[1:]] + [[]]
    else:
        stages = [[model.stage0], *(list(getattr(model, f"stage{s}")) for s in range(1, 5))]
        convs = [[c for b in blocks for c in (b.rbr_dense.conv, b.rbr_1x1.conv)] for blocks in stages]
        readers = [[blocks[0].rbr_dense.conv] for blocks in stages[1:]] + [[]]
    slots = []
    for i, (own, read) in enumerate(zip(convs, readers)):
        init = own[0].out_channels
        conv_groups = {c.groups for c in own + read}
        groups = math.lcm(*conv_groups)
        if groups != max(conv_groups):  # TP removes the same positions from max(groups) equal chunks
            raise ValueError(f"prune: convs sharing channels have groups {sorted(conv_groups)}, which do not nest")
        unit = math.lcm(round_to, groups)
        floor = math.ceil(round(init * (1 - cfg.max_layer_ratio), 6))
        min_width = min(init, max(unit, -(-floor // unit) * unit))
        prunable = (i > 0 or cfg.prune_first_layer) and min_width < init
        slots.append(_Slot(own, init, groups, unit, min_width, prunable))
    return slots


class _Protect:
    """Wraps a TP importance: the `min_width` most important channels of each slot rank after all others, so
    the global ranking cannot push a slot past `max_layer_ratio` nor empty it (TP would then skip it)."""

    def __init__(self, base, slot_of: dict[nn.Module, _Slot]):
        self.base, self.slot_of = base, slot_of

    def __call__(self, group):
        imp = self.base(group)
        slot = self.slot_of.get(group[0].dep.target.module)
        if imp is None or slot is None or imp.numel() % slot.groups:
            return imp
        per_group = imp.view(slot.groups, -1).mean(0)  # TP ranks the mean over conv groups
        keep = min(slot.min_width // slot.groups, per_group.numel())
        boost = torch.zeros_like(per_group)
        boost[per_group.topk(keep).indices] = _PROTECTED
        return imp + boost.repeat(slot.groups)


def _ignored(model: nn.Module, cfg: PruneCfg) -> list[nn.Module]:
    """The head's outputs are the classes; the first layer reads the image and is kept unless asked."""
    if cfg.prune_first_layer:
        return [model.linear]
    return [model.linear, model.layers[0] if isinstance(model, PlainRepVGG) else model.stage0]


def _layer_widths(model: nn.Module) -> list[int]:
    if isinstance(model, PlainRepVGG):
        return model.widths()
    return [b.spec.out_channels for b in model.blocks()]


def _slot_widths(slots: list[_Slot]) -> tuple[int, ...]:
    return tuple(s.convs[0].out_channels for s in slots)


def _architecture(model: nn.Module, widths: tuple[int, ...]) -> nn.Module:
    """An uninitialised model like `model` whose slots have `widths` (only its shapes matter)."""
    with torch.device("meta"):
        if isinstance(model, PlainRepVGG):
            specs, cin = [], model.layers[0].conv.in_channels
            for spec, width in zip(model.layer_specs(), widths):
                specs.append(LayerSpec(cin, width, spec.stride, spec.groups))
                cin = width
            arch = PlainRepVGG(specs, model.linear.out_features)
            for layer, src in zip(arch.layers, model.layers):
                if isinstance(src.bn, nn.BatchNorm2d):
                    layer.bn = nn.BatchNorm2d(layer.conv.out_channels)
        else:
            arch = RepVGG(**{**model.config(), "widths": list(widths)})
    return arch


class _MacCounter:
    """MACs of planned architectures, memoised by their slot widths."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model, self.example_input, self.cache = model, example_input, {}

    def __call__(self, widths: tuple[int, ...]) -> float:
        if widths not in self.cache:
            arch = _architecture(self.model, widths).to_empty(device=self.example_input.device).eval()
            self.cache[widths] = float(tp.utils.count_ops_and_params(arch, self.example_input)[0])
        return self.cache[widths]


class _Planner:
    """Slot widths for a pruning ratio: uniform for local scope, TP's (global / isomorphic) ranking otherwise."""

    def __init__(self, model, example_input, importance, slots, cfg: PruneCfg, seed: int):
        self.slots, self.seed = slots, seed
        self.pruner = None
        prunable = [s for s in slots if s.prunable]
        if cfg.scope == "global" or cfg.isomorphic:
            slot_of = {c: s for s in prunable for c in s.convs}
            frozen = [c for s in slots if not s.prunable for c in s.convs]
            self.pruner = tp.pruner.BasePruner(
                model,
                example_input,
                importance=_Protect(importance, slot_of),
                global_pruning=cfg.scope == "global",
                pruning_ratio=0.0,
                max_pruning_ratio=cfg.max_layer_ratio,
                ignored_layers=_ignored(model, cfg) + frozen,
                round_to=None,
                isomorphic=cfg.isomorphic,
            )
            # beyond this global ratio the ranking would reach protected channels
            total = sum(s.init // s.groups for s in prunable)
            kept = sum(s.min_width // s.groups for s in prunable)
            self.max_ratio = 1.0 - (kept + 0.5) / total if total else 0.0
        else:
            self.max_ratio = cfg.max_layer_ratio

    def raw(self, ratio: float) -> list[int]:
        """Widths before rounding: what the ranking (or the uniform ratio) leaves of each slot."""
        if self.pruner is None:
            return [s.groups * int(s.init // s.groups * (1 - ratio)) for s in self.slots]
        slot_of = {c: i for i, s in enumerate(self.slots) for c in s.convs}
        widths = [s.init for s in self.slots]
        self.pruner.reset()
        self.pruner.per_step_pruning_ratio = tp.pruner.algorithms.scheduler.linear_scheduler(ratio, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # random importance: the same draw for every ratio
            for group in self.pruner.step(interactive=True):
                dep, idxs = group[0]
                i = slot_of[dep.target.module]
                widths[i] = self.slots[i].init - len(idxs)
        return widths

    def __call__(self, ratio: float) -> tuple[int, ...]:
        return tuple(s.legal(w) for s, w in zip(self.slots, self.raw(ratio)))


def _search(plan: _Planner, count: _MacCounter, target: float, macs_before: float, cfg, round_to):
    """Slot widths keeping `target` of the MACs within TOLERANCE, and the pruning ratio they come from."""

    def keep(widths: tuple[int, ...]) -> float:
        return count(widths) / macs_before

    def error(widths: tuple[int, ...]) -> float:
        return abs(keep(widths) - target)

    lo, hi = 0.0, plan.max_ratio
    above, below = plan(lo), plan(hi)
    if keep(below) > target:  # even the most pruning the ratio allows keeps too much
        lo, above, below = hi, below, None
    # no plan changes within half a channel of the ratio: TP counts whole channels per conv group
    resolution = 0.5 / max(1, sum(s.init // s.groups for s in plan.slots if s.prunable))
    while below is not None and hi - lo > resolution and min(error(above), error(below)) > TOLERANCE / 4:
        mid = (lo + hi) / 2
        w = plan(mid)
        if keep(w) > target:
            lo, above = mid, w
        else:
            hi, below = mid, w
    found = [(above, lo)] + ([(below, hi)] if below is not None else [])
    if min(error(w) for w, _ in found) > TOLERANCE / 2:
        # rounding jumps over the window: round single slots the other way, closest to the ranking first
        for ratio, direction in ((hi, 1), (lo, -1)) if below is not None else ((lo, -1),):
            start = plan(ratio)
            refined = _round_into_window(start, plan.raw(ratio), direction, plan.slots, keep, target)
            if refined is not None:
                found.append((refined, ratio))
                break
    best, ratio = min(found, key=lambda f: error(f[0]))
    if error(best) > TOLERANCE:
        raise ValueError(
            f"prune.keep_macs={target} is not reachable within ±{TOLERANCE:.0%}: closest is {keep(best):.3f} "
            f"(round_to={round_to}, max_layer_ratio={cfg.max_layer_ratio}); change one of those or keep_macs"
        )
    return best, ratio


def _round_into_window(start, raw, direction, slots, keep, target):
    """From `start` (below the target for direction +1, above for -1) move single slots one unit at a time,
    those whose unrounded width `raw` is furthest the moving way first (largest-remainder rounding), skipping
    moves that jump past the window, until the MACs are within TOLERANCE / 2 of the target."""
    widths = list(start)
    for _ in range(sum(s.init // s.unit + 1 for s in slots)):
        if abs(keep(tuple(widths)) - target) <= TOLERANCE / 2:
            return tuple(widths)
        order = sorted(range(len(slots)), key=lambda i: -(raw[i] - widths[i]) * direction / slots[i].unit)
        for i in order:
            nxt = slots[i].step(widths[i], direction)
            if nxt is None:
                continue
            cand = tuple(widths[:i] + [nxt] + widths[i + 1 :])
            if (keep(cand) - target) * direction <= TOLERANCE / 2:  # not past the window
                widths = list(cand)
                break
        else:
            return None
    return None


def _gradient_source(cfg: PruneCfg, batches):
    if cfg.importance not in _NEEDS_GRADIENTS:
        return []
    if batches is None:
        raise ValueError(f"prune.importance={cfg.importance} needs training batches")
    data = list(itertools.islice(iter(batches), cfg.gradient_batches))
    if not data:
        raise ValueError(f"prune.importance={cfg.importance} got no training batches")
    return data


def _accumulate_gradients(model: nn.Module, importance, data, device) -> None:
    """Gradients of the cross-entropy on `data` into `.grad` (eval mode: BN statistics are left alone).
    Hessian: per-sample squared gradients, the way TP's examples feed `accumulate_grad`."""
    model.zero_grad(set_to_none=True)
    for x, y in data:
        x, y = x.to(device), y.to(device)
        if isinstance(importance, _HessianImportance):
            losses = F.cross_entropy(model(x), y, reduction="none")
            for i, loss in enumerate(losses):
                model.zero_grad()
                loss.backward(retain_graph=i < len(losses) - 1)
                importance.accumulate_grad(model)
        else:
            (F.cross_entropy(model(x), y) / len(data)).backward()
    if isinstance(importance, _HessianImportance):
        importance.flush()


def _check_mode(model: nn.Module, cfg: PruneCfg) -> None:
    want = PlainRepVGG if cfg.mode == "plain" else RepVGG
    if not isinstance(model, want):
        raise ValueError(f"prune.mode={cfg.mode} needs a {want.__name__}, got a {type(model).__name__}")


def prune_model(
    model: nn.Module,
    cfg: PruneCfg,
    example_input: torch.Tensor,
    batches: Iterable | None = None,
    between_steps: Callable[[nn.Module, int], None] | None = None,
) -> dict:
    """Prune `model` in place (a PlainRepVGG for mode=plain, a training-time RepVGG for mode=multibranch).

    `batches` ((x, y) pairs) feed taylor / hessian importance: `cfg.gradient_batches` of them. With
    `cfg.steps` > 1 the channels go over TP's iterative steps and `between_steps(model, i)` runs after step i
    (0-based) of every step but the last (the fine-tune stage follows the last); it must leave the
    architecture as it found it (fold any BN it inserted). Returns the report (MACs, params, widths, ...)."""
    _check_mode(model, cfg)
    data = _gradient_source(cfg, batches)
    round_to = cfg.round_to or default_round_to(example_input.device.type)
    was_training = model.training
    model.eval()
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(model, example_input)
        widths_before = _layer_widths(model)
        n_groups = len(channel_groups(model, example_input))
        importance = make_importance(cfg.importance)
        slots = _slots(model, cfg, round_to)
        count = _MacCounter(model, example_input)
        if data:
            _accumulate_gradients(model, importance, data, example_input.device)
        seed = int(torch.randint(2**31 - 1, ()))
        plan = _Planner(model, example_input, importance, slots, cfg, seed)
        if cfg.keep_macs is not None:
            widths, ratio = _search(plan, count, cfg.keep_macs, macs_before, cfg, round_to)
        else:
            ratio = cfg.channel_ratio
            widths = plan(min(ratio, plan.max_ratio))
        del plan
        _realize(model, cfg, example_input, importance, slots, widths, data, seed, between_steps, was_training)
        macs_after, params_after = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if _slot_widths(slots) != widths or macs_after != count(widths):  # e.g. between_steps left a BN inserted
        raise RuntimeError(
            f"pruning did not realize its plan: widths {_slot_widths(slots)} for {widths}, "
            f"{macs_after:.0f} MACs for {count(widths):.0f}"
        )
    prunable = [i for i, s in enumerate(slots) if s.prunable] or range(len(slots))
    return {
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "widths_before": widths_before,
        "widths_after": _layer_widths(model),
        "groups": n_groups,
        "keep_macs_achieved": macs_after / macs_before,
        "channel_ratio": ratio,
        "channels_removed": 1 - sum(widths[i] for i in prunable) / sum(slots[i].init for i in prunable),
        "round_to": round_to,
    }


def _realize(model, cfg, example_input, importance, slots, widths, data, seed, between_steps, was_training):
    """Prune to `widths` with TP: one exact ratio per slot, TP's iterative steps, `importance` choosing."""
    ratios = {s.convs[0]: s.ratio_for(w) for s, w in zip(slots, widths) if w < s.init}
    if not ratios:
        return
    pruner = tp.pruner.BasePruner(
        model,
        example_input,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        max_pruning_ratio=cfg.max_layer_ratio,
        iterative_steps=cfg.steps,
        ignored_layers=_ignored(model, cfg),
        round_to=None,  # widths are already rounded (see the module docstring)
    )
    for step in range(cfg.steps):
        if step and data:
            _accumulate_gradients(model, importance, data, example_input.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)
            pruner.step()
        if between_steps is not None and step < cfg.steps - 1:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            between_steps(model, step)
            model.eval()


@torch.no_grad()
def insert_bn(model: PlainRepVGG, batches: Iterable, max_batches: int | None = None) -> PlainRepVGG:
    """Give every plain layer a BatchNorm2d initialised from the statistics of its conv outputs over `batches`
    ((x, y) pairs or bare inputs): the conv is standardised by the per-channel mean and std of its outputs and
    the BN's weight/bias put std and mean back, so the model computes exactly what it did in eval mode until
    training moves it."""
    if not isinstance(model, PlainRepVGG):
        raise TypeError(f"insert_bn needs a PlainRepVGG, got a {type(model).__name__}")
    convs = [layer.conv for layer in model.layers]
    sums = {c: torch.zeros(c.out_channels, dtype=torch.float64, device=c.weight.device) for c in convs}
    squares = {c: s.clone() for c, s in sums.items()}
    counts = dict.fromkeys(convs, 0)

    def record(conv, _inputs, out):
        out = out.detach().double().transpose(0, 1).flatten(1)
        sums[conv] += out.sum(1)
        squares[conv] += out.pow(2).sum(1)
        counts[conv] += out.shape[1]

    was_training = model.training
    model.eval()
    hooks = [c.register_forward_hook(record) for c in convs]
    try:
        for batch in itertools.islice(iter(batches), max_batches):
            model(split_batch(batch)[0].to(convs[0].weight.device))
    finally:
        for h in hooks:
            h.remove()
    if not counts[convs[0]]:
        raise ValueError("insert_bn got no batches")
    with torch.no_grad():
        for layer in model.layers:
            conv, n = layer.conv, counts[layer.conv]
            mean = sums[conv] / n
            var = (squares[conv] / n - mean.pow(2)).clamp_min(0)
            bn = nn.BatchNorm2d(conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
            sigma = (var + bn.eps).sqrt().to(conv.weight.dtype)
            mean = mean.to(conv.weight.dtype)
            # Standardise the conv (unit-variance, zero-mean outputs) and let the BN restore the scale and shift:
            # the conv weights then sit at the scale BN-trained convs have, so the learning rate means what it
            # means for the training-time model. A BN after a conv of arbitrary scale trains badly (its
            # gradients scale with 1/sigma).
            conv.weight.div_(sigma.reshape(-1, 1, 1, 1))
            conv.bias.sub_(mean).div_(sigma)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.copy_(sigma * (1 + bn.eps) ** 0.5)
            bn.bias.copy_(mean)
            layer.bn = bn
    return model.train(was_training)


@torch.no_grad()
def fold_bn(model: PlainRepVGG) -> PlainRepVGG:
    """Fold each plain layer's BatchNorm (eval-mode statistics) into its conv and put nn.Identity back."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer.bn, nn.Identity):
            continue
        if not isinstance(layer.bn, nn.BatchNorm2d):
            raise TypeError(f"layer {i}: cannot fold a {type(layer.bn).__name__}")
        conv = layer.conv
        kernel, bias = fuse_bn(conv.weight, layer.bn)
        scaled_conv_bias, _ = fuse_bn(conv.bias.reshape(-1, 1, 1, 1), layer.bn)  # BN scales the conv bias too
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias + scaled_conv_bias.flatten())
        layer.bn = nn.Identity()
    return model
