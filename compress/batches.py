"""What a loader batch is, for code that takes any loader (calibration, evaluation): images alone, (images, labels,
...) or an {'image', 'label'} dict."""

from __future__ import annotations

import torch


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of one loader batch: an image tensor, an (images, labels, ...) sequence or an
    {'image': ..., 'label': ...} dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
        return batch["image"], batch.get("label")
    raise TypeError(f"a loader batch is {type(batch).__name__}; expected images or (images, labels)")
