"""Turn a data spec (a path) into train/val datasets and loaders.

Accepted formats, detected from the path:

- ``imagefolder``: a directory with ``train/`` and ``val/`` subfolders, one folder per class;
- ``npz``: a ``.npz`` file with ``x_train, y_train, x_val, y_val`` (NCHW, NHWC or NHW);
- ``idx``: a directory of MNIST-format idx files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
  ``t10k-labels-idx1-ubyte[.gz]``; t10k is the validation split), e.g. Fashion-MNIST;
- ``cifar10``: the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``).

Samples are ``(float32 CHW tensor, int64 label)``. uint8 pixels are scaled to [0, 1];
then ``(x - mean) / std`` when mean/std are given. Array formats stay in memory as
uint8 where possible and are converted batch by batch (``__getitems__``); image folders
are decoded one file per ``__getitem__``, so loader workers decode them in parallel.

Augmentation (``augment``, the recipe's ``data.augment``) touches the training split
only. ``standard``: a random resized crop and a horizontal flip for ImageNet-size images
(the smaller side >= :data:`LARGE_SIDE`), a random crop of the image padded by side/8
and a flip for small ones; image folders are then evaluated resized by 256/224 and
center-cropped (large images; small ones are only resized). ``auto``: standard for image
folders, none for the in-memory formats. Random draws come from torch's generator of the
process that decodes the sample: the run's seeded one with no workers, else the one
torch seeds per worker from the train loader's seeded generator.
"""

from __future__ import annotations

import builtins
import copy
import gzip
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from compressor.errors import DataError

__all__ = [
    "FORMATS",
    "LARGE_SIDE",
    "MAX_AUTO_WORKERS",
    "ArrayDataset",
    "DataSplits",
    "check_input_shape",
    "check_labels",
    "load_data",
    "make_loaders",
    "resolve_workers",
    "subset",
]

log = logging.getLogger(__name__)

FORMATS = (
    "an ImageFolder directory with train/ and val/ subfolders",
    "an .npz file with x_train, y_train, x_val, y_val",
    "a directory of MNIST idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
    "a CIFAR-10 python batches directory (data_batch_1..5, test_batch)",
)

AUGMENTS = ("auto", "none", "standard")  # the recipe's data.augment (its schema names them too)
LARGE_SIDE = 64  # from this smaller image side on, ``standard`` uses ImageNet-style crops
EVAL_RESIZE = 256 / 224  # image folders are evaluated resized by this, then center-cropped
MAX_AUTO_WORKERS = 8  # ``workers: auto`` uses at most this many loader processes


@dataclass
class DataSplits:
    """Train and validation datasets plus what the model must fit."""

    train: Dataset
    val: Dataset
    num_classes: int  # max label + 1 over both splits
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    source: str  # "imagefolder", "npz", "idx" or "cifar10"
    path: str = ""
    max_label: int = -1
    # what the stored values are multiplied by before mean/std: 1/255 for uint8 images
    # (ImageFolder too), 1.0 for float arrays (used as stored)
    scale: float = 1 / 255
    augment: str = "none"  # the training split's augmentation: "none" or "standard"
    # how a list of samples becomes a batch (the loaders' ``collate_fn``); None: PyTorch's
    # default (stacked tensors). Detection's batches are lists (compressor.detection.collate)
    collate: Callable | None = None

    @property
    def decoded_per_item(self) -> bool:
        """Whether samples are decoded from files one by one (loader workers help) rather
        than sliced from arrays in memory (workers only add copies)."""
        return self.source == "imagefolder"


