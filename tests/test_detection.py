"""``--task detection``: COCO-format data and its errors, the mAP on known cases, and
``compress --task detection`` end to end on a random-init torchvision SSDlite, RetinaNet and
FCOS (the last two a user's own ``--arch package.module:callable`` on a small FPN backbone,
tests/helpers.py) with a tiny synthetic COCO data set: channels removed, the pruned model's
raw head outputs equal to the sparse model's, the report's mAP before and after."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "torchmetrics", reason="the detection extra: pip install 'compressor[detection]'"
)
pytest.importorskip(
    "pycocotools", reason="the detection extra: pip install 'compressor[detection]'"
)

import compressor
from compressor import detection
from compressor.errors import EXIT_OK, BadInputError, CheckpointError, DataError
from compressor.tasks import TASKS, DetectionTask, resolve_task
from tests.helpers import small_fcos, small_retinanet

ARCH = "ssdlite320_mobilenet_v3_large"
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60)}  # category id -> rectangle colour


def make_coco(root, n_train=8, n_val=4, size=320, seed=0):
    """``root/{train,val}/annotations.json`` and PNG images: 1-3 coloured rectangles each
    on a grey background, one COCO category per colour."""
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        folder = root / split
        folder.mkdir(parents=True)
        images, annotations = [], []
        for i in range(n):
            pixels = np.full((size, size, 3), 128, dtype=np.uint8)
            for _ in range(rng.integers(1, 4)):
                w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                cat = int(rng.integers(1, 3))
                pixels[y : y + h, x : x + w] = COLOURS[cat]
                annotations.append(
                    {"id": ann_id, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 0}
                )  # fmt: skip
                ann_id += 1
            Image.fromarray(pixels).save(folder / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in COLOURS],
        }
        (folder / "annotations.json").write_text(json.dumps(coco))
    return root


def test_detection_is_registered_with_map_higher_is_better():
    task = resolve_task("detection")
    assert TASKS["detection"] is DetectionTask and isinstance(task, DetectionTask)
    assert task.summary() == {"name": "map", "higher_is_better": True}
    assert task.top1_labels is False and task.distillation is False


def test_coco_folder_loads_as_list_batches_with_xyxy_boxes(tmp_path):
    make_coco(tmp_path, n_train=3, n_val=2, size=64)
    splits = DetectionTask().load_data(str(tmp_path), mean=None, std=None, input_shape=None)
    assert (len(splits.train), len(splits.val), splits.input_shape) == (3, 2, (3, 64, 64))
    assert splits.num_classes == 3  # background + 2 categories
    coco = json.loads((tmp_path / "train" / "annotations.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == 0]
    image, target = splits.train[0]
    assert image.shape == (3, 64, 64) and 0 <= float(image.min()) <= float(image.max()) <= 1
    x, y, w, h = first[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].tolist() == [a["category_id"] for a in first]
    images, targets = splits.collate([splits.train[0], splits.train[1]])
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2


def test_missing_layout_is_a_data_error_naming_the_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(
        DataError, match=r"train/annotations.json does not exist.*DIR/val/annotations.json"
    ):
        detection.load_coco(str(tmp_path))


def test_category_ids_beyond_the_model_and_a_missing_extra_are_data_errors(tmp_path, monkeypatch):
    make_coco(tmp_path, n_train=2, n_val=1, size=32)
    splits = detection.load_coco(str(tmp_path))
    with pytest.raises(DataError, match=r"category_id up to 2, but the model has num_classes=2"):
        DetectionTask().check_data(splits, None, 2)
    DetectionTask().check_data(splits, None, 3)
    with pytest.raises(BadInputError, match="data.mean/std .* do not apply"):
        DetectionTask().load_data(str(tmp_path), mean=[0.5] * 3, std=None, input_shape=None)
    monkeypatch.setitem(sys.modules, "torchmetrics.detection", None)  # not installed
    with pytest.raises(DataError, match=r"pip install 'compressor\[detection\]'"):
        DetectionTask().load_data(str(tmp_path), mean=None, std=None, input_shape=None)


def test_a_classifier_is_refused_by_the_detection_task():
    import torchvision

    with pytest.raises(BadInputError, match="needs a torchvision single-stage detector"):
        DetectionTask().prepare_model(torchvision.models.resnet18(num_classes=3))


def test_missing_detector_parts_names_what_a_model_lacks():
    import torchvision

    assert detection.missing_detector_parts(small_retinanet(num_classes=3)) == []
    classifier = torchvision.models.resnet18(num_classes=3)
    assert detection.missing_detector_parts(classifier) == ["transform", "backbone", "head"]
    detector = small_fcos(num_classes=3)
    del detector.head.classification_head
    assert detection.missing_detector_parts(detector) == ["head.classification_head"]
    with pytest.raises(BadInputError, match="has no head.classification_head"):
        DetectionTask().prepare_model(detector)


def test_raw_forward_is_the_head_output_the_detector_computes():
    from compressor.checkpoint import build_model

    model = DetectionTask().prepare_model(build_model(ARCH, num_classes=3)).eval()
    seen = []
    model.head.register_forward_hook(lambda m, i, out: seen.append(out))
    images = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        raw = model(images)
        detections = model(list(images))  # the detector: its transform, then decode and NMS
    head = seen[-1]
    assert raw.shape == (2, head["cls_logits"].shape[1], 4 + 3)
    assert torch.equal(raw, torch.cat([head["bbox_regression"], head["cls_logits"]], dim=-1))
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    other = torch.rand(2, 3, 200, 240)  # resized to 320x320 as the detector's transform does
    with torch.no_grad():
        raw, _ = model(other), model(list(other))
    head = seen[-1]
    assert torch.allclose(raw, torch.cat([head["bbox_regression"], head["cls_logits"]], -1))


def test_detector_checkpoint_loads_by_name_with_its_own_classes(tmp_path):
    from compressor.checkpoint import build_model, load_checkpoint

    torch.save(build_model(ARCH, num_classes=3).state_dict(), tmp_path / "ssd.pt")
    loaded = load_checkpoint(tmp_path / "ssd.pt", arch=ARCH)  # no --num-classes: read from it
    assert loaded.metadata["build_kwargs"] == {"num_classes": 3}
    model = DetectionTask().prepare_model(loaded.model)
    assert model.num_classes == 3 and set(model.state_dict()) == set(loaded.model.state_dict())
    assert len(DetectionTask().kept_layers(model)) == 12  # 6 class-logit + 6 box convs
    with pytest.raises(CheckpointError, match="has 3 classes .* but --num-classes is 4"):
        load_checkpoint(tmp_path / "ssd.pt", arch=ARCH, num_classes=4)


class _Oracle(torch.nn.Module):
    """Detections read from a table: image id -> boxes (the evaluation gets images only, so
    the images carry their id in pixel [0, 0, 0])."""

    def __init__(self, table, shift=0.0):
        super().__init__()
        self.table, self.shift = table, shift

    def forward(self, images, targets=None):
        if self.training:  # a loss dict, as torchvision's detectors give in train mode
            return {"box": torch.tensor(self.shift), "classification": torch.tensor(1.0)}
        out = []
        for img in images:
            t = self.table[int(img[0, 0, 0])]
            out.append({"boxes": t["boxes"] + self.shift, "labels": t["labels"],
                        "scores": torch.ones(len(t["labels"]))})  # fmt: skip
        return out


def test_map_is_100_for_exact_boxes_and_lower_for_shifted_ones():
    gen = torch.Generator().manual_seed(0)
    table, batch = {}, []
    for i in range(4):
        xy = torch.rand(3, 2, generator=gen) * 100
        boxes = torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=gen) * 40], dim=1)
        labels = torch.tensor([1, 2, 1])
        table[i] = {"boxes": boxes, "labels": labels}
        batch.append((torch.full((3, 8, 8), float(i)), {"boxes": boxes, "labels": labels}))
    loader = [detection.collate(batch[:2]), detection.collate(batch[2:])]
    exact, loss = detection.evaluate_map(_Oracle(table), loader, torch.device("cpu"))
    shifted, shifted_loss = detection.evaluate_map(
        _Oracle(table, shift=8.0), loader, torch.device("cpu")
    )
    assert exact == pytest.approx(100.0)
    assert 0 <= shifted < 90
    assert (loss, shifted_loss) == (1.0, 9.0)  # the sum of the loss dict, per image


def test_validation_loss_is_the_detectors_own_and_leaves_its_statistics(one_thread):
    """The loss ``evaluate_map`` reports is the train-mode loss dict's sum with the norms'
    running statistics (eval-mode norms): equal to it computed by hand, and no running
    mean or variance changes."""
    torch.manual_seed(0)
    model = DetectionTask().prepare_model(small_retinanet(num_classes=3))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
    batch = [(torch.rand(3, 64, 64), {"boxes": boxes, "labels": torch.tensor([1])})] * 2
    loader = [detection.collate(batch)]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert stats
    _, loss = detection.evaluate_map(model, loader, torch.device("cpu"))
    assert not model.training and not model.detector.training  # left in eval mode
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    model.detector.transform.eval()
    images, targets = loader[0]
    with torch.no_grad():
        expected = float(sum(model(list(images), list(targets)).values()))
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-6)


def test_an_onnx_heads_outputs_are_judged_by_the_detectors_own_decoding(tmp_path, one_thread):
    """The mAP of an exported detector's raw head in onnxruntime, decoded by the detector's
    anchors and NMS, is the torch model's (on boxes that are its own top detections)."""
    from compressor import export

    torch.manual_seed(0)
    model = DetectionTask().prepare_model(small_retinanet(num_classes=3)).eval()
    model.detector.score_thresh = 0.0  # random weights score below the default 0.05
    with torch.no_grad():  # scores that differ (torchvision's std 0.01 leaves near-ties)
        for conv in model.head.classification_head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0, 0.1)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        own = model(images)
    targets = [{"boxes": d["boxes"][:3], "labels": d["labels"][:3]} for d in own]
    loader = [(images, targets)]
    cpu = torch.device("cpu")
    assert detection.evaluate_map(model, loader, cpu)[0] == pytest.approx(100.0)
    export.export_onnx(model, torch.stack(images), tmp_path / "m.onnx")
    onnx_map = DetectionTask().evaluate_onnx(model, tmp_path / "m.onnx", loader)
    assert onnx_map == pytest.approx(100.0)
    # the head's outputs in another order (box offsets read as class logits) are far off
    reordered, loss = detection.evaluate_map(
        model, loader, cpu, raw_outputs=lambda x: model.raw(x).flip(-1)
    )
    assert reordered < 80 and np.isnan(loss)  # no loss for outputs computed elsewhere


