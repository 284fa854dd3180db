"""Full IEEE FP32 for the exactness checks, and the one tolerance rule they share.

Training may run FP32 convolutions and matmuls in TF32 (cuDNN's default on Ampere and later GPUs) or BF16
(oneDNN on CPU): about 1e-3 relative on the logits, enough to fail a 1e-5 equivalence check on a correct model.
Every check runs inside `full_fp32_precision()`; training keeps the process's own settings.

torch has two APIs for these switches, and its kernels read one of them:
- before 2.9, the legacy flags: `torch.backends.cudnn.allow_tf32` and `torch.set_float32_matmul_precision`
  (`torch.backends.cuda.matmul.allow_tf32` is that same setting);
- from 2.9, a tree of `fp32_precision` values, "ieee", "tf32", "bf16" or "none" (inherit): a (backend, op) node
  inherits from (backend, "all"), which inherits from ("generic", "all"). cuDNN's conv and RNN nodes start at a
  hidden default that inherits too but resolves to TF32, and no setter can write it back. The legacy setters
  write through to the tree (destroying that default), warn that they are deprecated, and their getters raise
  once the two APIs disagree.
So each version gets only its own API: nothing is mixed, and every value is put back as it was. (From 2.9, a
legacy getter called inside the block raises, as it would after any use of the new API; kernels do not call them.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the tree's nodes, parents before children
_TREE = [
    ("generic", "all"),
    *((backend, op) for backend in ("cuda", "mkldnn") for op in ("all", "conv", "matmul", "rnn")),
]


def within_tolerance(diff: float, scale: float, tolerance: float) -> bool:
    """The rule of every exactness check: the largest |difference| of two models' outputs is at most `tolerance`
    times the reference's largest |output| (`scale`), or `tolerance` itself when the outputs are below 1."""
    return diff <= tolerance * max(scale, 1.0)


def _tree_to_ieee(changed: list[tuple[tuple[str, str], str]]) -> None:
    """Set the tree to IEEE, parents first, writing only the nodes that do not then resolve to "ieee": with every
    parent at "ieee", such a node holds its value explicitly (an inheriting one follows), so writing that value
    back restores it exactly. Appends (node, value) to `changed` before each write."""
    # torch._C directly: the public attributes miss nodes (cuDNN RNN's sits on a module), and
    # torch.backends.mkldnn.fp32_precision writes the generic node, not mkldnn's
    for node in _TREE:
        value = torch._C._get_fp32_precision_getter(*node)
        if value != "ieee":
            changed.append((node, value))
            torch._C._set_fp32_precision_setter(*node, "ieee")


def _legacy_to_ieee() -> tuple[bool, str]:
    """Turn off cuDNN TF32 and matmul TF32/BF16 with the legacy flags; returns their values to write back."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return saved


@contextmanager
def full_fp32_precision() -> Iterator[None]:
    """Run the block with cuDNN, cuBLAS and oneDNN computing FP32 at full IEEE precision (no TF32, no BF16), and
    put every switch back as it was afterwards, also on an exception."""
    if torch.__version__ >= (2, 9):
        changed: list[tuple[tuple[str, str], str]] = []
        try:
            _tree_to_ieee(changed)
            yield
        finally:
            for node, value in changed:
                torch._C._set_fp32_precision_setter(*node, value)
    else:
        cudnn_tf32, matmul_precision = _legacy_to_ieee()
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            torch.set_float32_matmul_precision(matmul_precision)