class ArrayDataset(Dataset):
    """In-memory images ``x`` (N, C, H, W; uint8 or float) and labels ``y`` (N,) int64.

    Samples are float32: uint8 scaled by 1/255, then normalised by ``mean``/``std``.
    ``augment``, when given, transforms each stored (C, H, W) image first (a random crop
    and flip: see :func:`_train_augmentation`).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean=None, std=None, augment=None):
        self.x = x
        self.y = y.to(torch.int64)
        c = x.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return self.x.shape[0]

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def __getitem__(self, index):
        x = self.x[index]
        if self.augment is not None:
            x = self.augment(x)
        return self._convert(x), self.y[index]

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.x[index]
        if self.augment is not None:
            x = torch.stack([self.augment(v) for v in x])
        xs = self._convert(x)
        return list(zip(xs.unbind(0), self.y[index].unbind(0), strict=True))


# ----------------------------------------------------------------------------
# Public entry points


def load_data(
    spec: str | os.PathLike,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    augment: str = "none",
) -> DataSplits:
    """Read the data at ``spec``; see the module docstring for the formats.

    ``input_shape`` (C, H, W), when given, is what samples are converted to: resized to
    H x W, and converted to grayscale (C == 1) or replicated to 3 channels (C == 3 from 1).
    ``augment`` (``auto``, ``none`` or ``standard``; the recipe's ``data.augment``, whose
    default is ``auto``) is the training split's augmentation, see the module docstring;
    the result's ``augment`` says which one was applied.
    """
    path = Path(spec).expanduser()
    if augment not in AUGMENTS:
        raise DataError(
            f"The augmentation must be one of {', '.join(AUGMENTS)} (`data.augment`). "
            f"Got {augment!r} instead."
        )
    if not path.exists():
        raise DataError(f"Data path {path} does not exist. Pass one of: {_formats()}.")
    if input_shape is not None:
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise DataError(
                f"The input shape must be 3 positive ints (C, H, W). Got {list(input_shape)} instead."
            )
    if (mean is None) != (std is None):
        raise DataError(
            "Normalisation needs both mean and std (one value per channel), or neither."
        )
    if std is not None and any(not (float(s) > 0) for s in std):
        raise DataError(f"Normalisation std values must be > 0. Got {list(std)} instead.")

    if path.is_file() and path.suffix == ".npz":
        source, loaded = "npz", _load_npz(path)
    elif path.is_dir() and (path / "train").is_dir() and (path / "val").is_dir():
        augment = "standard" if augment == "auto" else augment
        return _load_imagefolder(path, mean=mean, std=std, input_shape=input_shape, augment=augment)
    elif path.is_dir() and _find_idx(path, "train", "images", required=False) is not None:
        source, loaded = "idx", _load_idx_dir(path)
    elif path.is_dir() and _cifar_dir(path) is not None:
        source, loaded = "cifar10", _load_cifar_dir(_cifar_dir(path))
    else:
        raise DataError(f"Cannot tell the data format of {path}. Pass one of: {_formats()}.")

    (x_train, y_train), (x_val, y_val) = loaded
    scale = 1 / 255 if x_train.dtype == torch.uint8 else 1.0  # as stored, before _conform
    x_train, x_val = (_conform(x, input_shape) for x in (x_train, x_val))
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(
            f"Train and val images in {path} differ in shape: {tuple(x_train.shape[1:])} vs "
            f"{tuple(x_val.shape[1:])}. Save both splits at the same size, or pass an input shape."
        )
    shape = tuple(int(v) for v in x_train.shape[1:])
    _check_mean_std(mean, std, shape[0], path)
    max_label = int(max(y_train.max(), y_val.max()))
    augment = "none" if augment == "auto" else augment  # in memory: as stored unless asked
    crop = transforms.Compose(_train_augmentation(shape[1:])) if augment == "standard" else None
    return DataSplits(
        train=ArrayDataset(x_train, y_train, mean, std, augment=crop),
        val=ArrayDataset(x_val, y_val, mean, std),
        num_classes=max_label + 1,
        input_shape=shape,
        source=source,
        path=str(path),
        max_label=max_label,
        scale=scale,
        augment=augment,
    )


def check_labels(
    splits: DataSplits,
    num_classes: int,
    *,
    classifier: str | None = None,
    resizable: bool = False,
) -> None:
    """Raise if a label does not index one of the model's ``num_classes`` outputs.

    The message says what to check: the labels' range (1-based labels are named as such)
    and the model's classifier (``classifier``, e.g. ``"fc3, Linear 84 -> 10"``). It
    suggests ``--num-classes`` only when ``resizable`` (the classifier's size is not fixed
    by the checkpoint's weights); otherwise that flag cannot help, and it says so.
    """
    max_label = splits.max_label if splits.max_label >= 0 else splits.num_classes - 1
    if max_label < num_classes:
        return
    where = splits.path or "The data"
    head = f" (classifier {classifier})" if classifier else ""
    if splits.source == "imagefolder":
        found = f"{where} has {max_label + 1} class folders (labels 0..{max_label})"
    else:
        found = f"{where}: labels go up to {max_label}"
    hint = ""
    y = [getattr(ds, "y", None) for ds in (splits.train, splits.val)]
    if all(isinstance(t, torch.Tensor) for t in y):
        labels = torch.cat(y)
        low, distinct = int(labels.min()), int(labels.unique().numel())
        found += f" ({distinct} distinct values, {low}..{max_label})"
        if low == 1 and max_label == num_classes:
            hint = f" They look 1-based: subtract 1 so that they run 0..{num_classes - 1}."
    if resizable:
        fix = f"If the data really has {max_label + 1} classes, pass --num-classes {max_label + 1}."
    else:
        fix = (
            f"If the data really has {max_label + 1} classes, this checkpoint does not fit it: "
            f"--num-classes cannot change its {num_classes} outputs, which the checkpoint's "
            "classifier weights fix."
        )
    raise DataError(
        f"{found}, but the model has {num_classes} outputs{head}, so labels must be "
        f"0..{num_classes - 1}: the labels exceed the model's classes.{hint} Check the labels' "
        f"range in the data and that the checkpoint was trained on these classes. {fix}"
    )


def check_input_shape(splits: DataSplits, expected_shape: Sequence[int | None]) -> None:
    """Raise if samples are not ``expected_shape`` (C, H, W); ``None`` entries match anything."""
    expected = tuple(expected_shape)
    actual = tuple(splits.input_shape)
    if len(expected) == len(actual) and all(
        e is None or e == a for e, a in zip(expected, actual, strict=True)
    ):
        return
    if len(expected) == len(actual):
        want = [a if e is None else e for e, a in zip(expected, actual, strict=True)]
    else:
        want = list(expected)
    shown = tuple("*" if e is None else e for e in expected)
    compact = ",".join(str(v) for v in want)
    raise DataError(
        f"Samples in {splits.path or 'the data'} have shape {actual} (C, H, W) but the model "
        f"expects {shown}. Set `data.input_shape: {want}` in the recipe "
        f"(or --set data.input_shape=[{compact}]) to resize/convert the images, or fix the data."
    )


def resolve_workers(workers: int | str, splits: DataSplits) -> int:
    """Loader worker processes for ``workers`` (the recipe's ``data.workers``: an int >= 0,
    or ``auto``).

    ``auto``: for data decoded per item (image folders), the CPUs this process may use
    (``os.sched_getaffinity``) shared among the ranks on this host (``LOCAL_WORLD_SIZE``),
    less one for the training process, at most :data:`MAX_AUTO_WORKERS`; 0 for in-memory
    arrays, whose batches are one slice: workers would only add inter-process copies.
    """
    if workers != "auto":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise DataError(
                f"The number of loader workers must be an int >= 0 or 'auto' (`data.workers`, "
                f"--workers). Got {workers!r} instead."
            )
        return workers
    if not splits.decoded_per_item:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(MAX_AUTO_WORKERS, cpus // ranks - 1))


def make_loaders(
    splits: DataSplits,
    *,
    batch_size: int,
    seed: int,
    distributed: bool = False,
    num_workers: int | str = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled with a seeded generator) and val loader (in order).

    With ``distributed`` both use a ``DistributedSampler`` (call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch); the val sampler pads the last
    ranks with repeated samples, so exact val metrics should be computed on one rank.
    A final train batch of a single sample is dropped (BatchNorm cannot train on it).

    ``num_workers`` (an int, or ``auto``: see :func:`resolve_workers`) processes decode
    batches; ``pin_memory`` (for a CUDA device) has them copied into pinned memory. The
    val loader keeps its workers between passes (``persistent_workers``) and seeds them
    from a generator of its own, so evaluating draws nothing from the run's random
    streams. The train loader starts its workers per pass: each pass then draws the
    workers' seeds and the shuffle from the loader's generator exactly as with no
    workers, so ``--resume``, which restores that generator, repeats the shuffles and
    augmentations of an unbroken run (persistent workers would carry their random state
    over from the epochs before the interruption).
    """
    num_workers = resolve_workers(num_workers, splits)
    common = {"num_workers": num_workers, "pin_memory": pin_memory}
    if splits.collate is not None:
        common["collate_fn"] = splits.collate
    val_common = dict(common)
    if num_workers > 0:
        val_common.update(persistent_workers=True, generator=torch.Generator().manual_seed(seed))
    log.info(
        "data: %s, training augmentation %s, %d loader worker(s)%s",
        splits.source,
        splits.augment,
        num_workers,
        ", pinned memory" if pin_memory else "",
    )
    if distributed:
        train_sampler = DistributedSampler(splits.train, shuffle=True, seed=seed)
        val_sampler = DistributedSampler(splits.val, shuffle=False)
        per_rank = len(train_sampler)
        train = DataLoader(
            splits.train,
            batch_size=batch_size,
            sampler=train_sampler,
            drop_last=per_rank % batch_size == 1 and per_rank > 1,
            **common,
        )
        val = DataLoader(splits.val, batch_size=batch_size, sampler=val_sampler, **val_common)
        return train, val
    generator = torch.Generator()
    generator.manual_seed(seed)
    n = len(splits.train)
    train = DataLoader(
        splits.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=n % batch_size == 1 and n > 1,
        **common,
    )
    val = DataLoader(splits.val, batch_size=batch_size, shuffle=False, **val_common)
    return train, val


def unaugmented_train(splits: DataSplits) -> Dataset:
    """The training split with the validation split's preprocessing and no augmentation:
    what a calibration of the deployed model (INT8 activation ranges) should see."""
    train = splits.train
    if splits.augment == "none":
        return train
    view = copy.copy(train)
    if isinstance(train, ArrayDataset):
        view.augment = None
    else:  # an image folder: the validation split's resize and center crop
        view.transform = splits.val.transform
    return view


def subset(dataset: Dataset, n: int, seed: int) -> Subset:
    """``n`` samples of ``dataset`` drawn without replacement (all of it if smaller), seeded."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    total = len(dataset)
    indices = torch.randperm(total, generator=generator)[: max(0, min(n, total))]
    return Subset(dataset, indices.tolist())


# ----------------------------------------------------------------------------
# Helpers shared by the array formats


def _formats() -> str:
    return "; ".join(FORMATS)


def _check_mean_std(mean, std, channels: int, path: Path) -> None:
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise DataError(
                f"Normalisation {name} has {len(values)} values but the images in {path} have "
                f"{channels} channel(s); give one value per channel (e.g. `data.{name}` in the "
                "recipe), or set `data.input_shape` to convert the channels."
            )


def _labels(y: np.ndarray, name: str, path: Path) -> torch.Tensor:
    if y.ndim != 1:
        hint = " (one-hot? save y.argmax(1))" if y.ndim == 2 else ""
        raise DataError(
            f"{name} in {path} must be a 1-D array of class indices; got shape {y.shape}{hint}."
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(
                f"{name} in {path} must hold integer class indices; got non-integer values. "
                "Save labels as integers 0..num_classes-1."
            )
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise DataError(
            f"{name} in {path} must hold integer class indices; got dtype {y.dtype}. "
            "Save labels as integers 0..num_classes-1."
        )
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(
            f"{name} in {path} has negative labels (min {int(y.min())}); labels must be "
            "0..num_classes-1."
        )
    return torch.from_numpy(y)


def _images(
    x: np.ndarray, name: str, path: Path, channels_first: bool | None = None
) -> torch.Tensor:
    """(N, C, H, W) uint8 or float32 tensor from NCHW, NHWC or NHW arrays."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if channels_first is None:
            channels_first = not (x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3))
        if not channels_first:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{name} in {path} must be images of shape (N, C, H, W), (N, H, W, C) or (N, H, W); "
            f"got shape {x.shape}."
        )
    if x.dtype == np.uint8:
        out = torch.from_numpy(np.ascontiguousarray(x))
    elif x.dtype.kind == "f":
        out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise DataError(
            f"{name} in {path} has dtype {x.dtype}; save images as uint8 (0-255) or float."
        )
    return out