def _compress_two_steps(
    tmp_path, checkpoint, arch, data, *, verify_samples, extra=(), **kwargs
) -> dict:
    """``compress --task detection --target-macs 1.3``, one epoch of two steps: the written
    report (checked to carry exit 0 and the task's metric, mAP)."""
    report = compressor.compress(
        checkpoint, arch=arch, data=str(data), out=tmp_path / "out", task="detection",
        target_macs=1.3, device="cpu",
        overrides=["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4",
                   "train.bn_recalibration_batches=1", f"export.verify_samples={verify_samples}",
                   "export.latency_threads=1", "gates.max_accuracy_drop=null", *extra],
        **kwargs,
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exit_code"] == written["exit_code"] == EXIT_OK
    assert written["metric"] == {"name": "map", "higher_is_better": True}
    return written


@pytest.mark.slow
def test_compress_detection_end_to_end_removes_channels_exactly(tmp_path, one_thread):
    import torchvision

    data = make_coco(tmp_path / "coco")
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None, weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "ssd.pt")
    written = _compress_two_steps(
        tmp_path, tmp_path / "ssd.pt", ARCH, data, verify_samples=4, num_classes=3
    )
    assert written["input"]["task"] == "detection"
    assert "no distillation" in written["input"]["distillation"]  # the recipe's 0.7 is ignored
    base, comp = written["baseline"], written["compressed"]
    for value in (base["accuracy"], comp["accuracy"], comp["sparse_accuracy"]):
        assert isinstance(value, float)  # mAP reported before and after (random init: ~0)
    # channels removed: the compact model is smaller, and reached the asked 1.3x MACs
    assert comp["channels_kept"] < comp["channels_total"]
    assert comp["macs"] * 1.3 <= base["macs"] * 1.001 and comp["params"] < base["params"]
    assert written["target"]["within"] is True
    # the heads' prediction layers kept their outputs (the class logits and box regressions)
    layers = {row["name"]: row for row in written["layers"]}
    cls0 = layers["head.classification_head.module_list.0.1"]
    assert cls0["shape_before"][0] == cls0["shape_after"][0]
    # the pruned model's raw head outputs equal the sparse model's, and onnxruntime agrees
    v = written["verification"]
    assert v["sparse_vs_pruned_relative"] <= 1e-4
    assert v["onnx_checker"] is True and v["top1_agreement"] == 1.0
    assert "NMS are not in model.onnx" in v["onnx_contents"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "model.onnx holds: raw head outputs" in markdown
    assert "| Epoch | Loss | map |" in markdown  # the training table names the task's metric
    # the compact file loads back as the detector, with the pruned shapes
    back = compressor.load(tmp_path / "out" / "model.safetensors")
    assert type(back).__name__ == "SSD"
    assert sum(p.numel() for p in back.parameters()) == comp["params"]


# RetinaNet and FCOS as a user brings them: their own builder, passed as --arch module:callable.
# The head's outputs in key order: box regressions (and FCOS's centerness) beside the classes.
SMALL = {
    "RetinaNet": (small_retinanet, ["bbox_regression", "cls_logits"]),
    "FCOS": (small_fcos, ["bbox_ctrness", "bbox_regression", "cls_logits"]),
}
PREDICTIONS = {
    "RetinaNet": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "FCOS": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
             "head.regression_head.bbox_ctrness"],
}  # fmt: skip


