"""A regression task for ``compress --task``: predict two numbers per image, judged by MSE.

Run from this folder (``--task`` and ``--arch`` import ``my_task`` from the current
directory; see README.md here)::

    compress model.pt --arch my_task:make_model --task my_task:MeanSquaredTask \
        --data data.npz --target-macs 1.5

``data.npz`` holds ``x_train``/``x_val`` (N, C, H, W float32) and ``y_train``/``y_val``
(N, K float32 targets); :func:`make_example` writes a small one with a model to start from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from compressor.data import DataSplits
from compressor.errors import DataError
from compressor.progress import SILENT
from compressor.tasks import Task


class MeanSquaredTask(Task):
    """Mean squared error, lower is better; distillation pulls the outputs toward the
    teacher's (``(1 - w) MSE(y) + w MSE(teacher)``)."""

    name = "mean-squared"
    metric = "mse"
    higher_is_better = False

    def loss(self, outputs, targets, inputs, teacher_outputs, distill):
        mse = F.mse_loss(outputs, targets)
        if teacher_outputs is None:
            return mse
        w = distill.weight
        return (1 - w) * mse + w * F.mse_loss(outputs, teacher_outputs)

    @torch.no_grad()
    def evaluate(self, model, loader, device, progress=SILENT):
        model.eval()
        total, seen = 0.0, 0
        for x, y in progress.log_every(loader, "evaluate"):
            out = model(x.to(device))
            total += float(F.mse_loss(out, y.to(device), reduction="sum")) / y[0].numel()
            seen += len(y)
        mse = total / seen if seen else float("nan")
        return mse, mse  # (metric, mean loss)

    def load_data(self, spec, *, mean=None, std=None, input_shape=None, augment="none"):
        with np.load(spec) as f:
            arrays = {
                k: torch.from_numpy(f[k]).float() for k in ("x_train", "y_train", "x_val", "y_val")
            }
        shape = tuple(arrays["x_train"].shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise DataError(f"{spec} holds inputs of shape {shape}, not {tuple(input_shape)}.")
        return DataSplits(
            train=TensorDataset(arrays["x_train"], arrays["y_train"]),
            val=TensorDataset(arrays["x_val"], arrays["y_val"]),
            num_classes=arrays["y_train"].shape[1],  # the model's outputs
            input_shape=shape,
            source="npz",
            path=str(spec),
            scale=1.0,  # float inputs, used as stored
        )


def make_model(num_classes: int = 2, in_channels: int = 1) -> nn.Module:
    """A small conv net with ``num_classes`` real outputs (``--arch my_task:make_model``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def make_example(folder, n_train: int = 256, n_val: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """``model.pt`` (a state_dict of :func:`make_model`) and ``data.npz`` in ``folder``: 1x8x8
    noise images whose targets are their mean and their left half's mean."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_val, 1, 8, 8)).astype(np.float32)
    y = np.stack([x.mean(axis=(1, 2, 3)), x[..., :4].mean(axis=(1, 2, 3))], axis=1)
    data = folder / "data.npz"
    np.savez(data, x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:])
    torch.manual_seed(seed)
    model = folder / "model.pt"
    torch.save(make_model().state_dict(), model)
    return model, data


if __name__ == "__main__":
    print(*make_example("."))