def _check_finite(x: np.ndarray, name: str, path: Path, split: str, offset: int = 0) -> None:
    """Raise if float images hold NaN or Inf, naming the file, the split and the first bad
    sample (its index in the split: ``offset`` + its index in ``x``). Checked once at load, in
    chunks, on the values as stored: otherwise they surface as a NaN loss or a failed export."""
    if x.dtype.kind != "f" or x.size == 0:
        return
    first, count = None, 0
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096]
        finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if not finite.all():
            if first is None:
                first = start + int(np.argmin(finite))
            count += int((~finite).sum())
    if first is None:
        return
    sample = np.asarray(x[first])
    value = sample[~np.isfinite(sample)].flat[0]
    what = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    where = np.unravel_index(int(np.argmax(~np.isfinite(sample))), sample.shape)
    raise DataError(
        f"{name} in {path} ({split} split) holds {what} at sample index {offset + first} "
        f"(position {tuple(int(i) for i in where)} in that sample; {count} of its {len(x)} "
        "samples hold non-finite values). Non-finite inputs make the training loss NaN; replace "
        "or drop those samples (e.g. with np.nan_to_num) and rerun."
    )


def _split(x: torch.Tensor, y: torch.Tensor, split: str, path: Path):
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"The {split} split in {path} has {x.shape[0]} images but {y.shape[0]} labels; "
            "they must have the same length."
        )
    if x.shape[0] == 0:
        raise DataError(f"The {split} split in {path} is empty; it needs at least one sample.")
    return x, y


