"""The training loop: RVSM fine-tuning, evaluation, BatchNorm recalibration, masked recovery.

Read top to bottom like torchvision's reference ``train.py``: one function per
job, explicit arguments, no global state. Progress goes to the ``progress``
argument (a :class:`compressor.progress.Progress`, silent by default); the CLI
decides how it is shown. How the steps run on the device (mixed precision,
channels-last batches) is a :class:`Precision`, resolved once from the recipe's
``train.amp`` and ``train.channels_last`` by :func:`resolve_precision`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import DivergenceError, RecipeError
from compressor.progress import SILENT, Progress

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


AUTO_MIN_EPOCHS = 3


def resolve_epochs(epochs: int | str, steps_per_epoch: int, min_steps: int) -> int:
    """``train.epochs``: an integer as given; ``auto`` is :data:`AUTO_MIN_EPOCHS` epochs, or
    more on a training set small enough that those make fewer than ``min_steps`` SGD steps
    (whole epochs, at least ``min_steps`` steps). The method's schedule (the seeker's
    stages, ``beta``'s growth, the budget's reach) needs steps, not passes over the data:
    the same 3 epochs are 1,290 steps over 55,000 images and 237 over 10,000."""
    if epochs != "auto":
        return int(epochs)
    if steps_per_epoch <= 0:
        return AUTO_MIN_EPOCHS
    return max(AUTO_MIN_EPOCHS, math.ceil(min_steps / steps_per_epoch))


def steps_per_epoch(loader, max_steps: int | None) -> int:
    """SGD steps in one epoch over ``loader``: its batches, capped by ``max_steps``
    (``train.max_steps_per_epoch``; None: no cap)."""
    return len(loader) if max_steps is None else min(len(loader), max_steps)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` on ``device``: ``"off"``, ``"bf16"`` or ``"fp16"``.

    ``auto`` is bf16 on a CUDA device with native bf16 (Ampere and later), fp16 (with
    loss scaling) on older ones, and off on the CPU. bf16 on the CPU runs when asked
    for; fp16 there is refused (``RecipeError``, exit 2): the CPU has no fast fp16
    kernels, and bf16 needs no loss scaling.
    """
    if amp == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise RecipeError(
            f"`train.amp` is 'fp16', which needs a CUDA device; this run trains on {device}. "
            "Set `train.amp` to bf16, off or auto (--set train.amp=auto), or pass --device cuda."
        )
    return amp


