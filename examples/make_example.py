"""Make the bundled example: a small pretrained ResNet-20 and a Fashion-MNIST slice.

    python examples/make_example.py --fashion-mnist ../shared/data/fashion-mnist

writes ``examples/fashion-mnist/model.pt`` (a state_dict for ``--arch resnet20``)
and ``examples/fashion-mnist/data.npz`` (``x_train, y_train, x_val, y_val``,
uint8 NCHW). The model trains on the first ``--train-images`` training images;
the slice holds the next 5000 training images (used by ``compress`` to
fine-tune, disjoint from the model's own training set is not required, but kept
separate anyway) and the first 1000 test images.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.models import resnet20

HERE = Path(__file__).parent / "fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fashion-mnist", type=Path, default=Path("../shared/data/fashion-mnist"))
    p.add_argument("--train-images", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x = read_idx(args.fashion_mnist / "train-images-idx3-ubyte.gz")[:, None]
    y = read_idx(args.fashion_mnist / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = read_idx(args.fashion_mnist / "t10k-images-idx3-ubyte.gz")[:, None]
    yt = read_idx(args.fashion_mnist / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    n = args.train_images
    HERE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        HERE / "data.npz",
        x_train=x[n : n + 5000],
        y_train=y[n : n + 5000],
        x_val=xt[:1000],
        y_val=yt[:1000],
    )
    model = resnet20(num_classes=10, in_channels=1)
    xs = torch.from_numpy(x[:n].astype(np.float32) / 255.0)
    ys = torch.from_numpy(y[:n])
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    steps = args.epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(n // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            xv = torch.from_numpy(xt.astype(np.float32) / 255.0)
            acc = sum(
                int((model(xv[i : i + 500]).argmax(1) == torch.from_numpy(yt[i : i + 500])).sum())
                for i in range(0, len(xv), 500)
            ) / len(xv)
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {100 * acc:.2f}% ({time.time() - start:.0f}s)"
        )
    torch.save(model.state_dict(), HERE / "model.pt")


if __name__ == "__main__":
    main()