@pytest.mark.parametrize("kind", list(SMALL))
def test_raw_forward_is_the_head_output_of_retinanet_and_fcos(kind, one_thread):
    build, keys = SMALL[kind]
    model = DetectionTask().prepare_model(build(num_classes=3)).eval()
    assert type(model.detector).__name__ == kind and model.num_classes == 3
    assert detection.prediction_layers(model) == PREDICTIONS[kind]
    seen = []
    model.head.register_forward_hook(lambda m, i, out: seen.append(out))
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        raw = model(images)
        detections = model(list(images))  # the detector: its transform, then decode and NMS
    head = seen[-1]
    assert sorted(head) == keys
    assert torch.equal(raw, torch.cat([head[k] for k in keys], dim=-1))
    assert raw.shape[-1] == sum(head[k].shape[-1] for k in keys)  # e.g. RetinaNet: 4 + 3
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    # another size: resized (min_size/max_size) and zero-padded to the stride as the
    # detector's transform does
    other = torch.rand(2, 3, 100, 150)
    with torch.no_grad():
        raw, _ = model(other), model(list(other))
    head = seen[-1]
    assert torch.allclose(raw, torch.cat([head[k] for k in keys], -1), atol=1e-6)


def test_own_detector_checkpoint_loads_with_the_classes_it_stores(tmp_path):
    from compressor.checkpoint import load_checkpoint

    arch = "tests.helpers:small_retinanet"
    torch.save(small_retinanet(num_classes=5).state_dict(), tmp_path / "retina.pt")
    # the last conv is the box regression (9 anchors x 4 rows): the classes come from the
    # class logits (9 anchors x 5 rows), not from it
    loaded = load_checkpoint(tmp_path / "retina.pt", arch=arch)
    assert loaded.metadata["build_kwargs"]["num_classes"] == 5
    assert DetectionTask().prepare_model(loaded.model).num_classes == 5
    with pytest.raises(CheckpointError, match="has 5 classes .* but --num-classes is 3"):
        load_checkpoint(tmp_path / "retina.pt", arch=arch, num_classes=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SMALL))
