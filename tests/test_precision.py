"""Exactness checks run at full FP32 precision and put the process's precision back; the FP32 ONNX parity gate is
relative to the logit scale."""

import copy

import pytest
import torch

from compress.data import build_data
from compress.env import Env
from compress.evaluation import ParityError, check_parity, evaluate_onnx
from compress.export import export_onnx
from compress.precision import full_fp32_precision
from compress.recipe import DataCfg
from compress.reparam import reparam_stage
from repvgg import RepVGG, reparameterize


def precisions() -> dict[str, str]:
    """The FP32 precision every conv/matmul/RNN kernel of cuDNN, cuBLAS and oneDNN resolves to now."""
    b = torch.backends
    return {
        "cudnn.conv": b.cudnn.conv.fp32_precision,
        "cudnn.rnn": b.cudnn.rnn.fp32_precision,
        "cuda.matmul": b.cuda.matmul.fp32_precision,
        "mkldnn.conv": b.mkldnn.conv.fp32_precision,
        "mkldnn.matmul": b.mkldnn.matmul.fp32_precision,
        "mkldnn.rnn": b.mkldnn.rnn.fp32_precision,
    }


@pytest.fixture
def reduced_precision():
    """TF32 wherever it is inherited (as training on an Ampere GPU may set it), BF16 for oneDNN convs; the
    previous values are put back after the test."""
    b = torch.backends
    saved = b.fp32_precision, b.mkldnn.conv.fp32_precision
    b.fp32_precision = "tf32"
    b.mkldnn.conv.fp32_precision = "bf16"
    yield
    b.fp32_precision, b.mkldnn.conv.fp32_precision = saved


@pytest.fixture(scope="module")
def data():
    return build_data(DataCfg(image_size=16, augment="none", batch_size=64))


def tiny_repvgg() -> RepVGG:
    torch.manual_seed(0)
    return RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10).eval()


def test_reparam_check_runs_at_full_precision_and_puts_precision_back(reduced_precision, data, tmp_path):
    before = precisions()
    assert set(before.values()) == {"tf32", "bf16"}
    model = tiny_repvgg()
    during_check = []
    model.register_forward_pre_hook(lambda module, args: during_check.append(precisions()))
    reparam_stage(model, data, Env(device=torch.device("cpu"), out_dir=tmp_path))
    assert during_check == [dict.fromkeys(before, "ieee")]  # the multi-branch model runs only for the check
    assert precisions() == before
    # what inherited still inherits: only explicitly held values were written back
    torch.backends.fp32_precision = "ieee"
    assert precisions() == {**dict.fromkeys(before, "ieee"), "mkldnn.conv": "bf16"}


def test_precision_is_put_back_after_an_exception(reduced_precision):
    before = precisions()
    with pytest.raises(KeyError), full_fp32_precision():
        assert set(precisions().values()) == {"ieee"}
        raise KeyError("check failed")
    assert precisions() == before


@pytest.fixture(scope="module")
def large_logits(tmp_path_factory, data):
    """A plain model whose logits reach the thousands (head scaled), exported to ONNX."""
    plain = reparameterize(tiny_repvgg())
    with torch.no_grad():
        plain.linear.weight.mul_(1e4)
        plain.linear.bias.mul_(1e4)
    path = export_onnx(plain, tmp_path_factory.mktemp("onnx") / "large.onnx", data.example_input())
    return plain, path


def test_parity_gate_is_relative_to_the_logit_scale(large_logits, data):
    plain, path = large_logits
    result = evaluate_onnx(path, data.test_loader(), reference=plain)
    assert result["max_abs_logit"] > 1e3
    check_parity(path, result)  # FP32 rounding at this scale may exceed 1e-4 in absolute terms: not an error


def test_parity_gate_rejects_a_file_that_differs_from_its_model(large_logits, data):
    plain, path = large_logits
    changed = copy.deepcopy(plain)
    with torch.no_grad():
        changed.layers[2].conv.weight.mul_(1.002)  # a 0.2% change of one layer: the file no longer matches
    result = evaluate_onnx(path, data.test_loader(), reference=changed)
    with pytest.raises(ParityError, match=rf"ONNX {path} differs from PyTorch by .* at max \|logit\| "):
        check_parity(path, result)
