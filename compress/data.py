"""Datasets the recipe names: embedded digits (no download), an ImageFolder, or CIFAR-10 python batches.

Small images (`DataCfg.tensor_batches`: an ImageFolder or CIFAR-10 at most 64 px square, augmented as cifar or not
at all) are decoded once into uint8 tensors with the test-time geometry (resize, centre crop), an ImageFolder's
cached on disk (`load_or_decode`), and the training batches are cut and augmented as tensors in the training
process (`EpochBatches`): no worker processes, whose per-image work costs more than a small model's step. Epoch e
of a run seeded s is one permutation of the training set and one crop and flip per position in it, drawn from a
generator seeded s * 1000 + e (`epoch_plan`); under torchrun each rank takes every world_size-th position. Past
`MEMORY_CAP_BYTES` of decoded images, DataLoader workers decode the batches of the same plan instead.

Other data goes through a DataLoader whose shuffle is a seeded `DistributedSampler` (one replica when not
distributed), with augmentation reseeded each epoch. Either way an epoch's batches are a function of the seed, the
epoch and the rank: the same whether the run was interrupted before it or not.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .errors import UserError
from .files import torch_save
from .keys import digest
from .recipe import DataCfg

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as the official code
# Decoded training and test images held in memory at most (uint8, both sets together; CIFAR-10 at 64 px takes
# 0.7 GiB): past it, DataLoader workers decode each batch instead. Under torchrun the ranks map one cache file, so
# the page cache holds it once.
MEMORY_CAP_BYTES = 4 * 2**30
CACHE_FORMAT = 1  # bump when a cache file's content changes meaning: older files are rebuilt, not misread
POOL_MIN_IMAGES = 2000  # fewer images are decoded in this process: starting a pool costs more
PAD = 4  # the cifar augmentation's zero padding on each side, as torchvision's RandomCrop(size, padding=4)


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


def _train_transforms(cfg: DataCfg) -> T.Compose:
    """A training image's transform: augmented, except under tensor batches, which augment whole batches."""
    return _image_transforms(cfg, train=not cfg.tensor_batches)


def _imagefolder(cfg: DataCfg):
    train_dir, test_dir = check_data_root(cfg)
    if cfg.tensor_batches:
        in_memory = _imagefolder_in_memory(cfg, train_dir, test_dir)
        if in_memory is not None:
            return in_memory
    sets = []
    for split, transform in ((train_dir, _train_transforms(cfg)), (test_dir, _image_transforms(cfg, False))):
        try:
            sets.append(CheckedImageFolder(split, transform, cfg.bad_images == "skip"))
        except FileNotFoundError as e:  # torchvision: no class folders, or a class folder with no image
            raise DataError(f"{split}: {str(e).splitlines()[0]}") from None
    train_set, test_set = sets
    if train_set.classes != test_set.classes:
        raise DataError(f"{test_dir}: classes differ from {train_dir}")
    return train_set, test_set, len(train_set.classes)


def _cifar10(cfg: DataCfg):
    root = Path(cfg.root)
    try:
        train = datasets.CIFAR10(root, train=True, transform=_train_transforms(cfg), download=cfg.download)
        test = datasets.CIFAR10(root, train=False, transform=_image_transforms(cfg, False), download=cfg.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"data.root {root}: {e} (set data.download: true to fetch it)") from None
    if cfg.tensor_batches and _fits_in_memory(len(train) + len(test), cfg.image_size):
        return _cifar10_tensors(train, cfg.image_size), _cifar10_tensors(test, cfg.image_size), 10
    return train, test, 10


# ---- small images in memory -------------------------------------------------------------------------------------
@functools.cache
def _geometry(size: int) -> T.Compose:
    """The test-time geometry of `_image_transforms` (augment cifar or none) on a decoded image, kept uint8."""
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size), T.ToPureTensor()])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) as the model takes them: float in [0, 1], normalised by MEAN and STD (the
    kernels of `_image_transforms`' last two steps, so the values are those of the per-image path, bit for bit)."""
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), MEAN, STD)


