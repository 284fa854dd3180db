"""Datasets the recipe names: embedded digits (no download), an ImageFolder, or CIFAR-10 python batches.

Shuffling goes through a seeded `DistributedSampler` (one replica when not distributed) and each epoch reseeds
augmentation, so an epoch is the same whether the run was interrupted before it or not.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2 as T

from .errors import UserError
from .recipe import DataCfg

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the official code


class DataError(UserError, ValueError):
    """A data problem, said in one line that names the path."""


def _augment(preset: str, size: int) -> list:
    if preset == "cifar":  # pad-4 crop + flip
        return [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    if preset == "imagenet":  # the paper's RandomResizedCrop + flip
        return [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
    return []


def _image_transforms(cfg: DataCfg, train: bool) -> T.Compose:
    size = cfg.image_size
    if train:
        geometry = _augment(cfg.augment, size)
        if cfg.augment != "imagenet":
            geometry = [T.Resize(size, antialias=True), T.CenterCrop(size), *geometry]
    elif cfg.augment == "imagenet":
        geometry = [T.Resize(int(size / 0.875), antialias=True), T.CenterCrop(size)]
    else:
        geometry = [T.Resize(size, antialias=True), T.CenterCrop(size)]
    return T.Compose([T.ToImage(), *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


class TransformedTensors(Dataset):
    """Tensor images with a per-sample transform (digits are tensors from the start)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.labels[i]


def _digits(cfg: DataCfg, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 8x8 in [0, 1]
    x = F.interpolate(x, size=cfg.image_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    # the split is fixed (not the recipe seed): test numbers stay comparable across runs
    train_idx, test_idx = train_test_split(torch.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    augment = T.Compose(_augment(cfg.augment, cfg.image_size)) if cfg.augment == "cifar" else None
    return (TransformedTensors(x[train_idx], y[train_idx], augment), TensorDataset(x[test_idx], y[test_idx]), 10)


def _decode_checked(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"image cannot be decoded: {path} ({e.__class__.__name__})") from None


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose undecodable images fail with their path, or are skipped (the next image stands in).

    Skipped images are flagged in shared memory, so loader worker processes count into the same place."""

    def __init__(self, root, transform, skip_bad: bool):
        super().__init__(root, transform=transform, loader=_decode_checked)
        self.skip_bad = skip_bad
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except DataError:
                if not self.skip_bad:
                    raise
                if not self.bad[i]:
                    self.bad[i] = 1
                    print(f"warning: skipped undecodable image {self.samples[i][0]}", file=sys.stderr)
        raise DataError(f"no decodable image in {self.root}")


def check_data_root(cfg: DataCfg) -> tuple[Path, Path]:
    """An ImageFolder root's train/ and val/ (or test/) folders; a missing root or layout is one line naming
    data.root, the layout it needs and how to provide it."""
    root = Path(cfg.root)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if root.is_dir() and train_dir.is_dir() and test_dir is not None:
        return train_dir, test_dir
    what = "not found" if not root.is_dir() else "lacks train/ and val/ (or test/)"
    raise DataError(f"data.root {cfg.root} {what}: it must hold train/ and val/ (or test/) with one folder of "
                    f"images per class; link the dataset there (ln -s /path/to/cifar10 {cfg.root}), point at it "
                    f"(--set data.root=/path/to/dataset), or for CIFAR-10 set data.kind: cifar10 with "
                    f"download: true")


def _imagefolder(cfg: DataCfg):
    train_dir, test_dir = check_data_root(cfg)
    sets = []
    for split, train in ((train_dir, True), (test_dir, False)):
        try:
            sets.append(CheckedImageFolder(split, _image_transforms(cfg, train), cfg.bad_images == "skip"))
        except FileNotFoundError as e:  # torchvision: no class folders, or a class folder with no image
            raise DataError(f"{split}: {str(e).splitlines()[0]}") from None
    train_set, test_set = sets
    if train_set.classes != test_set.classes:
        raise DataError(f"{test_dir}: classes differ from {train_dir}")
    return train_set, test_set, len(train_set.classes)


def _cifar10(cfg: DataCfg):
    root = Path(cfg.root)
    try:
        train = datasets.CIFAR10(root, train=True, transform=_image_transforms(cfg, True), download=cfg.download)
        test = datasets.CIFAR10(root, train=False, transform=_image_transforms(cfg, False), download=cfg.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"data.root {root}: {e} (set data.download: true to fetch it)") from None
    return train, test, 10


EVAL_SEED = 0  # evaluation subsets are drawn with this seed, not the run's: every run scores the same images


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every image's label, read without decoding an image (ImageFolder and CIFAR-10 `targets`, tensor labels)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TransformedTensors):
        return dataset.labels.numpy()
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets)
    raise DataError(f"data: cannot read the labels of a {type(dataset).__name__} without loading its images")


def stratified_indices(labels: np.ndarray, n: int, seed: int = EVAL_SEED) -> list[int]:
    """`n` indices (all, if there are fewer), in ascending order, drawn by scikit-learn's stratified `resample`
    (seeded): each class takes the floor of its share of `n`, the classes with the largest remainders one more
    (ties drawn at random), each class's images drawn at random. A test subset of a class-sorted folder so holds
    every class in its proportion, where the first `n` images would hold the first classes only. `resample`, not
    `train_test_split`: the latter refuses a class of one image and fewer than one image per class on either
    side."""
    if n >= len(labels):
        return list(range(len(labels)))
    from sklearn.utils import resample

    picked = resample(np.arange(len(labels)), replace=False, n_samples=n, stratify=labels, random_state=seed)
    return sorted(int(i) for i in picked)


def stratified_subset(dataset: Dataset, n: int | None) -> Dataset:
    """`dataset`'s stratified sample of `n` images (`stratified_indices`); all of it for None."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, stratified_indices(dataset_labels(dataset), n))


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:n].tolist())


@dataclass
class Data:
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    cfg: DataCfg
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True
        )

    def _loader(self, dataset, **kw) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            **kw,
        )

    def train_loader(self, epoch: int) -> DataLoader:
        """The training batches of `epoch`: the same shuffle and augmentation whenever it is run."""
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.seed * 1000 + epoch)
        return self._loader(self.train_set, sampler=self.sampler, drop_last=True)

    def with_train_subset(self, n: int | None) -> Data:
        """The same data, training on the first `n` training images of a fixed shuffled order (None: all)."""
        if n is None or n >= len(self.train_set):
            return self
        return dataclasses.replace(self, train_set=_subset(self.train_set, n, self.seed))

    def reseeded(self, seed: int | None) -> Data:
        """The same data with `seed` for its shuffles, training subsets and calibration images (None: as it is)."""
        return self if seed is None or seed == self.seed else dataclasses.replace(self, seed=seed)

    def images_per_epoch(self) -> int:
        """Training images one epoch shows, over all processes (the incomplete last batch dropped)."""
        return self.steps_per_epoch() * self.cfg.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        """Batches per training epoch on this process (the last, incomplete batch is dropped)."""
        return len(self.sampler) // self.cfg.batch_size

    def test_loader(self, shard: bool = False, limit: int | None = None) -> DataLoader:
        """The test batches, in a fixed order: a stratified sample of `limit` images when given
        (`stratified_subset`, the same whatever the run's seed). With `shard` under DDP, only this process's
        share: every world_size-th image from its rank on, an exact partition of the test set (a
        DistributedSampler would pad it with repeated images), for `evaluate(..., all_reduce=True)` on every
        rank."""
        dataset = stratified_subset(self.test_set, limit)
        if shard and self.world_size > 1:
            dataset = Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))
        return self._loader(dataset, shuffle=False)

    def test_sample_loader(self, size: int) -> DataLoader:
        """`size` test images, stratified (`stratified_subset`): every class even where the test set is sorted by
        class, as an ImageFolder is."""
        return self._loader(stratified_subset(self.test_set, size), shuffle=False)

    def test_images(self, limit: int | None = None) -> dict:
        """Which test images `test_loader(limit=limit)` scores, for the summary: their count and a hash of their
        indices in the full test set."""
        dataset = stratified_subset(self.test_set, limit)
        indices = _indices(dataset)
        digest = hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
        return {"images": len(indices), "sha256": digest}

    def calibration_loader(self, size: int) -> DataLoader:
        """`size` training images in a fixed order, with test-time transforms (no augmentation)."""
        return self._loader(_subset(_without_augmentation(self.train_set, self.cfg), size, self.seed), shuffle=False)

    def skipped_images(self) -> int:
        """Undecodable images skipped so far (ImageFolder data with data.bad_images=skip)."""
        sets = [d.dataset if isinstance(d, Subset) else d for d in (self.train_set, self.test_set)]
        return sum(int(d.bad.sum()) for d in sets if isinstance(d, CheckedImageFolder))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.stack([self.test_set[i][0] for i in range(batch)])


