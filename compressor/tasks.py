"""What the model is trained and judged on: the loss of a batch, the evaluation metric and
the data (docs/design.md, "Tasks").

A :class:`Task` is what ``compress --task`` names: ``classification`` (the default:
cross-entropy, top-1 accuracy, labels checked against the classifier), ``detection``
(torchvision's single-stage detectors on COCO-format data, COCO mAP:
:mod:`compressor.detection`) or a user's own ``package.module:Class``, imported from the
current directory like ``--arch``'s callables.
Only the command line or the API chooses a task; a checkpoint or its metadata never does.

Tasks are registered classes (``TASKS``); adding a built-in one is a subclass with
``loss``/``evaluate`` and a ``@register_task("name")`` line. The pipeline reads everything
it judges through the task: the baseline, per-epoch and final metric, the accuracy seeker
and the ``accuracy_drop`` gate, whose direction follows :attr:`Task.higher_is_better`.
The report keeps its ``accuracy`` keys (they hold the task's metric) and names the metric
in ``metric: {name, higher_is_better}``.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch
from torch import nn

from compressor import data as data_mod
from compressor import detection, export, train
from compressor.errors import BadInputError, CheckpointError
from compressor.progress import SILENT, Progress
from compressor.registry import registrar

TASKS: dict[str, type[Task]] = {}


register_task = registrar(
    TASKS, "task",
    doc="Class decorator: make a :class:`Task` available as ``--task name``.",
)  # fmt: skip


class Task:
    """The loss, the metric and the data of what the model does.

    Subclass it for your own task and pass ``--task package.module:Class`` (the class is
    built with no arguments). ``metric`` names what :meth:`evaluate` returns (e.g.
    ``"mse"``); ``higher_is_better`` says which way it improves: the ``accuracy_drop``
    gate and the accuracy seeker then bound ``baseline - compressed`` (higher is better)
    or ``compressed - baseline`` (lower is better), in the metric's own units.
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "metric"
    higher_is_better: ClassVar[bool] = True
    # labels are class indices judged by the outputs' argmax, and the metric is top-1 in
    # percent: then the INT8 model's onnxruntime top-1 on the validation split is the metric
    top1_labels: ClassVar[bool] = False

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        teacher_outputs: torch.Tensor | None,
        distill,
    ) -> torch.Tensor:
        """The training loss of one batch (a scalar with gradient).

        ``teacher_outputs`` (the input model's outputs on ``inputs``, without gradient) is
        given when distillation is on (``distill.weight > 0``; ``distill`` is the recipe's
        section, :class:`compressor.config.Distill`), else None.
        """
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, loader, device: torch.device, progress: Progress = SILENT
    ) -> tuple[float, float]:
        """``(metric, mean loss)`` of ``model`` over ``loader`` (batches of ``(x, y)``)."""
        raise NotImplementedError

    def sample_scores(
        self, model: nn.Module, loader, device: torch.device, progress: Progress = SILENT
    ) -> torch.Tensor | None:
        """The metric per sample of ``loader``, in its order, when the metric is their mean
        (a score per image: 100 or 0 for top-1 accuracy); None when it is not.

        With them the accuracy seeker measures the standard error of the drop, paired per
        sample with the input model, and keeps ``target.seek_margin`` of them below its
        allowance (:func:`compressor.metrics.paired_mean_and_stderr`). Default: None (no
        margin)."""
        return None

    def evaluate_onnx(
        self, model: nn.Module, onnx_path, loader, progress: Progress = SILENT
    ) -> float | None:
        """The task's metric of the ONNX model at ``onnx_path`` (onnxruntime on the CPU) over
        ``loader``, for a task whose metric is not top-1 on labels: an INT8 model is then
        gated on it. ``model`` is the torch model it was exported from. Default: None (not
        measured; top-1 is measured by :func:`compressor.export.compare_onnx`)."""
        return None

    # What a task whose batches are not ``(tensor, tensor)`` overrides (detection): the
    # defaults are what the training loop did before tasks had them.

    #: whether ``distill.weight > 0`` trains against the input model's outputs; a task
    #: without it ignores the weight (the log and the report's ``input.distillation`` say so)
    distillation: ClassVar[bool] = True

    def to_device(self, batch, precision: train.Precision):
        """``(x, y)`` of a loader's ``batch`` on the training device (``precision.batch``
        for the inputs: channels-last when that is on)."""
        x, y = batch
        return precision.batch(x), y.to(precision.device, non_blocking=True)

    def forward_loss(
        self, model: nn.Module, x, y, teacher: nn.Module | None, distill
    ) -> torch.Tensor:
        """The loss of one batch on the device: :meth:`loss` of ``model(x)``, given the
        teacher's outputs when distillation is on."""
        return self.loss(model(x), y, x, train.teacher_outputs(teacher, x, distill), distill)

    def model_inputs(self, x) -> torch.Tensor:
        """A batch's inputs as the one tensor ``model(tensor)`` takes (BatchNorm
        recalibration, INT8 calibration and checks). Default: ``x`` as it is."""
        return x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The loaded model as the pipeline runs it: ``model(tensor batch)`` must return a
        tensor (groups, MACs, the parity check and the export run it so). Default: itself."""
        return model

    def num_outputs(self, model: nn.Module, outputs: torch.Tensor) -> int:
        """The model's classes given its outputs on one example (:meth:`check_data`'s
        ``outputs``, the compact file's ``num_classes``). Default: the last dimension."""
        return int(outputs.shape[-1])

    def kept_layers(self, model: nn.Module) -> list[str]:
        """Module names whose output channels are never removed, beyond ``prune.keep`` and
        the last layer executed (the classifier). Default: none."""
        return []

    def export_contents(self) -> str | None:
        """What ``model.onnx`` computes when it is not the whole model's output (the
        report's ``verification.onnx_contents``). Default: None (the model's output)."""
        return None

    def load_data(self, spec, **kwargs) -> data_mod.DataSplits:
        """The train and val splits at ``spec`` (``--data``); ``kwargs`` are ``mean``,
        ``std``, ``input_shape`` and ``augment`` from the recipe. Default: compressor's
        :func:`compressor.data.load_data` (images with integer labels)."""
        return data_mod.load_data(spec, **kwargs)

    def check_data(self, splits: data_mod.DataSplits, model: nn.Module, outputs: int) -> None:
        """Raise ``DataError`` (exit 2) when the data cannot fit a model with ``outputs``
        outputs. Default: no check."""

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive: worse)."""
        return baseline - value if self.higher_is_better else value - baseline

    def score(self, value: float) -> float:
        """``value`` as a higher-is-better score (negated for a lower-is-better metric):
        what the accuracy seeker compares."""
        return value if self.higher_is_better else -value

    def summary(self) -> dict:
        """The report's ``metric``: ``{name, higher_is_better}``."""
        return {"name": self.metric, "higher_is_better": bool(self.higher_is_better)}