class Precision:
    """How the training steps run: ``amp`` (``"off"``, ``"bf16"`` or ``"fp16"``: the dtype
    the forward pass and the loss run in under ``torch.autocast``; weights, gradients and
    the optimizer stay float32) and ``channels_last`` (4-D input batches in
    ``torch.channels_last``, so that convolutions run in NHWC; the parameters keep their
    layout, which the fused kernels, the sparse copy and the exports rely on). fp16 carries
    a ``torch.amp.GradScaler`` (``scaler``), kept across epochs; otherwise ``scaler`` is None.
    """

    def __init__(self, device: torch.device, amp: str = "off", channels_last: bool = False):
        if amp not in ("off", *AMP_DTYPES):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
        self.device = torch.device(device)
        self.amp = amp
        self.channels_last = bool(channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def autocast(self):
        """The context the forward pass and the loss run in (a no-op with ``amp`` off)."""
        return torch.autocast(
            self.device.type, dtype=AMP_DTYPES.get(self.amp), enabled=self.amp != "off"
        )

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the device, in channels-last when that is on and it is 4-D."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def summary(self) -> dict:
        """What ran (the report's ``input``: ``amp`` and ``channels_last`` as resolved)."""
        return {"amp": self.amp, "channels_last": self.channels_last}


def resolve_precision(train, device: torch.device, model: nn.Module) -> Precision:
    """The :class:`Precision` of ``train`` (the recipe's train section,
    :class:`compressor.config.Train`) on ``device`` for ``model``: ``amp`` by
    :func:`resolve_amp`; ``channels_last`` ``auto`` is on for a model with 2-D
    convolutions on a CUDA device, off otherwise."""
    channels_last = train.channels_last
    if channels_last == "auto":
        channels_last = device.type == "cuda" and any(
            isinstance(m, nn.Conv2d) for m in model.modules()
        )
    precision = Precision(device, resolve_amp(train.amp, device), channels_last)
    log.info("training steps: amp %s, channels-last %s", precision.amp, precision.channels_last)
    return precision


def make_optimizer(model: nn.Module, train, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, the reference), Adam or AdamW over all trainable parameters.

    ``train`` is the recipe's train section (:class:`compressor.config.Train`)."""
    lr = train.lr if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    name = train.optimizer
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_state_by_name(optimizer: torch.optim.Optimizer | None, model: nn.Module) -> dict:
    """A copy of ``optimizer``'s per-parameter state (SGD's momentum buffer, Adam's moments
    and step), keyed by parameter name; empty for no optimizer (before training starts)."""
    if optimizer is None:
        return {}
    names = {p: n for n, p in model.named_parameters()}
    return {
        names[p]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for p, state in optimizer.state.items()
        if p in names
    }


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer | None, model: nn.Module, saved: Mapping[str, dict]
) -> None:
    """Put ``optimizer``'s per-parameter state back to ``saved`` (from
    :func:`optimizer_state_by_name`): a parameter absent from it gets none, as before its
    first step. The parameter groups (the learning rate the schedule sets) stay as they are."""
    if optimizer is None:
        return
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for name, state in saved.items():
        optimizer.state[params[name]] = {
            k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()
        }


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: cosine to 0, constant, or /10 at 50% and 75%."""
    total = max(1, total_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if schedule == "step":
        return 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """Per-step learning-rate schedule (see :func:`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(schedule, s, total_steps)
    )


@torch.no_grad()
def _top1_hits(model: nn.Module, loader, device: torch.device, progress: Progress) -> tuple:
    """One pass over ``loader``: 1.0/0.0 per sample for a right/wrong top-1 prediction (in
    the loader's order, on the CPU) and the summed cross-entropy. :func:`evaluate` and
    :func:`top1_per_sample` both read this, so the two cannot count differently."""
    model.eval()
    hits, loss_sum = [], 0.0
    for x, y in progress.log_every(loader, "evaluate"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        hits.append((out.argmax(1) == y).to(torch.float64).cpu())
    return (torch.cat(hits) if hits else torch.zeros(0, dtype=torch.float64)), loss_sum


def evaluate(
    model: nn.Module, loader, device: torch.device, progress: Progress = SILENT
) -> tuple[float, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over ``loader`` (summed over DDP ranks)."""
    hits, loss_sum = _top1_hits(model, loader, device, progress)
    stats = torch.tensor(
        [float(hits.sum()), len(hits), loss_sum], dtype=torch.float64, device=device
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    correct, total, loss_sum = stats.tolist()
    if total == 0:
        return float("nan"), float("nan")
    return 100.0 * correct / total, loss_sum / total


def top1_per_sample(
    model: nn.Module, loader, device: torch.device, progress: Progress = SILENT
) -> torch.Tensor:
    """100 where the top-1 prediction is right, 0 where not, one value per sample of
    ``loader`` in its order (this rank's share under DDP): their mean is :func:`evaluate`'s
    accuracy."""
    return 100.0 * _top1_hits(model, loader, device, progress)[0]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, device: torch.device, batches: int, task=None) -> None:
    """Re-estimate BatchNorm running statistics of the current weights.

    Shrunk or zeroed weights change what the running statistics should be; a
    sparse model evaluated with the dense model's statistics scores far below
    its real accuracy (docs/design.md, "Evaluating the sparse model"). Runs ``batches``
    training batches in train mode with no gradient, using a cumulative average.
    ``task`` (a :class:`compressor.tasks.Task`; None: the batches' inputs are tensors) turns
    a batch's inputs into the tensor the model runs on (``task.model_inputs``).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if task is not None:
                x = task.model_inputs(x)
            model(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the knowledge in a
    neural network", 2015, eq. 2 and the T^2 scaling that keeps its gradients
    comparable to the cross-entropy's as T changes).
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def teacher_outputs(teacher: nn.Module | None, x: torch.Tensor, distill) -> torch.Tensor | None:
    """The teacher's outputs on ``x`` (without gradient) when distillation is on
    (``distill.weight > 0``), else None."""
    if teacher is None or distill is None or distill.weight <= 0:
        return None
    with torch.no_grad():
        return teacher(x)


def distilled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, distill
) -> torch.Tensor:
    """Cross-entropy, mixed with :func:`distillation_loss` when ``teacher_logits`` is given.

    ``(1 - w) CE + w KD`` with ``w = distill.weight`` (the classification task's loss,
    :class:`compressor.tasks.ClassificationTask`).
    """
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return ce
    w = distill.weight
    return (1 - w) * ce + w * distillation_loss(logits, teacher_logits, distill.temperature)


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    x: torch.Tensor,
    teacher: nn.Module | None,
    distill,
) -> torch.Tensor:
    """:func:`distilled_cross_entropy` against ``teacher`` (the input model, frozen, eval
    mode), which runs without gradient on the same batch."""
    return distilled_cross_entropy(logits, labels, teacher_outputs(teacher, x, distill), distill)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    method=None,
    max_steps: int | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    log_every: int = 50,
    epoch: int = 0,
    teacher: nn.Module | None = None,
    distill=None,
    progress: Progress = SILENT,
    kept_epochs: int = 0,
    lr_key: str = "train.lr",
    precision: Precision | None = None,
    task=None,
) -> float:
    """One pass over ``loader``; returns the mean training loss.

    With ``method`` (a :class:`compressor.method.SparseTraining`), its two hooks run
    around the optimizer step: ``method.after_backward()`` (the coupling gradient
    ``beta (w - u)``) and ``method.after_step()`` (the sparse copy ``u = prox(w)``);
    see :func:`optimizer_step` for how they meet mixed precision (``precision``, a
    :class:`Precision`; None: float32, batches as they come). With ``masks`` (recovery): zero
    weights stay zero. The loss is ``task.loss`` (a :class:`compressor.tasks.Task`; None:
    classification, :func:`distilled_cross_entropy`), given the teacher's outputs when
    ``teacher`` and ``distill`` (the recipe's section) ask for distillation; the batch goes
    to the device and through the model by ``task.to_device`` and ``task.forward_loss``
    (classification: ``model(x)``; detection: ``model(images, targets)``). A non-finite loss raises ``DivergenceError`` before any
    weight is updated with it; its message says what the caller kept for --resume
    (``kept_epochs``: the completed epochs whose state it saved; 0: nothing) and which
    learning rate to lower (``lr_key``). ``progress`` shows the steps as they run (step,
    loss, time left).
    """
    precision = precision or Precision(device)
    if task is None:
        from compressor.tasks import ClassificationTask  # tasks builds on this module

        task = ClassificationTask()
    model.train()
    loss_sum, seen = 0.0, 0
    start = time.perf_counter()
    steps = steps_per_epoch(loader, max_steps)
    stage = "recover" if masks is not None else "train"
    batches = progress.log_every(loader, f"{stage} epoch {epoch + 1}", total=steps)
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        x, y = task.to_device(batch, precision)
        with precision.autocast():
            loss = task.forward_loss(model, x, y, teacher, distill)
        if not torch.isfinite(loss):
            raise DivergenceError(
                divergence_message(
                    loss.item(),
                    where=f"{'recovery ' if masks is not None else ''}epoch {epoch + 1}, step {step + 1}",
                    first=epoch == 0 and masks is None,
                    optimizer=optimizer,
                    lr_key=lr_key,
                    kept_epochs=kept_epochs,
                    penalised=method is not None,
                )
            )
        optimizer.zero_grad(set_to_none=True)
        if optimizer_step(loss, optimizer, method, precision.scaler):
            scheduler.step()
            if method is not None:
                method.after_step()
            if masks is not None:
                with torch.no_grad():
                    for p, mask in masks.items():
                        p.mul_(mask)
        loss_sum += loss.item() * len(y)
        seen += len(y)
        batches.update(loss=loss_sum / seen)
        if log_every and progress.mode == "off" and (step + 1) % log_every == 0:
            rate = seen / (time.perf_counter() - start)
            log.info(
                "epoch %d step %d/%d loss %.4f (%.0f img/s)",
                epoch + 1,
                step + 1,
                steps,
                loss_sum / seen,
                rate,
            )
    return loss_sum / max(seen, 1)


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, method=None, scaler=None
) -> bool:
    """Backward, the method's coupling gradient, the optimizer step; False when the step
    was skipped (nothing changed: the caller then skips the schedule and the method's
    ``after_step`` too).

    Without ``scaler``: ``loss.backward()``, ``method.after_backward()``,
    ``optimizer.step()``. With a ``torch.amp.GradScaler`` (fp16): the scaled loss is
    backpropagated and the gradients unscaled *before* ``method.after_backward()``, so
    the coupling ``beta (w - u)`` is added to the true float32 gradients, not to ones
    multiplied by the loss scale; the scaler then skips the step when a gradient is inf
    or nan (fp16 overflow), which it says by lowering its scale.
    """
    if scaler is None:
        loss.backward()
        if method is not None:
            method.after_backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if method is not None:
        method.after_backward()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


def divergence_message(
    loss: float,
    *,
    where: str,
    first: bool,
    optimizer: torch.optim.Optimizer,
    lr_key: str,
    kept_epochs: int,
    penalised: bool,
) -> str:
    """What a diverged run tells the user: where (``"epoch 1, step 3"``), what was kept for
    --resume (the truth: nothing when ``kept_epochs`` is 0; ``first``: no epoch had completed)
    and which learning rate (``lr_key``) to lower."""
    group = optimizer.param_groups[0]
    lr = group.get("initial_lr", group["lr"])
    lower = f"lower `{lr_key}` (now {lr:g})"
    if penalised:
        lower += " or the penalty strength (`penalty.group.strength`)"
    what = f"the training loss became {loss} at {where}"
    if kept_epochs > 0:
        return (
            f"{what}. The state after epoch {kept_epochs} is kept for --resume, but resuming "
            f"with the same settings would likely diverge again: {lower} and rerun without "
            "--resume."
        )
    nothing = " (no epoch had completed)" if first else ""
    return f"{what}; nothing was kept for --resume{nothing}. To fix it, {lower} and rerun."


def nonzero_masks(model: nn.Module) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per conv/linear weight, a 0/1 mask of its non-zero entries (recovery keeps zeros at zero)."""
    return {
        m.weight: (m.weight.detach() != 0).to(m.weight.dtype)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    }