def _indices(dataset: Dataset) -> list[int]:
    """The indices of `dataset`'s images in the dataset beneath all its Subsets."""
    if isinstance(dataset, Subset):
        inner = _indices(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(range(len(dataset)))


def _without_augmentation(dataset: Dataset, cfg: DataCfg) -> Dataset:
    if isinstance(dataset, Subset):
        return Subset(_without_augmentation(dataset.dataset, cfg), dataset.indices)
    if isinstance(dataset, TransformedTensors):
        return TensorDataset(dataset.images, dataset.labels)
    plain = copy.copy(dataset)  # ImageFolder / CIFAR10: same files, test-time transform
    plain.transform = _image_transforms(cfg, train=False)
    return plain


def build_data(cfg: DataCfg, seed: int = 0, rank: int = 0, world_size: int = 1) -> Data:
    if cfg.kind == "digits":
        train, test, classes = _digits(cfg, seed)
    elif cfg.kind == "imagefolder":
        train, test, classes = _imagefolder(cfg)
    else:
        train, test, classes = _cifar10(cfg)
    train, test = _subset(train, cfg.train_subset, seed), stratified_subset(test, cfg.test_subset)
    if len(train) < cfg.batch_size * world_size:
        raise DataError(f"data: {len(train)} training images, fewer than one batch of {cfg.batch_size * world_size}")
    return Data(train, test, classes, cfg, seed, rank, world_size)
