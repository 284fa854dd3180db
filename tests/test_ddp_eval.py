"""Under DDP each rank evaluates its own shard of the test set and the totals are all-reduced: the same numbers
as one process evaluating everything, for a fraction of the work."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.data import build_data
from compress.env import Env
from compress.recipe import DataCfg, TrainCfg
from compress.train import evaluate, fit
from repvgg import RepVGG

DATA = DataCfg(image_size=16, augment="none", batch_size=64, train_subset=256)
WORLD = 2


def tiny_repvgg() -> RepVGG:
    torch.manual_seed(0)
    return RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 16], num_classes=10)


def _shard_indices(rank: int) -> list[int]:
    return build_data(DATA, rank=rank, world_size=WORLD).test_loader(shard=True).dataset.indices


def test_test_shards_partition_the_test_set():
    shards = [_shard_indices(rank) for rank in range(WORLD)]
    test_size = len(build_data(DATA).test_set)
    assert sorted(shards[0] + shards[1]) == list(range(test_size))  # every image once: no padding, no repeat
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def _fit_one_epoch(rank: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = tiny_repvgg()
        evaluated = []  # images this rank's model saw in eval mode (not fit's one-image probe of its conv shapes)
        model.register_forward_pre_hook(
            lambda m, args: None if m.training or len(args[0]) == 1 else evaluated.append(len(args[0])))
        env = Env(device=torch.device("cpu"), out_dir=out_dir, rank=rank, world_size=WORLD)
        result = fit(model, TrainCfg(epochs=1, lr=0.05), build_data(DATA, rank=rank, world_size=WORLD), env,
                     tag="ddp", ckpt_path=out_dir / "ddp.ckpt", key="k")
        torch.save({"result": result, "evaluated": sum(evaluated), "state": model.state_dict()},
                   out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_fit_evaluates_shards_and_reports_the_whole_test_set(tmp_path):
    mp.spawn(_fit_one_epoch, args=(tmp_path,), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    data = build_data(DATA)
    assert [r["evaluated"] for r in ranks] == [len(_shard_indices(rank)) for rank in range(WORLD)]
    model = tiny_repvgg()
    model.load_state_dict(ranks[0]["state"])
    alone = evaluate(model, data.test_loader(), torch.device("cpu"))
    for r in ranks:
        assert r["result"]["top1"] == alone["top1"] and r["result"]["top5"] == alone["top5"]
        assert r["result"]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
