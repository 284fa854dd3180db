"""Fine-tuning step time of a pruned plain RepVGG with a temporary BN after each conv (`finetune.structure: bn`) vs
the same model re-branched (`rebranch`: 3x3 + 1x1 + identity branches at the pruned widths).

    python benchmarks/rebranch_step_time.py [--model A0] [--image-size 32] [--batch 64] [--steps 40]
        [--report docs/results/rebranch_step_time.md]

Both models train (SGD, cross-entropy, random data), timed by the engine (`compress.timing`, counts
`REBRANCH_STEPS`): one step of each per round. Prints each one's fastest step (and median), the epoch time that
makes on CIFAR-10's 50,000 images, and the ratio rebranch / bn: the median over rounds of the same-round ratio."""

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.prune import PruneOptions, Target, prune_model
from compress.results import Transcript
from compress.timing import REBRANCH_STEPS, ratio, run_rounds
from repvgg import create_model, insert_bn, rebranch, reparameterize


def training_step(model, opt, x, y):
    """One SGD step of `model` on the batch (x, y), as a call the engine times."""

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="A0")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keep-macs", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=REBRANCH_STEPS.rounds, help="timed steps of each model")
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the output as a published report")
    args = ap.parse_args()
    torch.manual_seed(0)
    size = args.image_size
    plain = reparameterize(create_model(args.model, num_classes=10).eval())
    prune_model(plain, PruneOptions(target=Target("keep_macs", args.keep_macs), round_to=16), torch.randn(1, 3, size, size))
    calibration = [torch.randn(args.batch, 3, size, size) for _ in range(2)]
    models = {
        "bn": insert_bn(copy.deepcopy(plain), calibration).train(),
        "rebranch": rebranch(plain, calibration).train(),
    }
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    x, y = torch.randn(args.batch, 3, size, size), torch.randint(10, (args.batch,))
    # the models live on between rounds (they train): a job's opener only hands out its step
    steps = {name: training_step(m, opts[name], x, y) for name, m in models.items()}
    counts = dataclasses.replace(REBRANCH_STEPS, rounds=args.steps)
    times = run_rounds({name: (lambda name=name: {name: steps[name]}) for name in models}, counts)
    out = Transcript()
    out.say(f"{args.model} pruned to {args.keep_macs:.0%} MACs, widths {plain.widths()}")
    out.say(f"{size}x{size}, batch {args.batch}, {torch.get_num_threads()} threads, {args.steps} steps each")
    for name, series in times.items():
        ms = series.fastest
        out.say(f"{name:9s} fastest {ms:6.1f} ms/step (median {series.median:6.1f})  "
              f"{ms * 50000 / args.batch / 1e3:6.1f} s per 50,000-image epoch")
    out.say(f"rebranch / bn: {ratio(times['rebranch'], times['bn']):.2f}x (median of same-round ratios)")
    out.publish(args.report, "Fine-tuning step time: temporary BN vs re-branched")


if __name__ == "__main__":
    main()
