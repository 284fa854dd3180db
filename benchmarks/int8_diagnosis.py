"""Where an INT8 model loses its accuracy, on one finished study point: PTQ with the point's quantize settings, then
PTQ with one layer at a time kept in FP32 (NNCF's IgnoredScope), each scored in PyTorch (fake-quant) on `--images`
test images (a fixed random sample); then the point's QAT model against its PTQ start, layer by layer: how far QAT
moved each weight scale and each activation scale.

    python benchmarks/int8_diagnosis.py --study runs/study_cifar10_cpu --point plain_0.3 [--images 2000]
        [--set quantize.overflow_fix=enable]

The point's recipe is rebuilt as `int8_grid.py` does; `--set` changes it (quantize settings included)."""

from __future__ import annotations

import argparse
import re

import torch
from int8_grid import point_arguments, point_setup  # this folder's script: the same point, rebuilt the same way

from compress.files import load_model
from compress.quant import layer_node_names, load_quantized, quantize_model
from compress.stages.quantize import calibration_options
from compress.train import evaluate

SCALE = re.compile(r"__nncf_hooks\.(pre|post)_hooks\.(.+?)__(\d+)\.\d+\.scale$")


def scales(qmodel: torch.nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Every quantizer's scale, by (node name, 'weight' or 'activation')."""
    out = {}
    for key, value in qmodel.state_dict().items():
        m = SCALE.match(key)
        if m:
            hook, node, port = m.groups()
            out[(node, "weight" if hook == "pre" and port == "1" else "activation")] = value.detach().flatten()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    point_arguments(ap)
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    point, data = point_setup(args)
    point_dir = args.study / "points" / args.point
    fp32 = load_model(point_dir / "finetuned.pt").eval()
    cfg = point.quantize
    test = data.test_sample_loader(args.images)  # every class: the test folder is sorted by class
    example = data.example_input()

    def ptq_top1(keep_fp32=()) -> tuple[float, torch.nn.Module]:
        qmodel = quantize_model(fp32, data.calibration_loader(cfg.calibration_size), example, keep_fp32=keep_fp32,
                                **calibration_options(cfg))
        return evaluate(qmodel, test, torch.device("cpu"))["top1"], qmodel

    base = evaluate(fp32, test, torch.device("cpu"))["top1"]
    ptq, ptq_model = ptq_top1()
    names = layer_node_names(fp32, example)
    widths = [*fp32.widths(), fp32.linear.out_features]
    print(f"{args.point}: FP32 {base:.2f}%, PTQ {ptq:.2f}% on {args.images} test images "
          f"(overflow_fix {cfg.overflow_fix}, ranges {cfg.activation_ranges}, calibration {cfg.calibration_size})")
    print("\n| layer | node | out channels | PTQ top-1 with this layer FP32 | gain over PTQ (pt) |")
    print("|---|---|---|---|---|")
    for i, (name, width) in enumerate(zip(names, widths)):
        top1, _ = ptq_top1([name])
        print(f"| {i} | {name} | {width} | {top1:.2f} | {top1 - ptq:+.2f} |")
    qat_path = point_dir / "quantized.pt"
    if not qat_path.exists():
        return
    qat = load_quantized(qat_path, example)
    before, after = scales(ptq_model), scales(qat)
    print(f"\nQAT ({qat_path}) against its PTQ start: median and largest |log2(after / before)| of each scale")
    print("\n| node | kind | scales | median | largest | median scale before -> after |")
    print("|---|---|---|---|---|---|")
    for key in sorted(before.keys() & after.keys(), key=lambda k: (names.index(k[0]) if k[0] in names else 99, k[1])):
        a, b = before[key].abs().clamp_min(1e-12), after[key].abs().clamp_min(1e-12)
        moved = (b / a).log2().abs()
        print(f"| {key[0]} | {key[1]} | {a.numel()} | {moved.median():.3f} | {moved.max():.3f} | "
              f"{a.median():.4g} -> {b.median():.4g} |")


if __name__ == "__main__":
    main()