def test_compress_retinanet_and_fcos_end_to_end(kind, tmp_path, one_thread):
    build = SMALL[kind][0]
    arch = f"tests.helpers:{build.__name__}"
    data = make_coco(tmp_path / "coco", n_train=4, n_val=2, size=128)
    torch.manual_seed(0)
    torch.save(build(num_classes=3).state_dict(), tmp_path / "det.pt")
    int8 = ["export.int8=static"] if kind == "RetinaNet" else []
    written = _compress_two_steps(
        tmp_path, tmp_path / "det.pt", arch, data, verify_samples=2, extra=int8
    )
    base, comp = written["baseline"], written["compressed"]
    for value in (base["accuracy"], comp["accuracy"], comp["sparse_accuracy"]):
        assert isinstance(value, float)  # mAP reported before and after (random init: ~0)
    # channels removed, most of the asked 1.3x MACs reduction reached (measured: RetinaNet
    # 1.24x, where 8-channel rounding of its 16-64-channel layers lands; FCOS 1.35x)
    assert comp["channels_kept"] < comp["channels_total"]
    assert base["macs"] >= 1.2 * comp["macs"] and comp["params"] < base["params"]
    layers = {row["name"]: row for row in written["layers"]}
    # the FPN's outputs feed one head shared by every level: they lose channels together,
    # and P6 (which reads P5) with them
    fpn_out = [f"backbone.fpn.layer_blocks.{i}.0" for i in range(3)] + [
        "backbone.fpn.extra_blocks.p6",
        "backbone.fpn.extra_blocks.p7",
    ]
    widths = {layers[n]["shape_after"][0] for n in fpn_out}
    assert len(widths) == 1 and widths.pop() < layers[fpn_out[0]]["shape_before"][0]
    # the prediction layers keep their outputs (the class logits and box regressions)
    for name in PREDICTIONS[kind]:
        assert layers[name]["shape_after"][0] == layers[name]["shape_before"][0]
    # every conv but the prediction layers can lose channels; FCOS's head towers lose whole
    # GroupNorm groups (two channels each here), so their norms keep their group width
    assert written["layers_left_whole"] == []
    if kind == "FCOS":
        towers = [f"head.{h}_head.conv.{i}" for h in ("classification", "regression")
                  for i in (0, 3, 6, 9)]  # fmt: skip
        assert any(layers[t]["shape_after"][0] < layers[t]["shape_before"][0] for t in towers)
    # the pruned model's raw head outputs equal the sparse model's, and onnxruntime agrees
    v = written["verification"]
    assert v["sparse_vs_pruned_relative"] <= 1e-4
    assert v["onnx_checker"] is True and v["top1_agreement"] == 1.0
    if int8:  # the raw head quantized: judged by its outputs, not by an argmax of them
        q = written["int8"]
        assert q["file"] == "model.int8.onnx" and q["onnx_checker"] is True
        assert q["top1_agreement"] is None and 0 < q["output_relative_error"] < 0.01
        # judged by mAP as the float model is (random weights: both ONNX models score 0)
        assert q["accuracy"] is not None and q["float_accuracy"] is not None
        assert "outputs within" in (tmp_path / "out" / "report.md").read_text()
    # the compact file loads back as the detector, with the pruned shapes
    back = compressor.load(tmp_path / "out" / "model.safetensors", arch=arch)
    assert type(back).__name__ == kind
    assert sum(p.numel() for p in back.parameters()) == comp["params"]
    for norm in back.modules():
        if isinstance(norm, torch.nn.GroupNorm):
            assert norm.num_channels == 2 * norm.num_groups