def _conform(x: torch.Tensor, input_shape: tuple[int, int, int] | None) -> torch.Tensor:
    """Convert channels (1 -> 3 repeat, 3 -> 1 luma) and resize to H x W when asked."""
    if input_shape is None:
        return x
    c, h, w = input_shape
    if x.shape[1] != c:
        x = _to_float(x)
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1).contiguous()
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(
                f"Cannot convert images with {x.shape[1]} channels to {c}; "
                "set `data.input_shape` to match the data's channels."
            )
    if tuple(x.shape[2:]) != (h, w):
        x = _to_float(x)
        chunks = [
            F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            for part in x.split(4096)
        ]
        x = torch.cat(chunks)
    return x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------
# npz


def _load_npz(path: Path):
    keys = ("x_train", "y_train", "x_val", "y_val")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} is missing array(s) {', '.join(missing)} (found: "
                    f"{', '.join(archive.files) or 'none'}). Save it with "
                    "np.savez(path, x_train=..., y_train=..., x_val=..., y_val=...)."
                )
            arrays = {k: archive[k] for k in keys}
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(
            f"Cannot read {path}: {exc}. Object (pickled) arrays are refused; save plain "
            "numeric arrays."
        ) from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError ...
        raise DataError(f"Cannot read {path} as an .npz archive ({exc}); is it corrupt?") from None
    out = []
    for split in ("train", "val"):
        x = _images(arrays[f"x_{split}"], f"x_{split}", path)
        _check_finite(arrays[f"x_{split}"], f"x_{split}", path, split)
        y = _labels(arrays[f"y_{split}"], f"y_{split}", path)
        out.append(_split(x, y, split, path))
    return out


