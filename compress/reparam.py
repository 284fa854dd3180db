"""Stage `reparam`: multi-branch -> plain, verified on real data before anything downstream trusts it."""

from __future__ import annotations

import torch
from torch import nn

from repvgg import PlainRepVGG, RebranchedRepVGG, RepVGG, reparameterize

from .data import Data
from .env import Env
from .errors import UserError
from .precision import full_fp32_precision, within_tolerance
from .train import evaluate


class ReparamError(UserError, RuntimeError):
    pass


def to_plain(model: nn.Module) -> PlainRepVGG:
    """The plain twin of a multi-branch model (RepVGG, or a RebranchedRepVGG after fine-tuning); a plain model
    (an inference-time checkpoint) as it is."""
    if isinstance(model, PlainRepVGG):
        return model
    if isinstance(model, (RepVGG, RebranchedRepVGG)):
        return reparameterize(model.eval())
    raise ReparamError(f"reparam needs a RepVGG or a RebranchedRepVGG, got {type(model).__name__}")


def check_equivalent(model: nn.Module, plain: PlainRepVGG, data: Data, env: Env, tolerance: float = 1e-5) -> dict:
    """Max abs logit difference of the two models on a real test batch, both run at full FP32 precision (TF32
    alone moves logits by ~1e-3); raises ReparamError beyond `tolerance` x max(|logit|, 1)."""
    model.to(env.device).eval()
    plain.to(env.device).eval()
    x = next(iter(data.test_loader()))[0].to(env.device)
    with torch.no_grad(), full_fp32_precision():
        ref, out = model(x), plain(x)
    diff = (ref - out).abs().max().item()
    scale = ref.abs().max().item()
    if not within_tolerance(diff, scale, tolerance):
        raise ReparamError(f"re-parameterized model differs by {diff:.3g} (max |logit| {scale:.3g})")
    return {"max_abs_diff": diff, "max_abs_logit": scale}


def reparam_stage(model: nn.Module, data: Data, env: Env, tolerance: float = 1e-5) -> tuple[PlainRepVGG, dict]:
    """Convert to the plain twin, check the equivalence, evaluate."""
    plain = to_plain(model)
    check = check_equivalent(model, plain, data, env, tolerance)
    return plain, {**evaluate(plain, data.test_loader(), env.device), **check}