@pytest.mark.slow
def test_binarized_detector_keeps_functional_relus_full_precision_when_asked(tmp_path, one_thread):
    """torchvision's detectors cannot be traced by torch.fx (their FPN's P6/P7 calls F.relu):
    the binary recipe fails with exit 2 naming the recipe key; with
    ``activations.functional=false`` the nn.ReLU modules of backbone and head go binary
    (exported as Greater/Cast, onnxruntime agrees), the report says the functional ones stayed
    full precision, and the compact file loads back with the same binary activations."""
    import onnx

    from compressor import activations

    arch = "tests.helpers:small_retinanet"
    data = make_coco(tmp_path / "coco", n_train=4, n_val=2, size=128)
    torch.manual_seed(0)
    torch.save(small_retinanet(num_classes=3).state_dict(), tmp_path / "det.pt")
    binary = ["activations.calibration_batches=1", "train.epochs=2"]
    with pytest.raises(BadInputError, match="--set activations.functional=false"):
        _compress_two_steps(tmp_path, tmp_path / "det.pt", arch, data, verify_samples=2,
                            recipe="tl1-group-binary", extra=binary)  # fmt: skip
    written = _compress_two_steps(
        tmp_path, tmp_path / "det.pt", arch, data, verify_samples=2, recipe="tl1-group-binary",
        extra=[*binary, "activations.functional=false"],
    )  # fmt: skip
    act = written["activations"]
    assert act["bits"] == 1 and act["functional"] is False
    assert any(n.startswith("backbone.body.") for n in act["swapped"])
    assert any(n.startswith("head.classification_head.") for n in act["swapped"])
    assert all(layer["type"] == "binary" for layer in act["layers"].values())
    assert "every functional ReLU" in (tmp_path / "out" / "report.md").read_text()
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {"Greater", "Cast"} <= ops
    v = written["verification"]
    assert v["top1_agreement"] == 1.0 and v["sparse_vs_pruned_relative"] <= 1e-4
    assert written["compressed"]["channels_kept"] < written["compressed"]["channels_total"]
    back = compressor.load(tmp_path / "out" / "model.safetensors", arch=arch)
    assert sorted(activations.activation_configs(back)) == sorted(act["swapped"])