# ----------------------------------------------------------------------------
# MNIST idx

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_PREFIX = {"train": "train", "val": "t10k"}


def _find_idx(folder: Path, split: str, kind: str, required: bool = True) -> Path | None:
    ndim = 3 if kind == "images" else 1
    stem = f"{_IDX_PREFIX[split]}-{kind}"
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{stem}{sep}idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    if required:
        raise DataError(
            f"{folder} looks like MNIST idx data but {stem}-idx{ndim}-ubyte[.gz] is missing; "
            "it needs train-images, train-labels, t10k-images and t10k-labels files."
        )
    return None


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"Cannot read {path}: {exc}. The file is corrupt; download it again."
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an idx file (bad magic number {raw[:4].hex()}); it is corrupt or "
            "not MNIST-format data. Download it again."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete); download it again.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header (shape {dims}) needs {expected}; "
            "the file is truncated or corrupt. Download it again."
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _load_idx_dir(folder: Path):
    out = []
    for split in ("train", "val"):
        images_path = _find_idx(folder, split, "images")
        labels_path = _find_idx(folder, split, "labels")
        images, labels = _read_idx(images_path), _read_idx(labels_path)
        if images.ndim != 3:
            raise DataError(f"{images_path} must hold (N, H, W) images; got shape {images.shape}.")
        x = _images(images, images_path.name, folder)
        _check_finite(images, "the images", images_path, split)
        y = _labels(labels, labels_path.name, folder)
        out.append(_split(x, y, split, folder))
    return out


