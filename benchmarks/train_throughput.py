"""Training throughput of our loop (`compress.train.fit`) against a bare training step, same model and batch.

    python benchmarks/train_throughput.py --recipe recipes/cifar10_cpu_base.yaml --images 10000 [--rounds 3]
        [--compile] [--report docs/results/train_throughput.md]

The bare step is forward + backward + SGD step on one fixed batch (no data loading), repeated for as many steps as
our epoch has, at each precision and memory layout (and under `torch.compile` with `--compile`): the ceiling of any
loop, and the evidence for what `precision: auto` and `channels_last: auto` choose (`compress.train_device`). Our
loop runs one `fit` epoch at the recipe's resolved settings, timed twice: its training part (what `fit` reports, the
evaluation left out) and the whole call (model set-up, training, the test-set evaluation, the checkpoint).

Every job is timed by the engine (`compress.timing`, counts `TRAIN_THROUGHPUT`): one call of each per round, on a
fresh model of the round's seed; the figure of a job is its fastest round, also scaled to seconds per epoch of
50,000 images (the whole epoch is not: its evaluation does not grow with the training images); the ratio of our training to the bare step at the same settings is the median of same-round ratios (goal:
at most 1.15)."""

import argparse
import dataclasses
import itertools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.data import build_data
from compress.env import Env
from compress.models import initial_model
from compress.recipe import load_recipe
from compress.results import Transcript
from compress.timing import TRAIN_THROUGHPUT, SelfTimed, ratio, run_rounds
from compress.train import fit, make_optimizer
from compress.train_device import AUTOCAST_DTYPES, compiled

EPOCH_IMAGES = 50_000  # figures are seconds per epoch of CIFAR-10's training set
GOAL = 1.15  # our training at most this many times the bare step's time


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a bare step runs: its autocast precision, memory layout and compilation."""

    precision: str
    channels_last: bool
    compile: bool = False

    def __str__(self) -> str:
        layout = "channels-last" if self.channels_last else "contiguous"
        return f"{'torch.compile + ' if self.compile else ''}{self.precision} {layout}"


def bare_steps(model, x, y, cfg, setting: Setting, steps: int, device: torch.device) -> None:
    """`steps` bare training steps of `model` on the fixed batch (`x`, `y`) under `setting`: the engine times the
    whole call."""
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = compiled(model, device.type, "bare step") if setting.compile else model
    opt = make_optimizer(model, cfg)
    dtype = AUTOCAST_DTYPES[setting.precision]
    model.train()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_epoch(model, data, cfg, device) -> float:
    """One epoch of `fit`; returns the seconds of its training (the evaluation after it left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(device=device, out_dir=Path(tmp))
        result = fit(model, cfg.model_copy(update={"epochs": 1, "warmup_epochs": 0}), data, env, tag="bench",
                     ckpt_path=Path(tmp) / "c.ckpt", key="b")
    return result["history"][-1]["train_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cifar10_cpu_base.yaml")
    ap.add_argument("--images", type=int, default=10_000, help="training images of one timed epoch")
    ap.add_argument("--rounds", type=int, default=TRAIN_THROUGHPUT.rounds)
    ap.add_argument("--compile", action="store_true", help="also time the bare step under torch.compile")
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the output as a published report")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, [f"data.train_subset={args.images}"])
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.device != "cpu" else "cpu")
    recipe = recipe.resolved(device.type)
    cfg = recipe.train
    data = build_data(recipe.data, recipe.seed)
    steps = data.steps_per_epoch()
    x, y = next(iter(data.train_loader(0)))
    x, y = x.to(device), y.to(device)
    ours_setting = Setting(cfg.precision, cfg.channels_last, cfg.compile)
    settings = [Setting(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]
    if ours_setting not in settings:
        settings.append(ours_setting)
    if args.compile:
        settings.append(Setting(cfg.precision, cfg.channels_last, True))
    seeds = {}  # round r's models of every job: seed r

    def fresh_model(name: str):
        torch.manual_seed(next(seeds.setdefault(name, itertools.count())))
        return initial_model(recipe, data.num_classes)[0].to(device)

    def bare(setting: Setting):
        def opener():
            model = fresh_model(f"bare {setting}")
            return {f"bare {setting}": lambda: bare_steps(model, x, y, cfg, setting, steps, device)}
        return opener

    def ours_train():
        model = fresh_model("ours_train")
        return {"ours, training": SelfTimed(lambda: ours_epoch(model, data, cfg, device))}

    def ours_whole():
        model = fresh_model("ours_whole")
        return {"ours, whole epoch": lambda: ours_epoch(model, data, cfg, device)}

    images = steps * data.cfg.batch_size  # every loop drops the last, incomplete batch
    scale = EPOCH_IMAGES / images

    def said(r: int, _jobs: list, _seconds: float, timed: dict) -> None:
        out.say(f"round {r + 1}: " + ", ".join(f"{name} {s.round_fastest[-1] / 1000 * scale:.1f} s"
                                             for name, s in timed.items()))

    out = Transcript()
    model = recipe.model
    architecture = model.name or f"blocks {model.num_blocks}, widths {model.widths or model.width_multiplier}"
    out.say(f"{architecture}, stem stride {model.stem_stride}, {device}, batch "
            f"{data.cfg.batch_size}, {images} training images per timed epoch ({steps} steps), "
            f"{len(data.test_set)} test images; ours at {ours_setting} (the recipe's resolved settings)")
    jobs = {str(s): bare(s) for s in settings}
    jobs |= {"ours, training": ours_train, "ours, whole epoch": ours_whole}
    counts = dataclasses.replace(TRAIN_THROUGHPUT, rounds=args.rounds)
    timed = run_rounds(jobs, counts, on_round=said)
    reference = timed[f"bare {ours_setting}"]
    out.say("")
    out.say(f"| loop | s per timed epoch (fastest round) | s per {EPOCH_IMAGES:,} images | training images/s | "
            f"vs bare step at {ours_setting} |")
    out.say("|---|---|---|---|---|")
    for name, series in timed.items():
        seconds = series.fastest / 1000
        if name == "ours, whole epoch":  # its evaluation does not grow with the training images: not scaled
            out.say(f"| {name} (with {len(data.test_set):,} test images) | {seconds:.1f} | | | "
                    f"{ratio(series, reference):.3f} |")
            continue
        out.say(f"| {name} | {seconds:.1f} | {seconds * scale:.1f} | {images / seconds:.0f} | "
                f"{ratio(series, reference):.3f} |")
    train_ratio = ratio(timed["ours, training"], reference)
    out.say("")
    out.say(f"our training / bare step at the same settings: {train_ratio:.3f} (median of same-round ratios; goal "
            f"at most {GOAL}): {'met' if train_ratio <= GOAL else 'NOT met'}")
    out.publish(args.report, "Training throughput: our loop against a bare training step")


if __name__ == "__main__":
    main()