@register_task("classification")
class ClassificationTask(Task):
    """Cross-entropy (mixed with knowledge distillation when asked), top-1 accuracy in
    percent, and labels that must index the classifier's outputs."""

    metric = "accuracy"
    higher_is_better = True
    top1_labels = True

    def loss(self, outputs, targets, inputs, teacher_outputs, distill):
        return train.distilled_cross_entropy(outputs, targets, teacher_outputs, distill)

    def evaluate(self, model, loader, device, progress=SILENT):
        return train.evaluate(model, loader, device, progress)

    def sample_scores(self, model, loader, device, progress=SILENT):
        return train.top1_per_sample(model, loader, device, progress)

    def check_data(self, splits, model, outputs):
        # every loader fixes the classifier from the checkpoint's weights: --num-classes
        # cannot resize it
        data_mod.check_labels(splits, outputs, classifier=_classifier(model, outputs))


@register_task("detection")
class DetectionTask(Task):
    """torchvision single-stage detectors (SSD, SSDlite, RetinaNet, FCOS) on COCO-format data:
    the detector's own losses in train mode, COCO mAP@[.5:.95] in percent
    (:mod:`compressor.detection`). No distillation; ``model.onnx`` holds the raw head."""

    metric = "map"
    higher_is_better = True
    top1_labels = False
    distillation = False

    def loss(self, outputs, targets, inputs, teacher_outputs, distill):
        raise NotImplementedError("detection's loss is the detector's own: see forward_loss")

    def forward_loss(self, model, x, y, teacher, distill):
        return detection.loss_of(model, x, y)

    def to_device(self, batch, precision):
        images, targets = batch
        return detection.to_device(images, targets, precision.device)

    def model_inputs(self, x):
        return torch.stack(list(x)) if isinstance(x, list | tuple) else x

    def evaluate(self, model, loader, device, progress=SILENT):
        return detection.evaluate_map(model, loader, device, progress)

    def evaluate_onnx(self, model, onnx_path, loader, progress=SILENT):
        """mAP of the detections decoded (by the detector's own anchors and NMS) from the
        ONNX model's raw head outputs."""
        run_onnx = export.onnx_runner(onnx_path)
        device = next(model.parameters()).device
        return detection.evaluate_map(
            model, loader, device, progress,
            raw_outputs=lambda x: torch.from_numpy(run_onnx(x.float().cpu().numpy())),
        )[0]  # fmt: skip

    def load_data(self, spec, **kwargs):
        detection.mean_average_precision()  # a missing torchmetrics fails here, before training
        if kwargs.get("mean") is not None or kwargs.get("std") is not None:
            raise BadInputError(
                "--task detection: data.mean/std (--mean/--std) do not apply: torchvision's "
                "detectors normalise [0, 1] images with their own image_mean/image_std. Drop them."
            )
        return detection.load_coco(spec, input_shape=kwargs.get("input_shape"))

    def check_data(self, splits, model, outputs):
        detection.check_labels(splits, outputs)

    def prepare_model(self, model):
        return detection.DetectionModel(model)

    def num_outputs(self, model, outputs):
        return model.num_classes

    def kept_layers(self, model):
        return detection.prediction_layers(model)

    def export_contents(self):
        return detection.EXPORT_CONTENTS


