"""Stage `reparam`: multi-branch -> plain, verified on real data before anything downstream trusts it."""

from __future__ import annotations

import torch
from torch import nn

from repvgg import PlainRepVGG, RebranchedRepVGG, RepVGG, reparameterize

from .data import Data
from .precision import full_fp32_precision, within_tolerance
from .train import Env, evaluate


class ReparamError(RuntimeError):
    pass


def reparam_stage(model: nn.Module, data: Data, env: Env, tolerance: float = 1e-5) -> tuple[PlainRepVGG, dict]:
    """Convert a multi-branch model (RepVGG, or a RebranchedRepVGG after fine-tuning) to its plain twin, check
    equivalence on a real test batch (max abs logit difference, relative bound, both models run at full FP32
    precision: TF32 alone moves logits by ~1e-3), evaluate."""
    if isinstance(model, PlainRepVGG):  # an inference-time checkpoint: nothing to convert
        plain = model
    elif isinstance(model, (RepVGG, RebranchedRepVGG)):
        plain = reparameterize(model.eval())
    else:
        raise ReparamError(f"reparam needs a RepVGG or a RebranchedRepVGG, got {type(model).__name__}")
    model.to(env.device).eval()
    plain.to(env.device).eval()
    x = next(iter(data.test_loader()))[0].to(env.device)
    with torch.no_grad(), full_fp32_precision():
        ref, out = model(x), plain(x)
    diff = (ref - out).abs().max().item()
    scale = ref.abs().max().item()
    if not within_tolerance(diff, scale, tolerance):
        raise ReparamError(f"re-parameterized model differs by {diff:.3g} (max |logit| {scale:.3g})")
    metrics = evaluate(plain, data.test_loader(), env.device)
    return plain, {**metrics, "max_abs_diff": diff, "max_abs_logit": scale}
