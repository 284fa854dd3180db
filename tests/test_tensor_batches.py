"""Small images in memory: an ImageFolder decoded once into a cache, training batches cut and augmented as tensors
(torchvision's RandomCrop(padding=4) + flip), the same batches for a resumed run, disjoint rank shards, the
DataLoader fallback past the memory cap, and bad images."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from compress import data as data_module
from compress.data import (
    PAD,
    CheckedImageFolder,
    DataError,
    ImageTensors,
    _geometry,
    _image_transforms,
    augment_batch,
    build_data,
    cache_key,
    data_cache_dir,
    epoch_plan,
    normalise,
)
from compress.recipe import DataCfg

SIZE = 16


def _tree(root, per_class=(14, 5)):
    """A tiny ImageFolder of random JPEGs, 3 classes, larger than SIZE and not square (the geometry matters)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg")
    return root


@pytest.fixture
def folder(tmp_path):
    return _tree(tmp_path / "imgs")


def _cfg(tmp_path, root, **kw) -> DataCfg:
    return DataCfg(**{"kind": "imagefolder", "root": root, "image_size": SIZE, "batch_size": 8, "augment": "cifar",
                      "cache_dir": tmp_path / "cache", **kw})


def _batches(data, epoch):
    return [(x.clone(), y.clone()) for x, y in data.train_loader(epoch)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_the_cache_is_built_once_reused_and_rebuilt_when_a_file_changes(tmp_path, folder, monkeypatch):
    cfg = _cfg(tmp_path, folder)
    first = build_data(cfg)
    assert isinstance(first.train_set, ImageTensors) and (len(first.train_set), len(first.test_set)) == (42, 15)
    assert len(list((tmp_path / "cache").glob("images-*.pt"))) == 2  # train and test

    def no_decoding(task):
        raise AssertionError(f"decoded {task[0]} again")

    with monkeypatch.context() as m:
        m.setattr(data_module, "_decode_small", no_decoding)
        again = build_data(cfg)
    assert torch.equal(again.train_set.images, first.train_set.images)
    assert torch.equal(again.test_set.labels, first.test_set.labels)

    train = folder / "train"
    samples = [(str(p), 0) for p in sorted(train.rglob("*.jpg"))]
    before = cache_key(train, SIZE, samples)
    assert cache_key(train, SIZE, samples) == before and cache_key(train, SIZE + 1, samples) != before
    changed = train / "b" / "3.jpg"
    Image.new("RGB", (20, 24), (1, 2, 3)).save(changed)
    assert cache_key(train, SIZE, samples) != before
    decoded = []
    with monkeypatch.context() as m:
        m.setattr(data_module, "_decode_small", lambda task: decoded.append(task[0]) or _decode(task))
        rebuilt = build_data(cfg)
    assert len(decoded) == 42  # the training set again, the test set from its cache
    position = [p for p, _ in CheckedImageFolder(train, None, False).samples].index(str(changed))
    colour = torch.tensor([1, 2, 3])[:, None, None]
    assert (rebuilt.train_set.images[position].int() - colour).abs().max() <= 4  # JPEG's rounding


_decode = data_module._decode_small


def test_held_images_are_those_of_the_per_image_transforms(tmp_path, folder):
    data = build_data(_cfg(tmp_path, folder))
    per_image = CheckedImageFolder(folder / "test", _image_transforms(data.cfg, train=False), False)
    for i in range(len(per_image)):
        x, y = per_image[i]
        held, label = data.test_set[i]
        assert torch.equal(held, x) and int(label) == y
    # CIFAR-10's arrays are resized a chunk at a time: the same values as one image at a time
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(_geometry(24)(images), torch.stack([_geometry(24)(im) for im in images]))


def test_an_epoch_has_the_same_batches_whether_or_not_earlier_epochs_ran(tmp_path, folder):
    cfg = _cfg(tmp_path, folder)
    whole = build_data(cfg, seed=3)
    _batches(whole, 0), _batches(whole, 1)
    epoch2 = _batches(whole, 2)
    resumed = _batches(build_data(cfg, seed=3), 2)
    assert len(epoch2) == whole.steps_per_epoch() == 42 // 8 and _same(epoch2, resumed)
    assert not _same(epoch2, _batches(whole, 1)) and not _same(epoch2, _batches(build_data(cfg, seed=4), 2))


def test_ranks_take_disjoint_shards_of_the_epochs_permutation(tmp_path, folder):
    cfg = _cfg(tmp_path, folder, augment="none", batch_size=4)
    seed, epoch, n = 5, 2, 42
    ranks = [build_data(cfg, seed=seed, rank=r, world_size=2) for r in (0, 1)]
    plans = [epoch_plan(n, 4, seed, epoch, False, r, 2).positions for r in (0, 1)]
    steps = ranks[0].steps_per_epoch()
    assert steps == ranks[1].steps_per_epoch() == n // 8 == len(plans[0])
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    assert sorted(torch.cat([p.flatten() for p in plans]).tolist()) == sorted(permutation[:steps * 8].tolist())
    assert not set(plans[0].flatten().tolist()) & set(plans[1].flatten().tolist())
    assert torch.equal(plans[1].flatten(), permutation[1:steps * 8:2])
    threads = torch.get_num_threads()
    for data, plan in zip(ranks, plans):  # each rank's batches show its positions, un-augmented
        for (x, y), positions in zip(data.train_loader(epoch), plan):
            assert torch.get_num_threads() == threads  # batches are made on one thread, the caller's count restored
            items = [data.train_set[int(p)] for p in positions]
            assert torch.equal(x, torch.stack([im for im, _ in items])) and y.tolist() == [int(c) for _, c in items]


def _torchvision_crop_flip(image, top, left, flip):
    """RandomCrop(size, padding=PAD) then RandomHorizontalFlip, for given draws, by torchvision's own kernels."""
    out = TF.crop(TF.pad(image, [PAD], fill=0), top, left, image.shape[-2], image.shape[-1])
    return TF.horizontal_flip(out) if flip else out


def test_augmentation_is_torchvisions_pad4_crop_and_flip(tmp_path, folder):
    image = torch.randint(1, 256, (3, 12, 10), dtype=torch.uint8)  # no zero: the padding shows
    draws = [(top, left, f) for top in range(2 * PAD + 1) for left in range(2 * PAD + 1) for f in (False, True)]
    offsets = torch.tensor([[top, left] for top, left, _ in draws])
    flips = torch.tensor([f for _, _, f in draws])
    got = augment_batch(image.expand(len(draws), -1, -1, -1), offsets, flips)
    for out, draw in zip(got, draws):
        assert torch.equal(out, _torchvision_crop_flip(image, *draw)), draw
    # the plan draws every offset torchvision can (0..8 each way) and both flips
    plan = epoch_plan(2000, 100, 0, 0, True)
    assert plan.offsets.min() == 0 and plan.offsets.max() == 2 * PAD and set(plan.flips.flatten().tolist()) == {0, 1}
    # a training batch: each image is one of those crops and flips of its held image, normalised
    data = build_data(_cfg(tmp_path, folder))
    plan = epoch_plan(len(data.train_set), 8, data.seed, 1, True)
    x, _ = next(iter(data.train_loader(1)))
    for out, p, (top, left), f in zip(x, plan.positions[0], plan.offsets[0], plan.flips[0]):
        expected = _torchvision_crop_flip(data.train_set.images[int(p)], int(top), int(left), bool(f))
        assert torch.equal(out, normalise(expected))


def test_past_the_memory_cap_dataloader_workers_make_the_same_batches(tmp_path, folder, monkeypatch, capsys):
    cfg = _cfg(tmp_path, folder)
    held = build_data(cfg, seed=1)
    monkeypatch.setattr(data_module, "MEMORY_CAP_BYTES", 1000)
    loaded = build_data(cfg, seed=1)
    err = capsys.readouterr().err
    assert "57 images at 16x16 take 0.0 GiB decoded, over the" in err and "DataLoader workers" in err
    assert isinstance(loaded.train_set, CheckedImageFolder)
    assert _same(_batches(loaded, 2), _batches(held, 2))
    x, y = next(iter(loaded.test_loader()))
    u, v = next(iter(held.test_loader()))
    assert torch.equal(x, u) and torch.equal(y, v)


def test_an_undecodable_image_fails_with_its_path_or_is_skipped_and_counted(tmp_path, folder, monkeypatch):
    bad = folder / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    monkeypatch.setattr(data_module, "POOL_MIN_IMAGES", 0)  # the process pool that decodes large sets
    with pytest.raises(DataError, match=re.escape(f"image cannot be decoded: {bad} (")):
        build_data(_cfg(tmp_path, folder))
    assert not list((tmp_path / "cache").glob("images-*.pt"))  # the failed training set was not cached
    skipping = build_data(_cfg(tmp_path, folder, bad_images="skip"))
    assert len(skipping.train_set) == 42 and skipping.skipped_images() == 1
    with pytest.raises(DataError, match=re.escape(f"image cannot be decoded: {bad} (")):  # the cache remembers it
        build_data(_cfg(tmp_path, folder))


def test_tensor_batches_are_in_the_keys_where_they_apply(tmp_path, folder, monkeypatch):
    cfg = _cfg(tmp_path, folder)
    assert cfg.key_values()["batches"] == "tensor_v1" and "cache_dir" not in cfg.key_values()
    for other in ({"image_size": 65}, {"augment": "imagenet"}):
        assert "batches" not in cfg.model_copy(update=other).key_values()
    assert "batches" not in DataCfg(kind="digits").key_values()
    assert "batches" not in cfg.key_values("evaluation")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache_dir(None) == tmp_path / "xdg" / "repvgg-compress" / "data"
    assert data_cache_dir(tmp_path / "given") == tmp_path / "given"
