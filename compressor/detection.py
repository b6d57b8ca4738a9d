"""``--task detection``: torchvision's single-stage detectors, COCO-format data, COCO mAP
(docs/design.md, "Detection").

The pipeline sees a detector through :class:`DetectionModel`, which holds the detector's
own modules under their own names (its ``state_dict`` is the detector's) and answers two
calls:

- ``model(images, targets)`` (lists, as torchvision's detectors take them): the detector
  itself; in train mode its loss dict (its own matching and losses), in eval mode its
  post-processed detections (decoded boxes after score threshold and NMS);
- ``model(x)`` with ``x`` a batch tensor (N, 3, H, W) in [0, 1]: the *raw* head outputs,
  the detector's normalisation, backbone and head and nothing after, as one tensor
  (N, anchors, sum of the head outputs' widths: e.g. SSD's 4 box regressions then the
  class logits). It is deterministic and a tensor, so everything that traces, counts or
  compares the model by running it on a batch (the channel groups, MACs, the exactness
  probe, the sparse-vs-pruned parity check, the ONNX export and its onnxruntime check)
  works on it unchanged. Anchors, box decoding and NMS are not in it (they have no
  weights): the exported ``model.onnx`` holds the raw head, and the report says so.

The heads' final prediction layers (class logits, box regressions and FCOS's centerness,
:func:`prediction_layers`) keep their output channels: their rows are the outputs' layout.
RetinaNet's and FCOS's head is one module run on every FPN level, so the channel groups tie
all the FPN's outputs (and P6, which reads P5) together; FCOS's head towers feed GroupNorm,
which normalises each channel with its norm group's others, so they lose whole norm groups
(:mod:`compressor.groups`). A checkpoint's classes come from its class-logit rows
(:mod:`compressor.checkpoint`), for a detector built by name or by the
user's ``--arch package.module:callable``.

Data (:func:`load_coco`): ``DIR/train/annotations.json`` and ``DIR/val/annotations.json``
(COCO format: ``images`` with ``file_name`` relative to that folder, ``annotations`` with
``bbox`` [x, y, w, h] in pixels and ``category_id``, ``categories``). A category id is the
label the model predicts (0 is the background of torchvision's detectors), so the model needs
``num_classes`` > the largest id. Images are resized to one size (``data.input_shape``, or
the first training image's) so that a batch stacks; boxes are scaled with them.

Metric: COCO mAP@[.5:.95] in percent (``map``, higher is better) from
``torchmetrics.detection.MeanAveragePrecision`` (``pip install 'compressor[detection]'``);
the validation loss is the detector's own, with its norms' running statistics.
Distillation is off for detection (there are no class logits per image to soften): a
recipe's ``distill.weight`` is ignored, and the log and the report's ``input.distillation``
say so.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from compressor import data as data_mod
from compressor.errors import BadInputError, DataError
from compressor.progress import SILENT, Progress

log = logging.getLogger(__name__)

LAYOUT = (
    "DIR/train/annotations.json and DIR/val/annotations.json (COCO format: images with "
    "file_name relative to that folder, annotations with bbox [x, y, w, h] in pixels and "
    "category_id, categories), the images beside each annotations.json"
)
INSTALL = "pip install 'compressor[detection]' (torchmetrics and pycocotools)"
EXPORT_CONTENTS = (
    "raw head outputs per anchor (the head's outputs in name order: SSD's and RetinaNet's box "
    "regressions then class logits, FCOS's centerness, box regressions, then class logits) "
    "after the detector's normalisation, resize, backbone and head; anchor decoding, score "
    "threshold and NMS are not in model.onnx"
)
_PREDICTION_NAMES = frozenset({"cls_logits", "bbox_reg", "bbox_ctrness"})


# ---------------------------------------------------------------------------- the model


def missing_detector_parts(model: nn.Module) -> list[str]:
    """What ``model`` lacks of a torchvision single-stage detector (SSD, SSDlite, RetinaNet,
    FCOS): ``transform`` (with ``normalize``), ``backbone``, ``head`` and the head's
    ``classification_head``; empty for a detector."""
    missing = [a for a in ("transform", "backbone", "head") if not hasattr(model, a)]
    if "transform" not in missing and not hasattr(model.transform, "normalize"):
        missing.append("transform.normalize")
    if "head" not in missing and not hasattr(model.head, "classification_head"):
        missing.append("head.classification_head")
    return missing


class DetectionModel(nn.Module):
    """A torchvision single-stage detector (SSD, SSDlite, RetinaNet, FCOS: ``transform``,
    ``backbone`` and a ``head`` whose outputs are a dict of per-anchor tensors) as the
    pipeline runs it; see the module docstring for its two calls.

    ``backbone`` and ``head`` are registered under their own names, so parameter names and
    the ``state_dict`` are the detector's; the detector itself is held unregistered and
    shares them (pruning one prunes the other; ``copy.deepcopy`` copies both together).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        missing = missing_detector_parts(detector)
        if missing:
            raise BadInputError(
                f"--task detection needs a torchvision single-stage detector (SSD, SSDlite, "
                f"RetinaNet, FCOS: transform, backbone and head); {type(detector).__name__} "
                f"has no {', '.join(missing)}. Two-stage models "
                "(Faster/Mask R-CNN) are not supported yet."
            )
        self.backbone = detector.backbone
        self.head = detector.head
        object.__setattr__(self, "detector", detector)  # shared, not a second registration
        self._sizes: dict[tuple, tuple] = {}  # (C, H, W) -> the (H, W) the transform makes

    def _resized(self, shape: tuple) -> tuple:
        """The (H, W) the detector's transform (in eval mode) resizes a ``shape`` image to,
        worked out once per shape on the meta device (shapes only: exporters and tracers
        then see a constant, not an extra resize)."""
        if shape not in self._sizes:
            transform = self.detector.transform
            was_training = transform.training
            transform.eval()
            try:
                probe = torch.empty(shape, device="meta")
                self._sizes[shape] = tuple(transform.resize(probe, None)[0].shape[-2:])
            finally:
                transform.train(was_training)
        return self._sizes[shape]

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.train(mode)
        return self

    @property
    def num_classes(self) -> int:
        """Classes of the classification head (background included)."""
        head = self.head.classification_head
        for attr in ("num_columns", "num_classes"):
            if hasattr(head, attr):
                return int(getattr(head, attr))
        raise BadInputError(f"Cannot tell the classes of {type(self.detector).__name__}'s head.")

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The head's outputs on a batch ``x`` (N, 3, H, W) in [0, 1], concatenated along the
        last dimension in key order (e.g. ``bbox_regression``, ``cls_logits``)."""
        transform = self.detector.transform
        x = transform.normalize(x)  # per-channel, broadcast over the batch
        # the size the detector's transform resizes an image of this size to (SSD: its fixed
        # size; RetinaNet, FCOS: min_size/max_size), then the bottom/right zero padding to
        # its size_divisible: what the backbone sees when all images have one size
        size = self._resized(tuple(x.shape[-3:]))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        stride = int(getattr(transform, "size_divisible", 1) or 1)
        pad_h, pad_w = (-x.shape[-2]) % stride, (-x.shape[-1]) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.backbone(x)
        features = [features] if isinstance(features, torch.Tensor) else list(features.values())
        outputs = self.head(features)
        return torch.cat([outputs[k] for k in sorted(outputs)], dim=-1)

    def forward(self, images, targets=None):
        if isinstance(images, torch.Tensor):
            return self.raw(images)
        return self.detector(images, targets)


def prediction_layers(model: DetectionModel) -> list[str]:
    """The heads' final prediction convolutions, whose output channels are the class logits
    and box regressions: SSD's and SSDlite's last conv of every ``module_list`` entry,
    RetinaNet's and FCOS's ``cls_logits``, ``bbox_reg`` (and ``bbox_ctrness``)."""
    names = []
    for name, module in model.named_modules():
        if name.endswith(".module_list") and isinstance(module, nn.ModuleList):
            for i, entry in enumerate(module):
                convs = [
                    (f"{name}.{i}.{sub}" if sub else f"{name}.{i}")
                    for sub, m in entry.named_modules()
                    if isinstance(m, nn.modules.conv._ConvNd)
                ]
                names += convs[-1:]
        elif name.rsplit(".", 1)[-1] in _PREDICTION_NAMES and isinstance(
            module, nn.modules.conv._ConvNd
        ):
            names.append(name)
    return names


# ---------------------------------------------------------------------------- the data


def collate(batch):
    """A list of ``(image, target)`` as ``(images, targets)`` lists (detection batches)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class CocoDetection(Dataset):
    """The images of one COCO annotations file, each as ``(image, target)``: the image a
    float32 (C, H, W) tensor in [0, 1] resized to ``size`` (H, W), the target
    ``{"boxes": (n, 4) float32 xyxy in pixels of the resized image, "labels": (n,) int64,
    "image_id": int}``. Crowd and empty (w or h <= 0) annotations are left out."""

    def __init__(self, folder: Path, images: list[dict], boxes: dict, size: tuple[int, int]):
        self.folder = folder
        self.images = images
        self.boxes = boxes  # image id -> list of (xyxy, label) in the file's pixels
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        info = self.images[index]
        path = self.folder / info["file_name"]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            w, h = rgb.size
            rgb = rgb.resize((self.size[1], self.size[0]), Image.BILINEAR)
            x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        x = x.view(self.size[0], self.size[1], 3).permute(2, 0, 1).float().div_(255.0)
        rows = self.boxes.get(info["id"], [])
        scale = torch.tensor([self.size[1] / w, self.size[0] / h] * 2)
        boxes = torch.tensor([b for b, _ in rows], dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor([c for _, c in rows], dtype=torch.int64)
        return x, {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}


def _read_split(root: Path, split: str) -> tuple[Path, dict]:
    path = root / split / "annotations.json"
    if not path.is_file():
        raise DataError(
            f"--task detection: {path} does not exist. --data must be a folder with {LAYOUT}."
        )
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable JSON file: {exc}") from exc
    if (
        not isinstance(coco, dict)
        or not isinstance(coco.get("images"), list)
        or not isinstance(coco.get("annotations"), list)
    ):
        raise DataError(
            f"{path} is not COCO format (it needs lists 'images' and 'annotations'). Expected {LAYOUT}."
        )
    return path.parent, coco


def _boxes(coco: dict, path: Path) -> tuple[dict, int]:
    """Image id -> [(xyxy, category id)], and the largest category id."""
    out: dict = {}
    ids = {img.get("id") for img in coco["images"]}
    largest = 0
    for ann in coco["annotations"]:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            label, image = int(ann["category_id"]), ann["image_id"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{path}: annotation {ann.get('id', '?')} needs bbox [x, y, w, h] and an integer "
                f"category_id and image_id ({type(exc).__name__}: {exc})."
            ) from None
        if image not in ids:
            raise DataError(
                f"{path}: annotation {ann.get('id', '?')} names image {image}, not in 'images'."
            )
        if label < 1:
            raise DataError(
                f"{path}: category_id {label} (annotation {ann.get('id', '?')}); ids start at 1 "
                "(0 is the detectors' background)."
            )
        largest = max(largest, label)
        if ann.get("iscrowd") or w <= 0 or h <= 0:
            continue
        out.setdefault(image, []).append(([x, y, x + w, y + h], label))
    return out, largest


def load_coco(spec, *, input_shape: Sequence[int] | None = None, **_) -> data_mod.DataSplits:
    """The train and val splits at ``spec`` (:data:`LAYOUT`); see :class:`CocoDetection`.
    ``input_shape`` (C, H, W) sets the size images are resized to; default: the first
    training image's."""
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"--task detection: --data {root} is not a folder. It must hold {LAYOUT}.")
    splits, largest = {}, 0
    for split in ("train", "val"):
        folder, coco = _read_split(root, split)
        boxes, top = _boxes(coco, folder / "annotations.json")
        largest = max(largest, top)
        for img in coco["images"]:
            if not (folder / str(img.get("file_name", ""))).is_file():
                raise DataError(
                    f"{folder / 'annotations.json'}: image {img.get('id')} file "
                    f"{img.get('file_name')!r} is not in {folder}. Expected {LAYOUT}."
                )
        splits[split] = (folder, coco["images"], boxes)
    if input_shape is None:
        from PIL import Image

        folder, images, _ = splits["train"]
        if not images:
            raise DataError(f"{root / 'train' / 'annotations.json'} lists no images.")
        with Image.open(folder / images[0]["file_name"]) as img:
            input_shape = (3, img.size[1], img.size[0])
    size = (int(input_shape[1]), int(input_shape[2]))
    train, val = (CocoDetection(*splits[s], size) for s in ("train", "val"))
    return data_mod.DataSplits(
        train=train, val=val, num_classes=largest + 1, input_shape=(3, *size), source="coco",
        path=str(root), max_label=largest, collate=collate,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the metric


def mean_average_precision():
    """A fresh ``torchmetrics`` COCO mAP (boxes xyxy); ``DataError`` naming the install when
    it or its backend is missing."""
    try:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        # COCO's evaluation keeps an image's 100 best-scored detections; torchvision's
        # detectors return up to 200 (SSD): the metric says so once per image otherwise
        metric.warn_on_many_detections = False
    except (ImportError, ModuleNotFoundError) as exc:
        raise DataError(
            f"--task detection measures COCO mAP with torchmetrics: {INSTALL}. ({exc})"
        ) from None
    return metric


@contextlib.contextmanager
def _loss_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in train mode, where torchvision's detectors return their loss dict, with
    its norm layers and its transform in eval mode: the loss uses the norms' running
    statistics and leaves them as they are, and images keep their evaluation size (a
    transform in train mode may pick one of several sizes at random). Eval mode after."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    detector = getattr(model, "detector", model)  # DetectionModel holds it unregistered
    fixed = [
        m
        for m in detector.modules()
        if isinstance(m, (nn.modules.batchnorm._NormBase, GeneralizedRCNNTransform))
    ]
    model.train()
    for m in fixed:
        m.eval()
    try:
        yield
    finally:
        model.eval()


def _head_widths(model: DetectionModel, image: torch.Tensor) -> dict[str, int]:
    """The keys of ``model``'s head outputs in :meth:`DetectionModel.raw`'s order, with the
    width each takes of its last dimension (one forward of ``image``, a batch of one)."""
    widths: dict[str, int] = {}
    handle = model.head.register_forward_hook(
        lambda m, i, out: widths.update({k: out[k].shape[-1] for k in sorted(out)})
    )
    try:
        model.raw(image)
    finally:
        handle.remove()
    return widths


@contextlib.contextmanager
def _head_returns(
    model: DetectionModel, widths: dict[str, int], raw: torch.Tensor
) -> Iterator[None]:
    """``model``'s head answers its next calls with ``raw`` (:meth:`DetectionModel.raw`'s
    outputs: the head's outputs concatenated in key order, ``widths`` from
    :func:`_head_widths`) split back into its output dict, so the detector's own anchors,
    box decoding and NMS run on outputs computed elsewhere."""
    head = model.head
    parts = dict(zip(widths, raw.split(list(widths.values()), dim=-1), strict=True))
    head.forward = lambda *args, **kwargs: parts
    try:
        yield
    finally:
        del head.forward


@torch.no_grad()
def evaluate_map(
    model: nn.Module,
    loader,
    device: torch.device,
    progress: Progress = SILENT,
    *,
    raw_outputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """COCO mAP@[.5:.95] in percent of ``model``'s detections over ``loader`` (nan when the
    split has no boxes), and the detector's own loss (the sum of its loss dict, as training
    minimises it) averaged over the images, computed in :func:`_loss_mode`.

    ``raw_outputs`` (a batch of images -> :meth:`DetectionModel.raw`'s outputs, e.g. an ONNX
    model's in onnxruntime): the detections are decoded from those instead of ``model``'s own
    head outputs, so an exported or quantized model is judged by the same metric; its loss is
    then not measured (nan)."""
    model.eval()
    metric = mean_average_precision()
    loss_sum, seen = 0.0, 0
    widths = None  # the head's output layout, read once (raw_outputs)
    for images, targets in progress.log_every(loader, "evaluate"):
        images, on_device = to_device(images, targets, device)
        if raw_outputs is None:
            with _loss_mode(model):
                loss_sum += float(loss_of(model, images, on_device)) * len(images)
            preds = model(images)
        else:
            batch = torch.stack(images)  # the loader gives every image one size
            widths = widths or _head_widths(model, batch[:1])
            with _head_returns(model, widths, raw_outputs(batch).to(batch.device)):
                preds = model(images)
        seen += len(images)
        metric.update(
            [{k: v.detach().cpu() for k, v in p.items()} for p in preds],
            [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets],
        )
    value = float(metric.compute()["map"])
    loss = loss_sum / seen if seen and raw_outputs is None else float("nan")
    return (100.0 * value if value >= 0 else float("nan")), loss


def check_labels(splits: data_mod.DataSplits, num_classes: int) -> None:
    """``DataError`` when a category id is not below the model's ``num_classes``."""
    if splits.max_label >= num_classes:
        raise DataError(
            f"The data at {splits.path} has category_id up to {splits.max_label}, but the model "
            f"has num_classes={num_classes} (background included): build it with "
            f"num_classes={splits.max_label + 1} (--num-classes) or renumber the categories."
        )


def loss_of(model: nn.Module, images: list, targets: list) -> torch.Tensor:
    """The detector's own loss dict, summed (train mode)."""
    losses = model(images, targets)
    return sum(losses.values()) if losses else torch.zeros((), requires_grad=True)


def to_device(images: list, targets: list, device: torch.device) -> tuple[list, list]:
    return (
        [img.to(device, non_blocking=True) for img in images],
        [
            {
                k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()
            }
            for t in targets
        ],
    )


__all__ = [
    "DetectionModel",
    "missing_detector_parts",
    "collate",
    "evaluate_map",
    "load_coco",
    "prediction_layers",
]