# ----------------------------------------------------------------------------
# CIFAR-10 python batches


def _cifar_dir(path: Path) -> Path | None:
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file() and any(folder.glob("data_batch_*")):
            return folder
    return None


def _numpy_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = np.ndarray.__reduce__(np.zeros(1))[0]
        allowed[(f"{core}.multiarray", "scalar")] = _scalar()
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer()
    return allowed


def _scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def _frombuffer():
    try:
        from numpy._core.numeric import _frombuffer as fb
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer as fb
    return fb


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused,
    so a crafted batch file cannot run code."""

    _builtins = {"dict", "list", "tuple", "bytes", "str", "int", "float", "bytearray", "set"}

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in self._builtins:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # protocol-2 bytes
            import codecs

            return codecs.encode
        allowed = _numpy_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise _RefusedGlobal(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"Refused to read {path}: {exc}. CIFAR-10 batches hold only a dict of arrays and "
            "lists; this file holds other objects. Download the official python batches."
        ) from None
    except Exception as exc:  # EOFError, ValueError ... on truncated or corrupt files
        raise DataError(
            f"Cannot read {path} ({type(exc).__name__}: {exc}); it is corrupt."
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', "
            f"got {keys}."
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if (
        data.ndim != 2
        or data.shape[1] % 3 != 0
        or int(math.isqrt(data.shape[1] // 3)) ** 2 * 3 != data.shape[1]
    ):
        raise DataError(f"{path}: b'data' must be (N, 3*H*W) with square images; got {data.shape}.")
    side = math.isqrt(data.shape[1] // 3)
    return data.reshape(-1, 3, side, side), labels


def _load_cifar_dir(folder: Path):
    def number(p: Path) -> int:
        m = re.fullmatch(r"data_batch_(\d+)", p.name)
        return int(m.group(1)) if m else -1

    train_files = sorted((p for p in folder.glob("data_batch_*") if number(p) >= 0), key=number)
    if [number(p) for p in train_files] != [1, 2, 3, 4, 5]:
        log.warning(
            "%s has train batches %s (CIFAR-10 has data_batch_1..5)",
            folder,
            [p.name for p in train_files],
        )
    parts = [_read_cifar_batch(p) for p in train_files]
    offset = 0
    for p, (x, _) in zip(train_files, parts, strict=True):
        _check_finite(x, "b'data'", p, "train", offset=offset)
        offset += len(x)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    x_val, y_val = _read_cifar_batch(folder / "test_batch")
    _check_finite(x_val, "b'data'", folder / "test_batch", "val")
    out = []
    for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
        xt = _images(x, f"{split} images", folder, channels_first=True)
        yt = _labels(y, f"{split} labels", folder)
        out.append(_split(xt, yt, split, folder))
    return out


# ----------------------------------------------------------------------------
# ImageFolder


class _ImageFolder(datasets.ImageFolder):
    """ImageFolder whose class list can be fixed (val uses train's), so indices agree."""

    def __init__(self, root: str, transform, classes: list[str] | None):
        self._fixed_classes = classes
        super().__init__(root, transform=transform, allow_empty=classes is not None)

    def find_classes(self, directory):
        if self._fixed_classes is None:
            return super().find_classes(directory)
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        extra = [c for c in found if c not in self._fixed_classes]
        if extra:
            raise DataError(
                f"{directory} has class folder(s) {extra} that the train split lacks; "
                "the val classes must be a subset of the train classes."
            )
        classes = list(self._fixed_classes)
        return classes, {c: i for i, c in enumerate(classes)}


def _train_augmentation(size: Sequence[int]) -> list:
    """The ``standard`` training augmentation to images of ``size`` (H, W), PIL or tensor.

    The smaller side >= :data:`LARGE_SIDE` (ImageNet-size): a random crop of 8-100% of
    the area and 3/4-4/3 aspect ratio resized to ``size`` (``RandomResizedCrop``, as in
    torchvision's ImageNet recipe). Smaller (CIFAR-size): a random ``size`` crop of the
    image zero-padded by side/8 on each edge (4 pixels at 32). Both then flip
    horizontally with probability 1/2.
    """
    h, w = (int(v) for v in size)
    if min(h, w) >= LARGE_SIDE:
        crop = transforms.RandomResizedCrop((h, w), antialias=True)
    else:
        crop = transforms.RandomCrop((h, w), padding=max(1, min(h, w) // 8))
    return [crop, transforms.RandomHorizontalFlip()]


class _ResizeCover:
    """Resize a PIL image, aspect kept, so that it covers ``size`` (H, W) times ``ratio``:
    for a square ``size`` this is ``Resize(round(side * ratio))``."""

    def __init__(self, size: Sequence[int], ratio: float):
        self.size, self.ratio = tuple(int(v) for v in size), ratio

    def __call__(self, img):
        w, h = img.size
        scale = self.ratio * max(self.size[0] / h, self.size[1] / w)
        return transforms.functional.resize(
            img, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, ratio={self.ratio:.4f})"


def _folder_transforms(size, augment: str, tail: list):
    """(train, val) transforms of an image folder: the geometry for ``augment``, then
    ``tail`` (colour conversion, to tensor, normalisation). ``size`` (H, W) is None with
    ``none`` and no input shape: images stay as stored."""
    if augment == "none":
        same = transforms.Compose(([transforms.Resize(size)] if size else []) + tail)
        return same, same
    if min(size) >= LARGE_SIDE:  # crop from the stored image; evaluate on its center
        train = _train_augmentation(size)
        val = [_ResizeCover(size, EVAL_RESIZE), transforms.CenterCrop(size)]
    else:  # the whole image at size, shifted within its padding
        train = [transforms.Resize(size), *_train_augmentation(size)]
        val = [transforms.Resize(size)]
    return transforms.Compose(train + tail), transforms.Compose(val + tail)


def _load_imagefolder(path: Path, *, mean, std, input_shape, augment: str) -> DataSplits:
    """Image folders, decoded per item (``__getitem__``): with ``augment`` ``none`` both
    splits are resized to ``input_shape`` when given, else used as stored; ``standard``
    crops to ``input_shape`` (or the first training image's size), see the module
    docstring."""
    tail = []
    if input_shape is not None:
        if input_shape[0] == 1:
            tail.append(transforms.Grayscale(1))
        elif input_shape[0] != 3:
            raise DataError(
                f"ImageFolder images are converted to 1 (grayscale) or 3 (RGB) channels; "
                f"the input shape asks for {input_shape[0]}."
            )
    tail.append(transforms.ToTensor())
    if mean is not None:
        channels = input_shape[0] if input_shape is not None else 3
        _check_mean_std(mean, std, channels, path)
        tail.append(transforms.Normalize(list(mean), list(std)))

    def read(split: str, classes=None):
        root = path / split
        try:
            return _ImageFolder(str(root), transform=None, classes=classes)
        except DataError:
            raise
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"Cannot read the ImageFolder split {root}: {exc}. Put images in "
                f"{root}/<class name>/*.png (or .jpg)."
            ) from None

    train = read("train")
    val = read("val", classes=train.classes)
    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise DataError(
                f"The {split} split in {path} is empty; put images in {path / split}/<class>/."
            )
    first = train.samples[0][0]
    try:
        image = train.loader(first)
        size = tuple(input_shape[1:]) if input_shape is not None else None
        if size is None and augment == "standard":
            size = (image.height, image.width)
        train.transform, val.transform = _folder_transforms(size, augment, tail)
        sample = val.transform(image)
    except Exception as exc:
        raise DataError(f"Cannot read image {first}: {exc}.") from None
    labels = [t for _, t in train.samples] + [t for _, t in val.samples]
    max_label = max(labels)
    return DataSplits(
        train=train,
        val=val,
        num_classes=len(train.classes),
        input_shape=tuple(int(v) for v in sample.shape),
        source="imagefolder",
        path=str(path),
        max_label=max_label,
        augment=augment,
    )
