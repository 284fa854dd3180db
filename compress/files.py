"""Files the pipeline writes: always a temp file renamed into place, so a kill never leaves half a file.

Models are saved as their architecture description + a state_dict (never pickled modules) and rebuilt from it:
a pruned plain model is its per-layer widths, a multi-branch model its stage widths, a re-branched pruned model
(multi-branch, for fine-tuning) its per-layer widths.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from repvgg import PlainRepVGG, RebranchedRepVGG, RepVGG, from_state_dict
from repvgg.checkpoint import load_strict

from .errors import UserError

FORMAT = "repvgg-compress/1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, said in one line."""


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_predictions(path: str | Path, predicted, labels) -> None:
    """Per-image predicted classes beside the true labels, in test-set order (`read_predictions`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, predicted=np.asarray(predicted, dtype=np.int32), label=np.asarray(labels, dtype=np.int32))


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, label) arrays written by `write_predictions`."""
    with np.load(path) as f:
        return f["predicted"], f["label"]


def torch_save(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# arch name in a record -> the model class; the per-layer ones rebuild with `from_config`
ARCHS: dict[str, type[nn.Module]] = {"plain": PlainRepVGG, "rebranch": RebranchedRepVGG, "repvgg": RepVGG}


def model_record(model: nn.Module) -> dict:
    """Architecture + weights of a RepVGG, PlainRepVGG or RebranchedRepVGG, as plain data."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    arch = next((name for name, cls in ARCHS.items() if isinstance(model, cls)), None)
    if arch is None:
        raise TypeError(f"cannot save a {type(model).__name__}: only {', '.join(c.__name__ for c in ARCHS.values())}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "arch": arch, "config": model.config(), "state_dict": state}


def build_model(record: dict) -> nn.Module:
    """Rebuild a model from `model_record` output, strict about the arch and every key and shape."""
    config = dict(record["config"])
    if record["arch"] not in ARCHS:
        raise ValueError(f"unknown model arch '{record['arch']}'; known: {', '.join(ARCHS)}")
    if record["arch"] == "repvgg":
        config["override_groups_map"] = {int(k): int(v) for k, v in (config.get("override_groups_map") or {}).items()}
        model = RepVGG(**config)
    else:
        model = ARCHS[record["arch"]].from_config(config)
    load_strict(model, record["state_dict"])
    return model


def save_model(model: nn.Module, path: str | Path, **extra) -> None:
    torch_save({**model_record(model), **extra}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file; a truncated or foreign file gets one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file): {e}") from None


def load_model(path: str | Path, stem_stride: int = 2) -> nn.Module:
    """Our checkpoints, or a public RepVGG state dict (`repvgg.from_state_dict`: official or timm layout,
    training- or inference-time, `.pth` or `.safetensors`; their stem stride does not show in the keys, hence
    `stem_stride`)."""
    # A .safetensors file is a bare state dict (timm's hub weights) that torch.load cannot read: repvgg reads it.
    record = path if Path(path).suffix == ".safetensors" else load_checkpoint(path)
    if isinstance(record, dict) and "quant_format" in record:
        raise CheckpointError(f"checkpoint {path} is an INT8 (NNCF) model: load it with compress.quant.load_quantized")
    try:
        if isinstance(record, dict) and record.get("format") == FORMAT:
            return build_model(record)
        return from_state_dict(record, stem_stride)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
