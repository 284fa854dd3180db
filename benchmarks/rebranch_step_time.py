"""Fine-tuning step time of a pruned plain RepVGG with a temporary BN after each conv (`finetune.structure: bn`) vs
the same model re-branched (`rebranch`: 3x3 + 1x1 + identity branches at the pruned widths).

    python benchmarks/rebranch_step_time.py [--model A0] [--image-size 32] [--batch 64] [--steps 40]

Both models train (SGD, cross-entropy, random data) one step each in turn; prints the median (and min) ms per step
of each, the epoch time that makes on CIFAR-10's 50,000 images and the median of the per-step ratios."""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from compress.prune import PruneOptions, Target, prune_model
from repvgg import create_model, insert_bn, rebranch, reparameterize


def step_ms(model, opt, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="A0")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keep-macs", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=40)
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
    for _ in range(3):  # warm-up
        for name, m in models.items():
            step_ms(m, opts[name], x, y)
    times = {name: [] for name in models}
    for _ in range(args.steps):  # one step of each in turn: a load change on the machine hits both alike
        for name, m in models.items():
            times[name].append(step_ms(m, opts[name], x, y))
    print(f"{args.model} pruned to {args.keep_macs:.0%} MACs, widths {plain.widths()}")
    print(f"{size}x{size}, batch {args.batch}, {torch.get_num_threads()} threads, {args.steps} steps each")
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"{name:9s} median {med:6.1f} ms/step (min {min(ms):6.1f})  {med * 50000 / args.batch / 1e3:6.1f} s "
              "per 50,000-image epoch")
    ratio = statistics.median(r / b for r, b in zip(times["rebranch"], times["bn"]))
    print(f"rebranch / bn: {ratio:.2f}x (median of per-step ratios), {min(times['rebranch']) / min(times['bn']):.2f}x "
          "(min / min)")


if __name__ == "__main__":
    main()
