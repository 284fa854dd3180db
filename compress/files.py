"""Files the pipeline writes: always a temp file renamed into place, so a kill never leaves half a file.

Models are saved as their architecture description + a state_dict (never pickled modules) and rebuilt from it:
a pruned plain model is its per-layer widths, a multi-branch model its stage widths, a re-branched pruned model
(multi-branch, for fine-tuning) its per-layer widths.
"""

from __future__ import annotations

import json
import os
import re
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


ZIP_MAGIC, PICKLE_MAGIC = b"PK", b"\x80\x02"  # how torch's zip files and its legacy pickles (protocol 2) start
REDO = "delete it and rerun the stage that writes it (or copy it again)"


def _reason(e: Exception) -> str:
    """What went wrong reading a file, in a few words: the error's first sentence, without torch's advice to retry
    with weights_only=False (wrong for a damaged file, and unsafe for a foreign one)."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split(" Check the documentation")[0].split(". ")[0].strip().rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file; a damaged, truncated or foreign file gets one line naming it and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip or pickle
        with open(path, "rb") as f:
            head = f.read(2)
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if pickled:  # intact, but a pickled object (a whole module, say) that a safe load does not run
            raise CheckpointError(f"checkpoint {path} holds a pickled {pickled[1]}, which is not loaded (loading it "
                                  f"would run its code): save its state_dict() instead") from None
        if not head:
            raise CheckpointError(f"checkpoint {path} cannot be read: it is empty (0 bytes): {REDO}") from None
        if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
            raise CheckpointError(f"checkpoint {path} cannot be read: not a PyTorch file ({_reason(e)})") from None
        raise CheckpointError(f"checkpoint {path} cannot be read: it is damaged or truncated ({_reason(e)}): "
                              f"{REDO}") from None


def check_exported_onnx(path: str | Path, size_bytes: int | None = None) -> None:
    """An ONNX file the export stage wrote, checked whole before it is used: missing, of another size than the
    export recorded, or not parseable is one line naming it and saying to export again (the run directory's onnx/
    folder deleted, the export stage reruns)."""
    import onnx  # only where ONNX files are read

    path = Path(path)
    redo = f"delete {path.parent} and rerun the export stage"
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} is missing: {redo}")
    size = path.stat().st_size
    if size_bytes is not None and size != size_bytes:
        raise CheckpointError(f"ONNX file {path} is damaged or truncated ({size} bytes, exported as {size_bytes}): "
                              f"{redo}")
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CheckpointError(f"ONNX file {path} is damaged or truncated ({_reason(e)}): {redo}") from None


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
