from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import (
    DataSplits,
    check_input_shape,
    check_labels,
    load_data,
    make_loaders,
    subset,
    unaugmented_train,
)
from compressor.errors import DataError
from tests.helpers import fashion_mnist_dir

FASHION = fashion_mnist_dir()


def rng(seed=0):
    return np.random.default_rng(seed)


def save_npz(path, x_train, y_train, x_val, y_val, **extra):
    arrays = dict(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, **extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_idx(path: Path, array: np.ndarray, compress=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    stored = array.astype(array.dtype.newbyteorder(">")) if array.dtype.kind == "f" else array
    raw = header + stored.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_idx_dir(folder: Path, n_train=6, n_val=4, compress=True, hw=(5, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    r = rng()
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = r.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return folder


def make_cifar_dir(folder: Path, per_batch=3, side=4, protocol=pickle.DEFAULT_PROTOCOL):
    folder.mkdir(parents=True, exist_ok=True)
    r = rng()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in r.integers(0, 10, size=per_batch)],
            b"data": r.integers(0, 256, size=(per_batch, 3 * side * side), dtype=np.uint8),
            b"filenames": [b"x.png"] * per_batch,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


def make_imagefolder(root: Path, size=(6, 5), classes=("cat", "dog"), per_class=2, mode="RGB"):
    r = rng()
    for split in ("train", "val"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(r.integers(0, 256, size=shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png"
                )
    return root


# ---------------------------------------------------------------- npz


def test_npz_nchw_uint8_scaled(tmp_path):
    x = rng().integers(0, 256, size=(5, 3, 4, 6), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    path = save_npz(tmp_path / "d.npz", x, y, x[:2], y[:2])
    splits = load_data(path)
    assert isinstance(splits, DataSplits)
    assert splits.source == "npz"
    assert splits.input_shape == (3, 4, 6)
    assert splits.num_classes == 3
    assert len(splits.train) == 5 and len(splits.val) == 2
    sample, label = splits.train[1]
    assert sample.dtype == torch.float32 and label.dtype == torch.int64
    torch.testing.assert_close(sample, torch.from_numpy(x[1]).float() / 255)
    assert int(label) == 1


def test_npz_nhwc_and_float_kept(tmp_path):
    x = rng().random(size=(4, 8, 7, 3)).astype(np.float64) * 10  # floats are not rescaled
    y = np.array([0, 1, 0, 4])
    splits = load_data(save_npz(tmp_path / "d.npz", x, y, x, y))
    assert splits.input_shape == (3, 8, 7)
    assert splits.num_classes == 5
    sample, _ = splits.val[2]
    torch.testing.assert_close(sample, torch.from_numpy(x[2].transpose(2, 0, 1)).float())


def test_npz_nhwc_uint8_and_three_dim(tmp_path):
    x = rng().integers(0, 256, size=(3, 5, 5, 1), dtype=np.uint8)
    splits = load_data(save_npz(tmp_path / "a.npz", x, np.zeros(3, int), x, np.zeros(3, int)))
    assert splits.input_shape == (1, 5, 5)
    torch.testing.assert_close(splits.train[0][0][0], torch.from_numpy(x[0, :, :, 0]).float() / 255)
    x3 = x[..., 0]
    splits = load_data(save_npz(tmp_path / "b.npz", x3, np.zeros(3, int), x3, np.zeros(3, int)))
    assert splits.input_shape == (1, 5, 5)


def test_normalisation_after_scaling(tmp_path):
    x = np.full((2, 2, 4, 4), 255, dtype=np.uint8)
    x[:, 1] = 0
    path = save_npz(tmp_path / "d.npz", x, np.array([0, 1]), x, np.array([0, 1]))
    splits = load_data(path, mean=[0.5, 0.25], std=[0.5, 0.25])
    sample, _ = splits.train[0]
    torch.testing.assert_close(sample[0], torch.full((4, 4), 1.0))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(sample[1], torch.full((4, 4), -1.0))  # (0 - 0.25) / 0.25
    # The batched path (__getitems__) agrees with per-item access.
    batch = splits.train.__getitems__([0, 1])
    torch.testing.assert_close(batch[0][0], sample)


def test_input_shape_resizes_and_converts_channels(tmp_path):
    x = rng().integers(0, 256, size=(3, 1, 8, 8), dtype=np.uint8)
    path = save_npz(tmp_path / "d.npz", x, np.array([0, 1, 2]), x, np.array([0, 1, 2]))
    splits = load_data(path, input_shape=(3, 4, 4))
    assert splits.input_shape == (3, 4, 4)
    sample, _ = splits.train[0]
    assert sample.shape == (3, 4, 4)
    torch.testing.assert_close(sample[0], sample[2])
    assert 0 <= float(sample.min()) and float(sample.max()) <= 1


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x_val": None, "y_val": None}, r"missing array\(s\) x_val, y_val"),
        ({"y_train": np.zeros(4, int)}, r"train split .* has 5 images but 4 labels"),
        (
            {"x_val": np.zeros((0, 1, 2, 2), np.uint8), "y_val": np.zeros(0, int)},
            "val split .* is empty",
        ),
        ({"y_train": np.array([0, 1, -1, 0, 1])}, "negative labels"),
        ({"y_train": np.array([0, 1, 0.5, 0, 1])}, "integer class indices"),
        ({"y_train": np.array(["a"] * 5)}, "integer class indices"),
        ({"y_train": np.eye(5)}, r"1-D array of class indices.*one-hot"),
        ({"x_train": np.zeros((5, 2), np.uint8)}, r"must be images of shape"),
        ({"x_train": np.zeros((5, 1, 2, 2), np.int32)}, "save images as uint8"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    base = {
        "x_train": np.zeros((5, 1, 2, 2), np.uint8),
        "y_train": np.array([0, 1, 0, 1, 0]),
        "x_val": np.zeros((2, 1, 2, 2), np.uint8),
        "y_val": np.array([0, 1]),
    }
    base.update(arrays)
    path = save_npz(tmp_path / "bad.npz", **base)
    with pytest.raises(DataError, match=match) as info:
        load_data(path)
    assert str(path) in str(info.value)


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    x = np.zeros((2, 1, 2, 2), np.uint8)
    splits = load_data(
        save_npz(tmp_path / "d.npz", x, np.array([0.0, 3.0]), x, np.array([1.0, 0.0]))
    )
    assert splits.num_classes == 4
    assert splits.train[1][1].dtype == torch.int64


def test_npz_corrupt_and_pickled(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="corrupt"):
        load_data(bad)
    objs = np.empty(2, dtype=object)
    path = save_npz(
        tmp_path / "obj.npz",
        np.zeros((2, 1, 2, 2), np.uint8),
        objs,
        np.zeros((2, 1, 2, 2), np.uint8),
        np.zeros(2, int),
    )
    with pytest.raises(DataError, match="pickled"):
        load_data(path)


@pytest.mark.parametrize("split,index,bad", [("train", 4, np.nan), ("val", 2, -np.inf)])
def test_npz_non_finite_images_are_bad_input_naming_file_split_and_index(
    tmp_path, split, index, bad
):
    """Issue 18.7: NaN/Inf pixels used to surface as a NaN loss (exit 1) or a failed export (4)."""
    x = {s: rng().random((6, 1, 4, 4)).astype(np.float32) for s in ("train", "val")}
    x[split][index, 0, 1, 2] = bad
    x[split][index + 1, 0, 0, 0] = bad
    path = save_npz(tmp_path / "d.npz", x["train"], np.arange(6) % 3, x["val"], np.arange(6) % 3)
    with pytest.raises(DataError) as info:
        load_data(path)
    msg = str(info.value)
    assert f"x_{split} in {path} ({split} split)" in msg
    assert f"sample index {index} " in msg and "(0, 1, 2)" in msg
    assert ("NaN" if np.isnan(bad) else "-Inf") in msg
    assert "2 of its 6 samples" in msg
    assert info.value.exit_code == 2


def test_float64_values_beyond_float32_are_not_mistaken_for_inf(tmp_path):
    x = rng().random((3, 1, 4, 4))  # float64, finite
    path = save_npz(tmp_path / "d.npz", x, np.arange(3), x, np.arange(3))
    assert torch.isfinite(load_data(path).train.x).all()


# ---------------------------------------------------------------- idx


@pytest.mark.parametrize("compress", [True, False])
def test_idx_dir(tmp_path, compress):
    folder = make_idx_dir(tmp_path / "mnist", compress=compress)
    splits = load_data(folder)
    assert splits.source == "idx"
    assert len(splits.train) == 6 and len(splits.val) == 4
    assert splits.input_shape == (1, 5, 4)
    assert splits.num_classes == 3
    sample, label = splits.train[4]
    assert sample.shape == (1, 5, 4) and sample.dtype == torch.float32
    assert float(sample.max()) <= 1.0 and int(label) == 1


def test_idx_bad_magic_and_truncated(tmp_path):
    folder = make_idx_dir(tmp_path / "m", compress=False)
    target = folder / "train-labels-idx1-ubyte"
    raw = target.read_bytes()
    target.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(DataError, match=r"bad magic number.*Download it again"):
        load_data(folder)
    target.write_bytes(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_data(folder)


def test_idx_corrupt_gzip_and_missing_file(tmp_path):
    folder = make_idx_dir(tmp_path / "m")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_data(folder)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[.gz\] is missing"):
        load_data(folder)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not available")
def test_real_fashion_mnist():
    splits = load_data(FASHION)
    assert len(splits.train) == 60000 and len(splits.val) == 10000
    assert splits.input_shape == (1, 28, 28)
    assert splits.num_classes == 10
    check_labels(splits, 10)
    check_input_shape(splits, (1, 28, 28))


def test_idx_float_images_with_nan_are_bad_input(tmp_path):
    folder = make_idx_dir(tmp_path / "m")
    images = rng().random((4, 5, 4)).astype(np.float32)
    images[3, 2, 1] = np.nan
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(DataError) as info:
        load_data(folder)
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz (val split)" in msg
    assert "NaN at sample index 3 " in msg


# ---------------------------------------------------------------- cifar


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_dir(tmp_path, protocol):
    folder = make_cifar_dir(tmp_path / "cifar-10-batches-py", protocol=protocol)
    splits = load_data(tmp_path)  # the parent folder also works
    assert splits.source == "cifar10"
    assert len(splits.train) == 15 and len(splits.val) == 3
    assert splits.input_shape == (3, 4, 4)
    with open(folder / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    sample, label = splits.train[3]  # first sample of batch 2
    expected = torch.from_numpy(batch[b"data"][0].reshape(3, 4, 4)).float() / 255
    torch.testing.assert_close(sample, expected)
    assert int(label) == batch[b"labels"][0]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_malicious_pickle_runs_no_code(tmp_path):
    folder = make_cifar_dir(tmp_path / "c")
    marker = tmp_path / "MARKER"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"Refused to read .*data_batch_3"):
        load_data(folder)
    assert not marker.exists()


def test_cifar_not_a_batch_and_truncated(tmp_path):
    folder = make_cifar_dir(tmp_path / "c")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"nope": 1}, f)
    with pytest.raises(DataError, match="not a CIFAR-10 batch"):
        load_data(folder)
    raw = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_data(folder)


def test_cifar_float_batch_with_inf_names_the_batch_file_and_split_index(tmp_path):
    folder = make_cifar_dir(tmp_path / "c", per_batch=3)
    with open(folder / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    data = batch[b"data"].astype(np.float32)
    data[1, 7] = np.inf
    batch[b"data"] = data
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError) as info:
        load_data(folder)
    msg = str(info.value)
    # index in the train split: 3 samples of data_batch_1, then the second of data_batch_2
    assert "data_batch_2 (train split) holds +Inf at sample index 4 " in msg


# ---------------------------------------------------------------- imagefolder


def test_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    splits = load_data(root)
    assert splits.source == "imagefolder"
    assert splits.num_classes == 2
    assert splits.input_shape == (3, 5, 6)
    assert len(splits.train) == 4 and len(splits.val) == 4
    sample, label = splits.val[3]
    assert sample.dtype == torch.float32 and 0 <= float(sample.min()) <= float(sample.max()) <= 1
    assert int(label) == 1


def test_imagefolder_resize_grayscale_normalise(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    splits = load_data(root, input_shape=(1, 8, 8), mean=[0.5], std=[0.5])
    assert splits.input_shape == (1, 8, 8)
    sample, _ = splits.train[0]
    assert sample.shape == (1, 8, 8)
    assert float(sample.min()) >= -1 and float(sample.max()) <= 1
    assert float(sample.min()) < 0  # normalised


def test_imagefolder_val_uses_train_classes(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c"))
    for p in (root / "val" / "a").iterdir():
        p.unlink()
    (root / "val" / "a").rmdir()
    splits = load_data(root)
    assert sorted({int(t) for _, t in splits.val.samples}) == [1, 2]  # b, c keep their indices
    (root / "val" / "zzz").mkdir()
    Image.new("RGB", (6, 5)).save(root / "val" / "zzz" / "0.png")
    with pytest.raises(DataError, match="zzz"):
        load_data(root)


def test_imagefolder_errors(tmp_path):
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    with pytest.raises(DataError, match="Cannot read the ImageFolder split"):
        load_data(root)
    root = make_imagefolder(tmp_path / "ok")
    with pytest.raises(DataError, match=r"mean has 1 values .* 3 channel"):
        load_data(root, mean=[0.5], std=[0.5])


# ---------------------------------------------------------------- general errors and checks


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*npz"):
        load_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "empty")
    msg = str(info.value)
    assert "Cannot tell the data format" in msg
    for word in ("ImageFolder", ".npz", "idx", "CIFAR-10"):
        assert word in msg


def test_mean_std_errors(tmp_path):
    x = np.zeros((2, 3, 2, 2), np.uint8)
    path = save_npz(tmp_path / "d.npz", x, np.array([0, 1]), x, np.array([0, 1]))
    with pytest.raises(DataError, match=r"mean has 2 values but the images .* have 3 channel"):
        load_data(path, mean=[0.1, 0.2], std=[0.1, 0.2])
    with pytest.raises(DataError, match="std values must be > 0"):
        load_data(path, mean=[0.1] * 3, std=[0.1, 0.0, 0.1])
    with pytest.raises(DataError, match="both mean and std"):
        load_data(path, mean=[0.1] * 3)


def test_check_labels_and_input_shape(tmp_path):
    x = np.zeros((3, 1, 4, 4), np.uint8)
    path = save_npz(tmp_path / "d.npz", x, np.array([0, 11, 2]), x, np.array([0, 1, 2]))
    splits = load_data(path)
    assert splits.num_classes == 12
    check_labels(splits, 12)
    with pytest.raises(DataError) as info:
        check_labels(splits, 10)
    msg = str(info.value)
    assert "labels go up to 11 (4 distinct values, 0..11), but the model has 10 outputs" in msg
    assert str(path) in msg
    check_input_shape(splits, (1, 4, 4))
    check_input_shape(splits, (1, None, None))
    with pytest.raises(
        DataError, match=r"have shape \(1, 4, 4\).*expects \(3, 32, 32\).*data.input_shape"
    ):
        check_input_shape(splits, (3, 32, 32))


def test_labels_beyond_the_classifier_say_what_to_check_not_num_classes(tmp_path):
    """Issue 18.12: labels 1..10 for a 10-class model suggested --num-classes, which the
    checkpoint's classifier weights then refused."""
    x = np.zeros((10, 1, 4, 4), np.uint8)
    y = np.arange(1, 11)
    splits = load_data(save_npz(tmp_path / "d.npz", x, y, x, y))
    with pytest.raises(DataError) as info:
        check_labels(splits, 10, classifier="fc3, Linear 84 -> 10")
    msg = str(info.value)
    assert "the labels exceed the model's classes" in msg
    assert "(classifier fc3, Linear 84 -> 10)" in msg
    assert "labels must be 0..9" in msg and "look 1-based" in msg
    assert "--num-classes cannot change its 10 outputs" in msg
    assert "pass --num-classes" not in msg
    with pytest.raises(DataError) as info:  # only where the classifier can be resized
        check_labels(splits, 10, resizable=True)
    assert "pass --num-classes 11" in str(info.value)
    assert "1-based" in str(info.value)


# ---------------------------------------------------------------- loaders


def _npz_splits(tmp_path, n=10):
    x = np.arange(n * 4, dtype=np.uint8).reshape(n, 1, 2, 2)
    y = np.arange(n) % 3
    return load_data(save_npz(tmp_path / "d.npz", x, y, x[:5], y[:5]))


def test_make_loaders_seeded_shuffle(tmp_path):
    splits = _npz_splits(tmp_path)

    def order(seed):
        train, _ = make_loaders(splits, batch_size=4, seed=seed)
        return torch.cat([x.flatten(1)[:, 0] for x, _ in train]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(splits.train.x.flatten(1)[:, 0].float().div(255).tolist())
    _, val = make_loaders(splits, batch_size=4, seed=0)
    xb, yb = next(iter(val))
    assert xb.shape == (4, 1, 2, 2) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert yb.tolist() == [0, 1, 2, 0]


def test_make_loaders_drops_a_single_sample_batch(tmp_path):
    splits = _npz_splits(tmp_path, n=9)
    train, _ = make_loaders(splits, batch_size=4, seed=0)
    assert [len(y) for _, y in train] == [4, 4]


def test_make_loaders_distributed(tmp_path):
    splits = _npz_splits(tmp_path)
    # DistributedSampler with explicit world size: no process group needed for construction.
    from torch.utils.data import DistributedSampler

    train, val = make_loaders(splits, batch_size=2, seed=0, distributed=False)
    assert not isinstance(train.sampler, DistributedSampler)
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, val = make_loaders(splits, batch_size=2, seed=0, distributed=True)
        assert isinstance(train.sampler, DistributedSampler)
        assert isinstance(val.sampler, DistributedSampler)
        assert sum(len(y) for _, y in train) == 10
    finally:
        dist.destroy_process_group()


def test_subset_is_seeded(tmp_path):
    splits = _npz_splits(tmp_path)
    a, b = subset(splits.train, 4, seed=1), subset(splits.train, 4, seed=1)
    assert len(a) == 4 and list(a.indices) == list(b.indices)
    assert len(set(a.indices)) == 4
    assert len(subset(splits.train, 100, seed=0)) == 10
    x, y = a[0]
    assert x.shape == (1, 2, 2)


# ---------------------------------------------------------------- through compress


@pytest.fixture
def lenet_checkpoint(tmp_path):
    from compressor.models import lenet5

    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    return tmp_path / "lenet5.pt"


def test_compress_with_one_based_labels_names_the_classifier(lenet_checkpoint, tmp_path):
    import compressor

    x = rng().integers(0, 256, (20, 1, 12, 12), dtype=np.uint8)
    y = np.arange(20) % 10 + 1
    data = save_npz(tmp_path / "d.npz", x, y, x, y)
    with pytest.raises(DataError) as info:
        compressor.compress(
            lenet_checkpoint, arch="lenet5", data=str(data), out=tmp_path / "o", device="cpu"
        )
    msg = str(info.value)
    assert "(classifier fc3, Linear 84 -> 10)" in msg and "look 1-based" in msg
    assert "pass --num-classes" not in msg


def test_cli_nan_in_the_data_exits_2_before_training(lenet_checkpoint, tmp_path, capsys):
    from compressor import cli

    x = rng().random((20, 1, 12, 12)).astype(np.float32)
    x[7, 0, 5, 5] = np.nan
    data = save_npz(tmp_path / "d.npz", x, np.arange(20) % 10, x[:4], np.arange(4))
    logger = logging.getLogger("compressor")
    saved = (logger.handlers[:], logger.level, logger.propagate)  # cli.main installs a handler
    try:
        code = cli.main(
            [str(lenet_checkpoint), "--arch", "lenet5", "--data", str(data), "--out",
             str(tmp_path / "o"), "--device", "cpu", "-q"]
        )  # fmt: skip
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"x_train in {data} (train split) holds NaN at sample index 7" in err


# ---------------------------------------------------------------- workers and augmentation


def make_image_files(root: Path, side=(10, 12), ext="png", classes=("a", "b"), per_class=3):
    """An image folder of random RGB files (``side`` is (H, W)); returns the stored pixels of
    train and val, in ImageFolder order, as float CHW tensors in [0, 1]."""
    r = rng(1)
    stored = {"train": [], "val": []}
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = r.integers(0, 256, size=(*side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{ext}", quality=95)
                stored[split].append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    return root, stored


def test_workers_auto_uses_the_cpus_for_image_folders_and_none_for_arrays(tmp_path, monkeypatch):
    from compressor.data import MAX_AUTO_WORKERS, resolve_workers

    folder = load_data(make_image_files(tmp_path / "f")[0])
    arrays = _npz_splits(tmp_path)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(5)), raising=False)
    assert resolve_workers("auto", folder) == 4  # one CPU left to the training process
    assert resolve_workers("auto", arrays) == 0  # in memory: workers only add copies
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this host share the CPUs
    assert resolve_workers("auto", folder) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_workers("auto", folder) == MAX_AUTO_WORKERS
    assert resolve_workers(3, arrays) == 3  # asked for: kept
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(DataError, match=r"data\.workers"):
            resolve_workers(bad, folder)


def test_image_folder_with_workers_gives_the_batches_of_no_workers(tmp_path):
    root, _ = make_image_files(tmp_path / "jpegs", side=(72, 80), ext="jpg")
    splits = load_data(root, augment="auto", mean=[0.5] * 3, std=[0.25] * 3)
    assert splits.augment == "standard"  # auto: image folders are augmented

    def batches(loader):
        return [(x.clone(), y.clone()) for x, y in loader]

    train0, val0 = make_loaders(splits, batch_size=4, seed=0, num_workers=0)
    train2, val2 = make_loaders(splits, batch_size=4, seed=0, num_workers=2)
    assert (train2.num_workers, val2.num_workers) == (2, 2)
    assert val2.persistent_workers and not train2.persistent_workers
    want = batches(val0)
    for _ in range(2):  # the persistent workers' second pass too
        for (a, ya), (b, yb) in zip(want, batches(val2), strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    # the shuffle is drawn in the main process: the same with and without workers
    first = [y.tolist() for _, y in batches(train0)]
    assert [y.tolist() for _, y in batches(train2)] == first


def test_augmented_loader_with_workers_repeats_after_a_restored_generator(tmp_path):
    """What --resume relies on: the train loader's generator state fixes the next pass,
    shuffle and augmentation both, with workers too."""
    root, _ = make_image_files(tmp_path / "f", side=(72, 72), ext="jpg", per_class=2)
    splits = load_data(root, augment="standard")
    train, _ = make_loaders(splits, batch_size=2, seed=3, num_workers=2)
    next(iter(train))  # an interrupted first epoch
    state = train.generator.get_state()
    want = [x for x, _ in train]
    again, _ = make_loaders(splits, batch_size=2, seed=3, num_workers=2)
    again.generator.set_state(state)
    got = [x for x, _ in again]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not torch.equal(torch.cat(want), torch.cat([x for x, _ in train]))  # epochs differ


@pytest.mark.parametrize("side", [(16, 16), (72, 64)], ids=["pad-crop", "resized-crop"])
def test_standard_augment_changes_training_images_not_evaluation_ones(tmp_path, side):
    root, stored = make_image_files(tmp_path / "png", side=side)
    plain = load_data(root, augment="none")
    assert plain.augment == "none"
    for split in ("train", "val"):  # none: the stored pixels, exactly (PNG)
        ds = getattr(plain, split)
        assert all(torch.equal(ds[i][0], stored[split][i]) for i in range(len(ds)))

    aug = load_data(root, augment="standard")
    assert aug.augment == "standard" and aug.input_shape == (3, *side)
    torch.manual_seed(0)
    first = [aug.train[i][0] for i in range(len(aug.train))]
    assert all(x.shape == (3, *side) for x in first)
    assert not all(torch.equal(x, s) for x, s in zip(first, stored["train"], strict=True))
    torch.manual_seed(0)  # seeded: the same draws again
    assert all(torch.equal(aug.train[i][0], first[i]) for i in range(len(first)))
    evaluated = [aug.val[i][0] for i in range(len(aug.val))]
    torch.manual_seed(1)
    assert all(torch.equal(aug.val[i][0], evaluated[i]) for i in range(len(aug.val)))
    # calibration sees training images as the validation split is preprocessed
    calib = unaugmented_train(aug)
    torch.manual_seed(2)
    assert all(torch.equal(calib[i][0], calib[i][0]) for i in range(len(calib)))
    assert all(calib[i][0].shape == (3, *side) for i in range(len(calib)))
    assert unaugmented_train(plain) is plain.train
    if min(side) < 64:  # small images are evaluated whole
        assert all(torch.equal(x, s) for x, s in zip(evaluated, stored["val"], strict=True))
        assert all(torch.equal(calib[i][0], stored["train"][i]) for i in range(len(calib)))
    else:  # large ones resized by 256/224 and center-cropped
        assert all(x.shape == (3, *side) for x in evaluated)
        assert not torch.equal(evaluated[0], stored["val"][0])


def test_standard_augment_of_arrays_only_when_asked(tmp_path):
    x = rng().integers(0, 256, size=(6, 3, 16, 16), dtype=np.uint8)
    y = np.arange(6) % 2
    path = save_npz(tmp_path / "d.npz", x, y, x, y)
    auto = load_data(path, augment="auto")
    assert auto.augment == "none"  # in memory: as stored unless asked
    assert torch.equal(auto.train[0][0], torch.from_numpy(x[0]).float() / 255)
    aug = load_data(path, augment="standard")
    torch.manual_seed(0)
    batch = [s for s, _ in aug.train.__getitems__(list(range(6)))]
    assert not all(
        torch.equal(s, torch.from_numpy(v).float() / 255) for s, v in zip(batch, x, strict=True)
    )
    assert torch.equal(aug.val[0][0], auto.val[0][0])
    calib = unaugmented_train(aug)  # what INT8 calibration reads: as stored
    assert all(torch.equal(calib[i][0], auto.train[i][0]) for i in range(6))
    assert aug.train.augment is not None  # the training split keeps its augmentation
    with pytest.raises(DataError, match=r"data\.augment"):
        load_data(path, augment="foo")