def resolve_task(spec: str | Task | type[Task] = "classification") -> Task:
    """The task ``spec`` names: a registered name (``classification``), ``package.module:Class``
    (imported with the current directory on ``sys.path``, as ``--arch`` does), a
    :class:`Task` subclass or instance. Anything else raises ``BadInputError`` (exit 2)
    naming ``--task`` and the fix."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, type) and issubclass(spec, Task):
        return spec()
    if not isinstance(spec, str) or not spec:
        raise BadInputError(f"--task must be a name or package.module:Class. Got {spec!r} instead.")
    if spec in TASKS:
        return TASKS[spec]()
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadInputError(
            f"--task must be one of {', '.join(sorted(TASKS))} or package.module:Class "
            f"(your own Task subclass). Got {spec!r} instead.{hint}"
        )
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise BadInputError(
            f"--task {spec!r} must be package.module:Class (e.g. my_task:MeanSquaredTask)."
        )
    from compressor.checkpoint import _import_callable

    try:
        cls = _import_callable(spec, flag="--task")
    except CheckpointError as exc:  # the same import and messages as --arch's
        raise BadInputError(str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise BadInputError(
            f"--task {spec}: {attr} is not a subclass of compressor.tasks.Task. "
            "Name a class that subclasses it (see examples/task_plugin)."
        )
    return cls()


def task_path(task: Task) -> str:
    """How to name ``task`` again (the report's ``input.task``): its registered name, or
    ``package.module:Class``."""
    cls = type(task)
    if TASKS.get(task.name) is cls:
        return task.name
    return f"{cls.__module__}:{cls.__qualname__}"


def _classifier(model: nn.Module, outputs: int) -> str | None:
    """``"fc3, Linear 84 -> 10"``: the last Linear/Conv with ``outputs`` outputs, for messages."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == outputs:
            found = f"{name}, Linear {m.in_features} -> {m.out_features}"
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == outputs:
            found = f"{name}, {type(m).__name__} {m.in_channels} -> {m.out_channels} channels"
    return found
