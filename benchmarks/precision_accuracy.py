"""Does BF16 training hold FP32's accuracy? The same recipe's `train` stage at `precision: bf16` and `fp32`, on the
same seeds, and the top-1 each reaches.

    python benchmarks/precision_accuracy.py [--recipe recipes/cifar10_cpu_base.yaml] [--epochs 6] [--seeds 0 1]
        [--out runs/precision_accuracy] [--report docs/results/precision_accuracy.md]

Each training is an ordinary run (`compress.py run --stages train`) in OUT/<precision>_seed<N>, so a finished one
is reused and an interrupted one resumes. `--epochs` overrides the recipe's (the default, 6, is the CPU study's
base schedule) and EMA is off, so the figure is the weights' own. Prints top-1 per seed and precision, BF16 minus
FP32, and each training's seconds (goal: BF16 within 0.5 point of FP32 on every seed)."""

import argparse
import json
from pathlib import Path

import torch

from compress.cli import main as compress_main
from compress.results import Transcript

GOAL_POINTS = 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cifar10_cpu_base.yaml")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("runs/precision_accuracy"))
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the output as a published report")
    args = ap.parse_args()
    out = Transcript()
    top1, seconds = {}, {}
    for seed in args.seeds:
        for precision in ("bf16", "fp32"):
            run_dir = args.out / f"{precision}_seed{seed}"
            code = compress_main(["--recipe", args.recipe, "--out", str(run_dir), "--stages", "train",
                                  "--set", f"seed={seed}", "--set", f"train.epochs={args.epochs}",
                                  "--set", "train.ema_decay=null", "--set", f"train.precision={precision}"])
            if code != 0:
                raise SystemExit(code)
            train = json.loads((run_dir / "summary.json").read_text())["stages"]["train"]
            top1[seed, precision] = train["top1"]
            seconds[seed, precision] = sum(h["train_seconds"] for h in train["history"])
    out.say(f"{args.recipe}, train stage, {args.epochs} epochs, EMA off, {torch.get_num_threads()} thread(s); top-1 on "
            f"the test set, in PyTorch FP32")
    out.say("")
    out.say("| seed | BF16 top-1 % | FP32 top-1 % | BF16 - FP32 (points) | BF16 training s | FP32 training s |")
    out.say("|---|---|---|---|---|---|")
    for seed in args.seeds:
        diff = top1[seed, "bf16"] - top1[seed, "fp32"]
        out.say(f"| {seed} | {top1[seed, 'bf16']:.2f} | {top1[seed, 'fp32']:.2f} | {diff:+.2f} | "
                f"{seconds[seed, 'bf16']:.0f} | {seconds[seed, 'fp32']:.0f} |")
    worst = max(abs(top1[s, "bf16"] - top1[s, "fp32"]) for s in args.seeds)
    out.say("")
    out.say(f"largest |BF16 - FP32|: {worst:.2f} points (goal: at most {GOAL_POINTS}): "
            f"{'met' if worst <= GOAL_POINTS else 'NOT met'}")
    out.publish(args.report, "BF16 against FP32 training: the top-1 each reaches")


if __name__ == "__main__":
    main()