class ImageTensors(Dataset):
    """Decoded images held as uint8 tensors (N, 3, H, W) with int64 labels. An item is an image as the test-time
    transform gives it (normalised float); training batches read `images` directly and augment them
    (`EpochBatches`). `skipped` counts the undecodable images left out (data.bad_images: skip)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, skipped: int = 0):
        self.images, self.labels, self.skipped = images, labels, skipped

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return normalise(self.images[i]), self.labels[i]


def _fits_in_memory(images: int, size: int) -> bool:
    """Whether `images` decoded images of `size` pixels square fit under MEMORY_CAP_BYTES; if not, one line on
    stderr says so and that DataLoader workers decode them instead."""
    needed = images * 3 * size * size
    if needed <= MEMORY_CAP_BYTES:
        return True
    print(f"data: {images} images at {size}x{size} take {needed / 2**30:.1f} GiB decoded, over the "
          f"{MEMORY_CAP_BYTES / 2**30:g} GiB held in memory: DataLoader workers (data.workers) decode each batch "
          f"instead", file=sys.stderr, flush=True)
    return False


def _cifar10_tensors(dataset: datasets.CIFAR10, size: int) -> ImageTensors:
    """CIFAR-10's python batches (already uint8 arrays) as ImageTensors at `size`."""
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    if size != images.shape[-1]:
        images = torch.cat([_geometry(size)(chunk) for chunk in images.split(1024)])
    return ImageTensors(images.contiguous(), torch.tensor(dataset.targets, dtype=torch.int64))


def data_cache_dir(given: Path | None) -> Path:
    """Where decoded ImageFolders are cached: `given` (data.cache_dir), else the `data` folder of the latency
    tables' cache directory ($XDG_CACHE_HOME/repvgg-compress, else ~/.cache/repvgg-compress)."""
    if given is not None:
        return Path(given)
    from .prune.latency import cache_dir  # the prune package's imports (ONNX) only where no folder is given

    return cache_dir(None) / "data"


