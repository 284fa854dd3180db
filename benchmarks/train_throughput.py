"""Training throughput of our loop (`compress.train.fit`) vs a bare PyTorch loop, same model, data and batch.

    python benchmarks/train_throughput.py --recipe recipes/cifar10_a0.yaml --images 5000

Prints images/s of both and their ratio (goal: ours >= 90% of the bare loop)."""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.data import build_data
from compress.env import Env
from compress.models import initial_model
from compress.recipe import load_recipe
from compress.train import fit, make_optimizer


def bare_epoch(model, data, cfg, device) -> float:
    opt = make_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=data.cfg.batch_size, shuffle=True,
                                         num_workers=data.cfg.workers, drop_last=True)
    model.train()
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def ours_epoch(model, data, cfg, device) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(device=device, out_dir=Path(tmp))
        start = time.perf_counter()
        fit(model, cfg.model_copy(update={"epochs": 1}), data, env, tag="bench", ckpt_path=Path(tmp) / "c.ckpt", key="b")
        elapsed = time.perf_counter() - start
    # fit also evaluates the test subset once per epoch: time that separately and take it out
    start = time.perf_counter()
    from compress.train import evaluate

    evaluate(model, data.test_loader(), device)
    elapsed -= time.perf_counter() - start
    return data.steps_per_epoch() * data.cfg.batch_size / elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cifar10_a0.yaml")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, [f"data.train_subset={args.images}", "data.test_subset=512"])
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.device != "cpu" else "cpu")
    data = build_data(recipe.data, recipe.seed)
    bare, ours = [], []
    for r in range(args.rounds):  # alternate, so machine noise hits both alike
        torch.manual_seed(r)
        bare.append(bare_epoch(initial_model(recipe, data.num_classes)[0].to(device), data, recipe.train, device))
        torch.manual_seed(r)
        ours.append(ours_epoch(initial_model(recipe, data.num_classes)[0], data, recipe.train, device))
        print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, ours {ours[-1]:.1f} img/s, ratio {ours[-1] / bare[-1]:.3f}")
    print(f"median: bare {sorted(bare)[len(bare) // 2]:.1f} img/s, ours {sorted(ours)[len(ours) // 2]:.1f} img/s; "
          f"ratios {[round(o / b, 3) for o, b in zip(ours, bare)]} ({recipe.model.name}, {device}, batch {recipe.data.batch_size})")


if __name__ == "__main__":
    main()
