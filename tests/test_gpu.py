"""The GPU smoke tests, for anyone with a CUDA GPU: `pytest -m gpu` (skipped where torch sees no CUDA device), also
run by `benchmarks/gpu_smoke.sh` before the quickstart recipe on CUDA.

- `fit` on CUDA trains under the precision `auto` picks (BF16 from compute capability 8.0, else FP16) with
  channels_last input, as it promises, seen from inside the model;
- the tiny pipeline through fine-tuning on CUDA: the re-parameterization check holds under the default TF32
  settings, and pruning rounds to the CUDA default;
- ONNX Runtime's CUDA and TensorRT providers, each where ORT has it and it starts here: an exported model's logits
  match ORT CPU's, and a timed call runs.
"""

import json

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.data import build_data
from compress.env import Env
from compress.export import export_onnx
from compress.recipe import DataCfg, OptimCfg
from compress.runtime import get_runtime, open_onnx
from compress.timing import time_calls
from compress.train import fit
from repvgg import RepVGG, reparameterize


@pytest.mark.gpu
def test_fit_trains_under_the_auto_precision_with_channels_last_on_cuda(tmp_path):
    data = build_data(DataCfg(kind="digits", image_size=32, batch_size=64, augment="none", train_subset=256), seed=0)
    torch.manual_seed(0)
    model = RepVGG([1, 1, 1, 1], [0.25, 0.25, 0.25, 0.25], num_classes=data.num_classes, stem_stride=1)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []

    def record(module, inputs, output):
        if module.training:  # the training steps, not fit's closing evaluation
            seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    first_conv.register_forward_hook(record)
    result = fit(model, OptimCfg(epochs=1, lr=0.05, precision="auto", channels_last="auto"), data,
                 Env(device=torch.device("cuda"), out_dir=tmp_path), tag="gpu", ckpt_path=tmp_path / "fit.ckpt",
                 key="gpu")
    expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert len(seen) == data.steps_per_epoch() and set(seen) == {(expected, True)}
    assert np.isfinite(result["history"][-1]["train_loss"])


@pytest.mark.gpu
@pytest.mark.slow
def test_tiny_pipeline_through_finetune_on_cuda(tiny_recipe, tmp_path):
    recipe = tiny_recipe(device="cuda", stages=["train", "reparam", "prune", "finetune"], train={"epochs": 2},
                         finetune={"epochs": 1})
    out = tmp_path / "run"
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["reparam"]["max_abs_diff"] <= 1e-5 * max(1.0, stages["reparam"]["max_abs_logit"])
    assert stages["prune"]["round_to"] == 8  # the CUDA default
    assert stages["finetune"]["top1"] > 50
    assert summary["run"]["machine"]["gpu"] == torch.cuda.get_device_name(0)  # the run names the GPU it trained on


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", ["cuda", "tensorrt"])
def test_ort_gpu_provider_matches_ort_cpu(runtime, tmp_path):
    torch.manual_seed(0)
    plain = reparameterize(RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 32], num_classes=10).eval())
    x = torch.randn(4, 3, 32, 32)
    path = tmp_path / "plain.onnx"
    export_onnx(plain, path, x[:1])
    why = get_runtime(runtime).unavailable("cuda", path)
    if why is not None:
        pytest.skip(f"ORT {runtime} does not run here: {why}")
    cpu = open_onnx(path, "cpu").logits(x.numpy())
    session = open_onnx(path, runtime)
    gpu = session.logits(x.numpy())
    # TF32 convolutions on the GPU: agreement to about 1e-3 of the logits' scale, not FP32's 1e-6
    assert gpu.shape == cpu.shape and np.abs(gpu - cpu).max() <= 1e-2 * max(1.0, np.abs(cpu).max())
    time_calls(session.step(x.numpy()), warmup=1, iters=3)  # a timed call, its input and output bound on the GPU