def _scan(split: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """An ImageFolder split's classes and (path, label) samples, in ImageFolder's order."""
    try:
        classes, class_to_idx = datasets.folder.find_classes(str(split))
        return classes, datasets.folder.make_dataset(str(split), class_to_idx, extensions=datasets.folder.IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision: no class folders, or a class folder with no image
        raise DataError(f"{split}: {str(e).splitlines()[0]}") from None


def cache_key(split: Path, size: int, samples: list[tuple[str, int]]) -> dict:
    """What an ImageFolder split's decoded images depend on: the split's resolved folder, the size, each file's
    relative path, label, size and modification time, and the decoding libraries' versions."""
    files = hashlib.sha256()
    for path, label in samples:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise DataError(f"image cannot be read: {path} ({e.__class__.__name__})") from None
        files.update(f"{os.path.relpath(path, split)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"format": CACHE_FORMAT, "root": str(split.resolve().parent), "split": split.name, "size": size,
            "geometry": "resize_center_crop", "images": len(samples), "files_sha256": files.hexdigest(),
            "pillow": PIL.__version__, "torchvision": torchvision.__version__}


def _decode_small(task: tuple[str, int]) -> np.ndarray | str:
    """One image decoded with the test-time geometry as a uint8 (3, size, size) array, or the one-line reason it
    cannot be decoded."""
    path, size = task
    try:
        return _geometry(size)(_decode_checked(path)).numpy()
    except DataError as e:
        return str(e)


def _one_thread() -> None:
    torch.set_num_threads(1)  # as DataLoader workers: the pool's processes already fill the cores


def _decoded(samples: list[tuple[str, int]], size: int, what: str) -> Iterator[np.ndarray | str]:
    """`_decode_small` of every sample, in order: in a process pool over the usable cores for many images."""
    tasks = [(path, size) for path, _ in samples]
    processes = min(len(os.sched_getaffinity(0)), 16)
    bar = dict(total=len(tasks), desc=f"decoding {what}", unit="img", disable=None, mininterval=2, file=sys.stderr)
    if len(tasks) < POOL_MIN_IMAGES or processes < 2:
        yield from tqdm(map(_decode_small, tasks), **bar)
        return
    with multiprocessing.get_context().Pool(processes, initializer=_one_thread) as pool:
        yield from tqdm(pool.imap(_decode_small, tasks, chunksize=256), **bar)


def _decode_split(split: Path, samples: list[tuple[str, int]], size: int, skip_bad: bool, key: dict) -> dict:
    """The cache record of one split: its decodable images and their labels, and the skipped files (relative)."""
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    keep, skipped = [], []
    results = _decoded(samples, size, str(split))
    try:
        for i, decoded in enumerate(results):
            if isinstance(decoded, str):
                if not skip_bad:
                    raise DataError(decoded)
                skipped.append(os.path.relpath(samples[i][0], split))
                continue
            images[len(keep)] = torch.from_numpy(decoded)
            keep.append(samples[i][1])
    finally:
        results.close()  # a failure stops the pool now, not when the traceback is freed
    return {"key": key, "images": images[:len(keep)].clone() if skipped else images,
            "labels": torch.tensor(keep, dtype=torch.int64), "skipped": skipped}


def _read_cache(path: Path, key: dict) -> dict | None:
    """The cache record at `path` when it was written for exactly `key`, memory-mapped (ranks share its pages);
    None when missing, unreadable or of another key."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged file of any kind is rebuilt
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def load_or_decode(split: Path, samples: list[tuple[str, int]], size: int, bad_images: str,
                   directory: Path) -> ImageTensors:
    """An ImageFolder split's images decoded with the test-time geometry, read from the cache in `directory` when
    its key (`cache_key`) matches, else decoded and cached (under a file lock: of ranks starting together one
    decodes, the others then read). An undecodable image fails with its path under bad_images=fail (also when the
    cache recorded it skipped), and is left out, said and counted under skip."""
    key = cache_key(split, size, samples)
    path = Path(directory) / f"images-{digest(key)}.pt"
    record = _read_cache(path, key)
    if record is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            record = _read_cache(path, key)
            if record is None:
                record = _decode_split(split, samples, size, bad_images == "skip", key)
                torch_save(record, path)
    for name in record["skipped"]:
        if bad_images != "skip":
            raise DataError(f"image cannot be decoded: {split / name} (set data.bad_images: skip to leave it out)")
        print(f"warning: skipped undecodable image {split / name}", file=sys.stderr)
    return ImageTensors(record["images"], record["labels"], len(record["skipped"]))


def _imagefolder_in_memory(cfg: DataCfg, train_dir: Path, test_dir: Path):
    """(train, test, classes) as ImageTensors, or None past the memory cap."""
    (classes, train), (test_classes, test) = _scan(train_dir), _scan(test_dir)
    if classes != test_classes:
        raise DataError(f"{test_dir}: classes differ from {train_dir}")
    if not _fits_in_memory(len(train) + len(test), cfg.image_size):
        return None
    directory = data_cache_dir(cfg.cache_dir)
    sets = [load_or_decode(d, samples, cfg.image_size, cfg.bad_images, directory)
            for d, samples in ((train_dir, train), (test_dir, test))]
    return sets[0], sets[1], len(classes)


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding=4) then RandomHorizontalFlip on a uint8 batch (B, C, H, W), with
    the draws given: image b zero-padded by PAD on each side, cropped back to H x W at top-left `offsets[b]`
    (row, column; each in 0..2 * PAD), mirrored left-right where `flips[b]`. One gather over each padded image's
    flattened pixels for the whole batch (a fraction of a millisecond for 128 x 3 x 32 x 32 on one core)."""
    b, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # fill 0 on uint8, before normalisation, as RandomCrop's fill=0
    rows = offsets[:, 0, None] + torch.arange(h)
    columns = torch.where(flips[:, None], torch.arange(w - 1, -1, -1), torch.arange(w)) + offsets[:, 1, None]
    pixels = (rows[:, :, None] * (w + 2 * PAD) + columns[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, pixels).view(b, c, h, w)


@dataclass
class EpochPlan:
    """One process's share of a training epoch: the dataset positions of each batch (steps, batch), and with
    augmentation each image's crop offsets (steps, batch, 2) and flips (steps, batch)."""

    positions: torch.Tensor
    offsets: torch.Tensor | None = None
    flips: torch.Tensor | None = None


def epoch_plan(images: int, batch_size: int, seed: int, epoch: int, augment: bool, rank: int = 0,
               world_size: int = 1) -> EpochPlan:
    """Epoch `epoch`'s batches on `rank`: a permutation of the `images` positions, and with `augment` one crop
    offset pair and flip per position in it, all drawn from a generator seeded seed * 1000 + epoch, so an epoch
    is the same whether others ran before it and what each position shows does not depend on the world size.
    The permutation is cut to a multiple of world_size x batch_size (the last, incomplete batch dropped) and rank
    r takes its positions r, r + world_size, ..., batch_size at a time."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(images, generator=generator)
    steps = images // (batch_size * world_size)
    mine = slice(rank, steps * batch_size * world_size, world_size)
    plan = EpochPlan(order[mine].view(steps, batch_size))
    if augment:
        offsets = torch.randint(0, 2 * PAD + 1, (images, 2), generator=generator)
        flips = torch.randint(0, 2, (images,), generator=generator).bool()
        plan.offsets, plan.flips = offsets[mine].view(steps, batch_size, 2), flips[mine].view(steps, batch_size)
    return plan


class EpochBatches:
    """One epoch's training batches on one process, (images, labels) as the model takes them: uint8 batches from
    `source` (a fresh iterator per pass, in the plan's order), augmented as the plan says, then normalised."""

    def __init__(self, plan: EpochPlan, source: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]):
        self.plan, self.source = plan, source

    def __len__(self) -> int:
        return len(self.plan.positions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.source())
        for step in range(len(self)):
            with _one_thread_here():
                images, labels = next(batches)
                if self.plan.offsets is not None:
                    images = augment_batch(images, self.plan.offsets[step], self.plan.flips[step])
                images = normalise(images)
            yield images, labels


@contextmanager
def _one_thread_here():
    """torch on one intra-op thread inside, the caller's count restored after (a 0.2 us switch). A batch's gather,
    crop and normalisation take about 2 ms on one core: split over threads, their synchronisation costs more than
    it saves, and where another process holds a core, threads waiting for a descheduled peer stall them (CIFAR-10's
    epoch of batches took 12 s on two busy cores, 0.9 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _geometry_only(dataset: Dataset, size: int) -> Dataset:
    """`dataset` (an ImageFolder or CIFAR-10 under Subsets) yielding uint8 images with the test-time geometry."""
    if isinstance(dataset, Subset):
        return Subset(_geometry_only(dataset.dataset, size), dataset.indices)
    raw = copy.copy(dataset)  # the same files (and skip flags), another transform
    raw.transform = _geometry(size)
    return raw


EVAL_SEED = 0  # evaluation subsets are drawn with this seed, not the run's: every run scores the same images


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every image's label, read without decoding an image (ImageFolder and CIFAR-10 `targets`, tensor labels)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, (TransformedTensors, ImageTensors)):
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
        if not self.cfg.tensor_batches:
            self.sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                              shuffle=True, seed=self.seed, drop_last=True)

    def _loader(self, dataset, **kw) -> DataLoader:
        in_memory = isinstance(_base(dataset), ImageTensors)  # nothing to decode: workers would only add copies
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            num_workers=0 if in_memory else self.cfg.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            **kw,
        )

    def train_loader(self, epoch: int) -> Iterable:
        """The training batches of `epoch`: the same shuffle and augmentation whenever it is run (under tensor
        batches an `EpochBatches` of `epoch_plan`, else a DataLoader)."""
        torch.manual_seed(self.seed * 1000 + epoch)  # anything else random in a step is seeded per epoch too
        if self.cfg.tensor_batches:
            return self._tensor_batches(epoch)
        self.sampler.set_epoch(epoch)
        return self._loader(self.train_set, sampler=self.sampler, drop_last=True)

    def _tensor_batches(self, epoch: int) -> EpochBatches:
        plan = epoch_plan(len(self.train_set), self.cfg.batch_size, self.seed, epoch, self.cfg.augment == "cifar",
                          self.rank, self.world_size)
        base = _base(self.train_set)
        if isinstance(base, ImageTensors):
            index = torch.as_tensor(_indices(self.train_set), dtype=torch.int64)

            def gather():
                for positions in plan.positions:
                    picked = index[positions]
                    yield base.images.index_select(0, picked), base.labels.index_select(0, picked)

            return EpochBatches(plan, gather)
        # past the memory cap: workers decode the plan's batches, augmented here alike
        loader = DataLoader(_geometry_only(self.train_set, self.cfg.image_size), batch_sampler=plan.positions.tolist(),
                            num_workers=self.cfg.workers, persistent_workers=False)
        return EpochBatches(plan, lambda: loader)

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
        if self.cfg.tensor_batches:
            return len(self.train_set) // (self.cfg.batch_size * self.world_size)
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
        sets = [_base(d) for d in (self.train_set, self.test_set)]
        return sum(int(d.bad.sum()) if isinstance(d, CheckedImageFolder) else d.skipped
                   for d in sets if isinstance(d, (CheckedImageFolder, ImageTensors)))

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
    if isinstance(dataset, ImageTensors):  # its items are not augmented
        return dataset
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
