"""Training throughput of our loop (`compress.train.fit`) vs a bare PyTorch loop, same model, data and batch.

    python benchmarks/train_throughput.py --recipe recipes/cifar10_a0.yaml --images 5000 [--rounds 3]
        [--report docs/results/train_throughput.md]

Both loops are timed by the engine (`compress.timing`, counts `TRAIN_THROUGHPUT`): one epoch of each per round, each
on a fresh model of the same seed; ours counts its epoch's training only (`fit` reports it without the evaluation
that follows). Prints images/s of both at their fastest epoch and their ratio, the median over rounds of the
same-round ratios (goal: ours >= 90% of the bare loop)."""

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


def bare_epoch(model, data, cfg, device) -> None:
    """One epoch of a bare PyTorch loop over the batches `fit` trains on (`Data.train_loader`): the engine times
    the whole call."""
    opt = make_optimizer(model, cfg)
    model.train()
    for x, y in data.train_loader(0):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def ours_epoch(model, data, cfg, device) -> float:
    """One epoch of `fit`: the seconds of its training, the test-set evaluation after it left out."""
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(device=device, out_dir=Path(tmp))
        result = fit(model, cfg.model_copy(update={"epochs": 1}), data, env, tag="bench",
                     ckpt_path=Path(tmp) / "c.ckpt", key="b")
    return result["history"][-1]["train_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cifar10_a0.yaml")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=TRAIN_THROUGHPUT.rounds)
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the output as a published report")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, [f"data.train_subset={args.images}", "data.test_subset=512"])
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.device != "cpu" else "cpu")
    data = build_data(recipe.data, recipe.seed)
    seeds = {name: itertools.count() for name in ("bare", "ours")}  # round r's models of both loops: seed r

    def fresh_model(name: str):
        torch.manual_seed(next(seeds[name]))
        return initial_model(recipe, data.num_classes)[0].to(device)

    def bare():
        model = fresh_model("bare")
        return {"bare": lambda: bare_epoch(model, data, recipe.train, device)}

    def ours():
        model = fresh_model("ours")
        return {"ours": SelfTimed(lambda: ours_epoch(model, data, recipe.train, device))}

    images = data.steps_per_epoch() * data.cfg.batch_size  # both loops drop the last, incomplete batch

    def said(r: int, _jobs: list, _seconds: float, timed: dict) -> None:
        out.say(f"round {r + 1}: " + ", ".join(f"{name} {images / (s.round_fastest[-1] / 1000):.1f} img/s"
                                             for name, s in timed.items()))

    out = Transcript()
    counts = dataclasses.replace(TRAIN_THROUGHPUT, rounds=args.rounds)
    timed = run_rounds({"bare": bare, "ours": ours}, counts, on_round=said)
    rate = {name: images / (series.fastest / 1000) for name, series in timed.items()}
    out.say(f"fastest epoch: bare {rate['bare']:.1f} img/s, ours {rate['ours']:.1f} img/s; ours / bare "
          f"{ratio(timed['bare'], timed['ours']):.3f} (median of same-round ratios; {recipe.model.name}, {device}, "
          f"batch {recipe.data.batch_size})")
    out.publish(args.report, "Training throughput: our loop vs a bare PyTorch loop")


if __name__ == "__main__":
    main()
