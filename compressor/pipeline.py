"""The one place that knows the order of the stages (docs/design.md, "The pipeline").

checkpoint -> load -> baseline eval -> groups -> sparsify (RVSM) -> w := u, BN
recalibration -> prune zero groups (exact) -> recover -> export ONNX -> verify in
onnxruntime -> report + gates.

``compress(...)`` is the public API; the CLI only parses arguments into it. It
is a short sequence of stage functions over one :class:`Run` (the typed state
the stages hand on); every stage is a call into the module that owns that job.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import __version__, export, latency_model, method, metrics, outdir, tasks, train
from compressor import checkpoint as ckpt
from compressor import data as data_mod
from compressor import recipe as recipe_mod
from compressor import report as report_mod
from compressor.config import Recipe
from compressor.errors import (
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_VERIFICATION_FAILED,
    BadInputError,
    CompressorError,
    DataError,
    DivergenceError,
    VerificationError,
)
from compressor.failures import RunRecord, current_record, reports_failure, write_failed_report
from compressor.fileio import atomic_output, atomic_write_text
from compressor.groups import build_groups
from compressor.method import allocation
from compressor.models import BUILTIN_MODELS
from compressor.outdir import OUTPUT_FILES, STATE_DIR
from compressor.progress import SILENT, Progress
from compressor.prune import prune_zero_channels
from compressor.runtime import resolve_round_to

log = logging.getLogger(__name__)

INT8_CALIBRATION_SAMPLES = 256  # training images that set the static INT8 activation ranges


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info("stage: %s", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Run:
    """The state one ``compress`` call hands from stage to stage."""

    checkpoint: Path
    out: Path
    data: str | None
    seed: int
    command: list[str] | None
    progress: Progress
    resolved: dict  # the recipe as a dict (report.json, recipe.yaml, resume fingerprint)
    recipe: Recipe  # the same, typed
    device: torch.device
    distributed: bool
    is_main: bool
    record: RunRecord
    task: tasks.Task  # the loss, metric and data (--task)
    timer: _Timer = field(default_factory=_Timer)
    splits: data_mod.DataSplits | None = None
    shape: tuple | None = None
    loaded: ckpt.LoadedCheckpoint | None = None
    model: nn.Module | None = None
    example: torch.Tensor | None = None
    model_classes: int = 0
    train_loader: object = None
    val_loader: object = None
    verify_inputs: torch.Tensor | None = None
    preprocessing: dict | None = None
    baseline: dict = field(default_factory=dict)
    baseline_scores: torch.Tensor | None = None  # the input model's metric per val sample
    teacher: nn.Module | None = None
    swap: object = None  # the activation swap (binarized activations), if any
    switch: object = None  # their gradual switch from ReLU (activations.ActivationSwitch)
    groups: object = None
    sparse: method.SparseTraining | None = None
    steps_per_epoch: int = 0
    history: list = field(default_factory=list)
    verification: dict = field(default_factory=dict)
    pruned: object = None
    precision: train.Precision | None = None  # train.amp / channels_last as resolved
    round_to: int = 1  # prune.round_to as resolved (runtime.resolve_round_to)
    optimizer: torch.optim.Optimizer | None = None  # made after the method (the seeker's rollback)

    @property
    def state_path(self) -> Path:
        return self.out / STATE_DIR / "state.pt"

    @property
    def activations_info(self) -> dict | None:
        if self.swap is None:
            return None
        from compressor import activations

        act = self.recipe.activations
        return {
            "bits": act.bits,
            "ste": act.ste,
            "swapped": list(self.swap.swapped),
            "skipped": list(self.swap.skipped),
            "functional": act.functional,  # False: functional ReLUs stayed full precision
            "calibration_batches": act.calibration_batches,
            "layers": activations.summarize(self.model),  # the learned scale and threshold
            "switch": self.switch.summary() if self.switch is not None else None,
        }


# ---------------------------------------------------------------------------- the API


@reports_failure
def compress(
    checkpoint: str | os.PathLike,
    *,
    recipe: str = "tl1-group",
    data: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape=None,
    mean=None,
    std=None,
    out: str | os.PathLike = "compressed",
    overrides=(),
    device: str = "auto",
    seed: int = 0,
    max_accuracy_drop: float | None = None,
    target_macs=None,
    target_params=None,
    target_size: int | None = None,
    target_latency: float | None = None,
    latency_batch: int | None = None,
    trust_checkpoint: bool = False,
    resume: bool = False,
    command: list[str] | None = None,
    progress: Progress = SILENT,
    task: str | tasks.Task = "classification",
) -> dict:
    """Compress ``checkpoint`` and write the outputs to ``out``; returns the report (a dict).

    The report's ``exit_code`` is 0 (success), 3 (a gate failed; outputs still
    written) or 4 (verification failed). Bad input raises a ``CompressorError``
    subclass with exit code 2 that names the problem and the fix. ``progress``
    shows the training and evaluation steps as they run (silent by default). ``task``
    (``--task``: a registered name, ``package.module:Class`` or a :class:`compressor.tasks.Task`)
    gives the loss, the metric the report and the gates judge, and the data loading.
    """
    task = tasks.resolve_task(task)
    resolved = _resolve_recipe(
        recipe, overrides, mean=mean, std=std, input_shape=input_shape,
        max_accuracy_drop=max_accuracy_drop,
        targets={"macs": parse_factor(target_macs, "--target-macs"),
                 "params": parse_factor(target_params, "--target-params"), "size": target_size,
                 "latency": target_latency, "latency_batch": latency_batch},
    )  # fmt: skip
    run = _start(Path(checkpoint), Path(out), data, seed, command, progress, resolved, device, task)
    resume_state = _load_inputs(
        run, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint, resume=resume
    )
    _open_out(run)
    _measure_baseline(run)
    _prepare_model(run)
    optimizer, scheduler, train_model = _build_method(run, resume_state)
    _sparsify(run, optimizer, scheduler, train_model)
    if not _prune(run):
        return _verification_failed(run)
    _recover(run)
    return _export_and_report(run)


# ---------------------------------------------------------------------------- stages


def _resolve_recipe(recipe, overrides, *, mean, std, input_shape, max_accuracy_drop, targets):
    """The recipe (defaults < file < --set) with the command line's own flags applied."""
    resolved = copy.deepcopy(recipe_mod.load_recipe(recipe, overrides))
    if mean is not None:
        resolved["data"]["mean"] = list(mean)
    if std is not None:
        resolved["data"]["std"] = list(std)
    if input_shape is not None:
        resolved["data"]["input_shape"] = list(_parse_shape(input_shape))
    if max_accuracy_drop is not None:  # the gate, and (without a target) the seeker's budget
        resolved["gates"]["max_accuracy_drop"] = float(max_accuracy_drop)
        resolved["target"]["seek_accuracy_drop"] = float(max_accuracy_drop)
    for key, value in targets.items():
        if value is not None:
            resolved["target"][key] = value
    return recipe_mod.validate_recipe(resolved, source="command line")


def _start(checkpoint, out, data, seed, command, progress, resolved, device, task) -> Run:
    """Device, distributed set-up and the run's record; --out made ready (nothing moved)."""
    distributed, rank, _ = _distributed()
    dev = _resolve_device(device)
    if distributed and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not checkpoint.exists():
        raise BadInputError(
            f"Checkpoint {checkpoint} does not exist. Pass the path of a .pt/.pth/.safetensors file."
        )
    record = current_record()
    run = Run(
        checkpoint=checkpoint, out=out, data=data, seed=seed, command=command,
        progress=progress, resolved=resolved, recipe=Recipe.from_dict(resolved), device=dev,
        distributed=distributed, is_main=rank == 0, record=record, task=task,
    )  # fmt: skip
    record.out, record.is_main, record.resolved = out, run.is_main, resolved
    record.command, record.timer = command, run.timer
    if run.is_main:
        record.created = outdir.prepare_out(out, checkpoint)
    return run


def _load_inputs(run: Run, *, arch, num_classes, trust_checkpoint, resume) -> dict | None:
    """Data, checkpoint and the input shape, checked against each other; bad input leaves
    --out as it was. Returns the resume state when resuming."""
    cfg = run.recipe
    with run.timer.stage("load"):
        try:
            resume_state = None
            if resume:
                resume_state = outdir.read_resume_state(run.state_path, _fingerprint(run), run.out)
            _seed_everything(run.seed)
            epochs = cfg.train.epochs  # "auto" is resolved from the data's size, later
            trains = epochs == "auto" or epochs + cfg.recover.epochs > 0
            if trains and run.data is None:
                length = "train.epochs: auto" if epochs == "auto" else f"{epochs} epoch(s)"
                raise DataError(
                    f"The recipe trains ({length}, +{cfg.recover.epochs} recovery) "
                    "and needs data: pass --data (ImageFolder dir, .npz, MNIST idx dir or CIFAR-10 dir), "
                    "or --set train.epochs=0 --set recover.epochs=0 to only remove already-zero channels."
                )
            run.shape = tuple(cfg.data.input_shape) if cfg.data.input_shape else None
            if run.data is not None:
                run.splits = run.task.load_data(
                    run.data, mean=cfg.data.mean, std=cfg.data.std, input_shape=run.shape,
                    augment=cfg.data.augment,
                )  # fmt: skip
                run.shape = run.shape or tuple(run.splits.input_shape)
            run.loaded = ckpt.load_checkpoint(
                run.checkpoint,
                arch=arch,
                num_classes=num_classes,
                in_channels=run.shape[0] if run.shape else None,
                trust_checkpoint=trust_checkpoint,
            )
            run.model = run.task.prepare_model(run.loaded.model)  # detection: DetectionModel
            run.shape = run.shape or _shape_from_metadata(run.loaded.metadata)
            _check_model_runs(run)
        except BaseException:
            outdir.remove_if_empty(run.record.created)  # bad input leaves --out as it was
            raise
    return resume_state


def _check_model_runs(run: Run) -> None:
    if run.shape is None:
        raise BadInputError(
            "Cannot tell the model's input shape without data: pass --input-shape C,H,W (e.g. 3,224,224)."
        )
    run.model.to(run.device).eval()
    # fp16 on the CPU: exit 2, --out untouched
    run.precision = train.resolve_precision(run.recipe.train, run.device, run.model)
    run.example = torch.randn(1, *run.shape, device=run.device)
    try:
        with torch.no_grad():
            logits = run.model(run.example)
    except Exception as exc:
        raise DataError(
            f"The model cannot run on inputs of shape {tuple(run.shape)} (C, H, W): {str(exc).splitlines()[0]}. "
            "Pass the right --input-shape or --set data.input_shape=[C,H,W]."
        ) from exc
    run.model_classes = run.task.num_outputs(run.model, logits)
    if run.splits is not None:
        run.task.check_data(run.splits, run.model, run.model_classes)
        if len(run.splits.train) == 0 or len(run.splits.val) == 0:
            raise DataError(f"The data at {run.data} has an empty train or val split.")


def _open_out(run: Run) -> None:
    """The inputs are good: move the previous run's outputs aside (from here on a failure
    leaves its own report), and make the loaders and the verification inputs."""
    record = run.record
    run.preprocessing = _preprocessing(run.splits, run.recipe.data, run.shape)
    record.preprocessing = run.preprocessing
    record.input = {
        "checkpoint": str(run.checkpoint),
        "arch": run.loaded.arch,
        "task": tasks.task_path(run.task),
        "data": run.data,
        "device": str(run.device),
    }
    if run.is_main:
        record.had_previous = (run.out / outdir.PREVIOUS_DIR).is_dir()
        record.had_state = (run.out / STATE_DIR).exists()
        record.moved = outdir.move_previous_outputs(run.out)
        (run.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    record.opened = True
    samples = run.recipe.export.verify_samples
    if run.splits is not None:
        run.train_loader, run.val_loader = data_mod.make_loaders(
            run.splits, batch_size=run.recipe.train.batch_size, seed=run.seed,
            distributed=run.distributed, num_workers=run.recipe.data.workers,
            pin_memory=run.device.type == "cuda",
        )  # fmt: skip
        record.input.update(augment=run.splits.augment, workers=run.train_loader.num_workers)
        count = min(len(run.splits.val), samples)
        run.verify_inputs = torch.stack([run.splits.val[i][0] for i in range(count)])
    else:
        gen = torch.Generator().manual_seed(run.seed)
        run.verify_inputs = torch.randn(samples, *run.shape, generator=gen)
    tcfg = run.recipe.train
    if run.train_loader is not None:
        run.steps_per_epoch = train.steps_per_epoch(run.train_loader, tcfg.max_steps_per_epoch)
    epochs = train.resolve_epochs(tcfg.epochs, run.steps_per_epoch, tcfg.min_steps)
    run.recipe = replace(run.recipe, train=replace(tcfg, epochs=epochs))
    record.input["epochs"] = epochs  # train.epochs as resolved (auto: from the data's size)


def _measure_baseline(run: Run) -> None:
    """The task's metric (``accuracy``), params, MACs and ONNX size of the input model."""
    model = run.model
    with run.timer.stage("baseline"):
        baseline = {
            "accuracy": _baseline_metric(run) if run.val_loader is not None else None,
            "params": metrics.count_params(model),
            "macs": metrics.count_macs(model, run.example),
        }

        def onnx_bytes() -> int:
            path = run.out / STATE_DIR / "baseline.onnx"
            export.export_onnx(model, run.example.cpu(), path, opset=run.recipe.export.opset)
            return export.onnx_size_bytes(path)

        # every rank needs it: --target-size sets the same budget on each
        baseline["onnx_bytes"] = _on_main_shared(run, onnx_bytes)
        log.info(
            "baseline: %s %s, %d params, %d MACs",
            run.task.metric, baseline["accuracy"], baseline["params"], baseline["macs"],
        )  # fmt: skip
    run.baseline = run.record.baseline = baseline


def _baseline_metric(run: Run) -> float:
    """The input model's validation metric; keeps its per-sample scores when the task has
    them (``run.baseline_scores``: the accuracy seeker pairs its checks with them)."""
    scores = run.task.sample_scores(run.model, run.val_loader, run.device, run.progress)
    if scores is None:
        return run.task.evaluate(run.model, run.val_loader, run.device, run.progress)[0]
    run.baseline_scores = scores
    return metrics.mean_over_ranks(scores)


def _prepare_model(run: Run) -> None:
    """The distillation teacher (the input model, frozen), binarized activations if asked,
    and the coupled channel groups."""
    cfg = run.recipe
    if cfg.distill.weight > 0 and not run.task.distillation:
        why = f"off: task {tasks.task_path(run.task)} has no distillation (distill.weight {cfg.distill.weight:g} ignored)"
        log.info("distillation %s", why)
        run.record.input["distillation"] = why
    elif cfg.distill.weight > 0 and run.train_loader is not None:
        run.teacher = copy.deepcopy(run.model).eval().requires_grad_(False)
    if cfg.activations.binarize:
        from compressor import activations

        act = cfg.activations
        skip = list(act.skip) or _default_activation_skip(run.model, run.example, act)
        run.swap = activations.swap_activations(
            run.model, bits=act.bits, ste=act.ste, skip=skip, functional=act.functional
        )
        run.model = run.swap.model.to(run.device)
        if run.train_loader is not None:  # scale and threshold from data, then a gradual switch
            batches = ((run.task.model_inputs(x), y) for x, y in run.train_loader)
            activations.calibrate(run.model, batches, run.device, act.calibration_batches)
            run.switch = activations.ActivationSwitch(
                run.model, cfg.train.epochs * run.steps_per_epoch, act.switch_fraction,
                order=act.switch_order,
                evaluate=lambda: _sparse_accuracy(run)[0],
                recalibrate=lambda: _recalibrate(run),
            )  # fmt: skip
    with run.timer.stage("groups"):
        keep = [*cfg.prune.keep, *run.task.kept_layers(run.model)]  # detection: its heads' outputs
        run.groups = build_groups(run.model, run.example, keep=keep)
        run.round_to = resolve_round_to(
            cfg.prune.round_to, latency_target=cfg.target.latency is not None
        )
        log.info("%d channel groups, %d channels", len(run.groups), run.groups.total_channels)


def _build_method(run: Run, resume_state: dict | None):
    """The method object (RVSM, penalties, budget, seeker), the optimizer and its schedule,
    restored from ``resume_state`` when resuming. Returns (optimizer, scheduler, the model
    to train: DDP-wrapped under torchrun)."""
    cfg, model = run.recipe, run.model
    total_steps = max(1, cfg.train.epochs * run.steps_per_epoch)
    seek = None
    if run.baseline["accuracy"] is not None and cfg.train.epochs > 0:
        seek = method.SeekHooks(  # the seeker bounds baseline - value of the task's score
            evaluate=lambda: _seek_reading(run),
            baseline_accuracy=run.task.score(run.baseline["accuracy"]),
            snapshot=lambda: _snapshot(run),
            restore=lambda saved, units=None: _rollback(run, saved, units),
        )
    run.sparse = method.build(
        cfg, model, run.groups, total_steps=total_steps, baseline=run.baseline, seek=seek,
        latency=_latency_model(run, resume_state), latency_probe=_latency_probe(run),
        round_to=run.round_to, sensitivity=_sensitivity(run, resume_state),
    )  # fmt: skip
    run.sparse.activation_switch = run.switch
    optimizer = run.optimizer = train.make_optimizer(model, cfg.train)
    scheduler = train.make_scheduler(optimizer, cfg.train.schedule, total_steps)
    train_model = model
    if run.distributed:
        ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        run.sparse.load_state_dict(resume_state["method"])
        run.history = list(resume_state["history"])
        torch.set_rng_state(resume_state["rng"])
        if run.precision.scaler is not None and resume_state.get("scaler") is not None:
            run.precision.scaler.load_state_dict(resume_state["scaler"])  # fp16's loss scale
        loader_rng = getattr(run.train_loader, "generator", None)
        if loader_rng is not None and resume_state.get("loader_rng") is not None:
            loader_rng.set_state(resume_state["loader_rng"])  # the same shuffles as unbroken
        log.info("resumed after epoch %d", resume_state["epoch"])
    run.record.history = run.history
    return optimizer, scheduler, train_model


def _resumed_budget_state(resume_state: dict | None) -> dict:
    """The budget controller's saved state in a resumed run's checkpoint ({} when fresh)."""
    return ((resume_state or {}).get("method") or {}).get("budget") or {}


def _latency_model(run: Run, resume_state: dict | None):
    """``--target-latency``'s latency model: the resumed run's, or calibrated now on this
    machine against the baseline's ONNX model (on rank 0, shared with the others)."""
    tgt = run.recipe.target
    if tgt.latency is None:
        return None
    state = _resumed_budget_state(resume_state).get("latency")
    if state is None:
        with run.timer.stage("latency_model"):
            state = _on_main_shared(
                run,
                lambda: latency_model.calibrate(
                    run.model, run.groups, tuple(run.shape), run.out / STATE_DIR / "baseline.onnx",
                    batch=tgt.latency_batch, threads=run.recipe.export.latency_threads,
                    round_to=run.round_to,
                ).state_dict(),
            )  # fmt: skip
    return latency_model.LatencyModel.from_state(run.groups, state)


def _sensitivity(run: Run, resume_state: dict | None):
    """``target.allocation: sensitivity``'s one-shot sensitivity analysis of the input model
    on training batches: the resumed run's, or measured now (on rank 0, shared)."""
    tgt = run.recipe.target
    budgeted = any(v is not None for v in (tgt.macs, tgt.params, tgt.size, tgt.latency))
    if tgt.allocation != "sensitivity" or run.train_loader is None:
        return None
    if not budgeted and tgt.seek_accuracy_drop is None:  # nothing will set a budget
        return None
    state = _resumed_budget_state(resume_state).get("sensitivity")
    if state is None:
        with run.timer.stage("sensitivity"):

            def measure() -> dict:
                batches = []
                for x, _ in run.train_loader:
                    if len(batches) >= allocation.SENSITIVITY_BATCHES:
                        break
                    batches.append(run.task.model_inputs(x).to(run.device))
                return allocation.measure_sensitivity(run.model, run.groups, batches).state_dict()

            state = _on_main_shared(run, measure)
    return allocation.Sensitivity.from_state(state)


def _latency_probe(run: Run):
    """``--target-latency``'s check of the zero set before it freezes: the compact model it
    leaves, timed beside the baseline's ONNX model now (on rank 0, shared with the others)."""
    tgt = run.recipe.target
    if tgt.latency is None:
        return None

    def probe(zero):
        return _on_main_shared(
            run,
            lambda: latency_model.time_zero_set(
                run.model, run.groups, zero, tuple(run.shape), run.out / STATE_DIR / "baseline.onnx",
                batch=tgt.latency_batch, round_to=run.round_to,
                threads=run.recipe.export.latency_threads,
            ),
        )  # fmt: skip

    return probe


def _on_main_shared(run: Run, compute):
    """``compute()`` on rank 0 only (it writes files or times the machine), its result
    broadcast to every rank under DDP."""
    box = [compute() if run.is_main else None]
    if run.distributed:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _sparsify(run: Run, optimizer, scheduler, train_model) -> None:
    """RVSM fine-tuning, one epoch at a time; after each, the sparse model is evaluated and
    the state saved for --resume."""
    cfg = run.recipe
    run.record.input.update(run.precision.summary())  # train.amp / channels_last as resolved
    for epoch in range(len(run.history), cfg.train.epochs):
        with run.timer.stage("train"):
            if run.distributed:
                run.train_loader.sampler.set_epoch(epoch)
            loss = train.train_one_epoch(
                train_model, run.train_loader, optimizer, scheduler, run.device,
                method=run.sparse, max_steps=cfg.train.max_steps_per_epoch, epoch=epoch,
                teacher=run.teacher, distill=cfg.distill, progress=run.progress,
                kept_epochs=epoch, precision=run.precision, task=run.task,
            )  # fmt: skip
        _check_finite_weights(run, epoch, loss, optimizer)
        with run.timer.stage("evaluate"):
            run.history.append(_epoch_row(run, epoch, loss))
        run.sparse.end_epoch(epoch)
        if run.is_main:
            _save_resume_state(run, epoch + 1, optimizer, scheduler)


def _check_finite_weights(run: Run, epoch: int, loss: float, optimizer) -> None:
    """A run whose weights, sparse copy or outputs went non-finite diverged, whatever its
    mean loss (weights of 1e20 are finite, the logits they give are not)."""
    tensors = [*run.model.parameters(), *run.sparse.rvsm.u.values()]
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        was_training = run.model.training
        run.model.eval()
        with torch.no_grad(), run.sparse.sparse_weights():
            logits = run.model(run.verify_inputs[:8].to(run.device))
        run.model.train(was_training)
        if bool(torch.isfinite(logits).all()):
            return
    raise DivergenceError(
        train.divergence_message(
            loss,
            where=f"epoch {epoch + 1}, after its last step (the model's outputs became non-finite)",
            first=epoch == 0,
            optimizer=optimizer,
            lr_key="train.lr",
            kept_epochs=epoch,
            penalised=True,
        )  # fmt: skip
    )


def _epoch_row(run: Run, epoch: int, loss: float) -> dict:
    """The sparse model after an epoch: accuracy, sparsity, reduction, and the method's state."""
    model, groups, sparse = run.model, run.groups, run.sparse
    with sparse.sparse_weights():
        _recalibrate(run)
        acc = run.task.evaluate(model, run.val_loader, run.device, run.progress)[0]
        tensors = dict(model.named_parameters())
        kept, total = metrics.channels_kept(groups, tensors)
        macs_now, params_now = groups.estimate_cost(groups.zero_masks(tensors))
        w_sparsity = metrics.weight_sparsity(model)
    budget = sparse.budget
    row = {
        "epoch": epoch + 1,
        "loss": loss,
        "accuracy": acc,
        "weight_sparsity": w_sparsity,
        "channel_sparsity": 1 - kept / max(total, 1),
        "beta": sparse.rvsm.beta,
        "w_minus_u": sparse.gap(),
        "group_threshold": budget.tau if budget is not None else None,
        "macs_x": groups.total_macs / max(macs_now, 1.0),
        "params_x": groups.total_params / max(params_now, 1.0),
    }
    log.info(
        "epoch %d/%d: loss %.4f, sparse %s %.4g, %.2fx MACs, %.1f%% channels zero",
        epoch + 1, run.recipe.train.epochs, loss, run.task.metric, acc, row["macs_x"], 100 * row["channel_sparsity"],
    )  # fmt: skip
    return row


def _fingerprint(run: Run) -> str:
    """What a ``--resume`` state must match (:func:`compressor.outdir.fingerprint`)."""
    return outdir.fingerprint(
        run.checkpoint, run.resolved, run.data, run.seed, task=tasks.task_path(run.task)
    )


def _save_resume_state(run: Run, epoch: int, optimizer, scheduler) -> None:
    loader_rng = getattr(run.train_loader, "generator", None)  # None under DDP
    state = {
        "fingerprint": _fingerprint(run),
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "method": run.sparse.state_dict(),
        "history": run.history,
        "rng": torch.get_rng_state(),
        "loader_rng": loader_rng.get_state() if loader_rng is not None else None,
        "scaler": scaler.state_dict() if (scaler := run.precision.scaler) is not None else None,
    }
    with atomic_output(run.state_path) as tmp:
        torch.save(state, tmp)


def _prune(run: Run) -> bool:
    """``w := u``, BatchNorm recalibration, then removal of the zero channels, checked to
    change nothing; False when the check fails (exit 4)."""
    model = run.model
    with run.timer.stage("prune"):
        run.sparse.finalize()
        if run.train_loader is not None:
            _recalibrate(run)
        run.verification = run.record.verification = {
            "onnx_checker": False,
            "samples": len(run.verify_inputs),
            "notes": [],
            "sparse_accuracy": run.task.evaluate(model, run.val_loader, run.device, run.progress)[0]
            if run.val_loader is not None
            else None,
            "sparse_weight_sparsity": metrics.weight_sparsity(model),
        }
        try:
            run.pruned = prune_zero_channels(
                model, run.groups, run.verify_inputs.to(run.device),
                round_to=run.round_to,
            )  # fmt: skip
        except VerificationError as exc:
            run.verification["notes"].append(str(exc))
            run.verification["error"] = str(exc)
            return False
        run.verification["sparse_vs_pruned_max_abs"] = run.pruned.max_abs_diff
        run.verification["sparse_vs_pruned_relative"] = run.pruned.relative_diff
    return True


def _recover(run: Run) -> None:
    """Optional masked fine-tune of the compact model (``recover.epochs``)."""
    rec, model = run.recipe.recover, run.model
    if rec.epochs <= 0:
        return
    with run.timer.stage("recover"):
        masks = train.nonzero_masks(model)
        opt = train.make_optimizer(model, run.recipe.train, lr=rec.lr)
        sched = train.make_scheduler(
            opt, run.recipe.train.schedule, rec.epochs * run.steps_per_epoch
        )
        rec_model = nn.parallel.DistributedDataParallel(model) if run.distributed else model
        for epoch in range(rec.epochs):
            train.train_one_epoch(
                rec_model, run.train_loader, opt, sched, run.device, masks=masks,
                max_steps=run.recipe.train.max_steps_per_epoch, epoch=epoch, teacher=run.teacher,
                distill=run.recipe.distill, progress=run.progress, kept_epochs=run.recipe.train.epochs,
                lr_key="recover.lr", precision=run.precision, task=run.task,
            )  # fmt: skip


def _verification_failed(run: Run) -> dict:
    """Pruning changed the model: no model is written, only the report and the recipe."""
    return write_failed_report(
        run.record, error=run.verification.get("error", ""), exit_code=EXIT_VERIFICATION_FAILED
    )


def _export_and_report(run: Run) -> dict:
    """Export, verify in onnxruntime, save the compact model, and write the report."""
    model = run.model.eval()
    accuracy = (
        run.task.evaluate(model, run.val_loader, run.device, run.progress)[0]
        if run.val_loader is not None
        else None
    )
    report = {"exit_code": EXIT_OK}
    if run.is_main:
        latency = _export_and_verify(run)
        int8 = _quantize_int8(run)
        report = _assemble_report(run, _compressed_summary(run, accuracy), latency, int8)
        if report["exit_code"] == EXIT_VERIFICATION_FAILED:
            _unship(run, report)
        with run.timer.stage("report"):
            atomic_write_text(run.out / "recipe.yaml", recipe_mod.dump_recipe(run.resolved))
            report["timings_s"] = {k: round(v, 3) for k, v in run.timer.seconds.items()}
            report_mod.write_report(report, run.out)
        shutil.rmtree(run.out / STATE_DIR, ignore_errors=True)
    if run.distributed:
        torch.distributed.barrier()
    return report


def _export_and_verify(run: Run) -> dict:
    """``model.onnx`` (checked, compared with PyTorch in onnxruntime), ``model.safetensors``;
    returns the report's ``latency_ms``: the latency measured side by side with the baseline
    and both models' onnxruntime profile per kind of op."""
    model, out, verification = run.model, run.out, run.verification
    onnx_path = out / "model.onnx"
    with run.timer.stage("export"):
        export.export_onnx(model, run.example.cpu(), onnx_path, opset=run.recipe.export.opset)
    with run.timer.stage("verify"):
        try:
            export.check_onnx(onnx_path)
            verification["onnx_checker"] = True
        except VerificationError as exc:
            verification["notes"].append(str(exc))
        ort = export.verify_onnx(model.cpu(), onnx_path, run.verify_inputs)
        model.to(run.device)
        verification["torch_vs_onnxruntime_max_abs"] = ort["torch_vs_onnxruntime_max_abs"]
        verification["torch_vs_onnxruntime_relative"] = ort.get("relative_max_abs")
        verification["top1_agreement"] = ort["top1_agreement"]
        paths = {"baseline": out / STATE_DIR / "baseline.onnx", "compressed": onnx_path}
        batches = sorted({1, run.recipe.target.latency_batch})
        threads = run.recipe.export.latency_threads
        medians = export.measure_latency(
            paths, tuple(run.shape), batch_sizes=batches, threads=threads
        )
        profiles = {
            k: export.op_profile(path, run.shape, batch=1, threads=threads)
            for k, path in paths.items()
        }
        latency = report_mod.latency_section(medians, op_profiles=profiles)
    with run.timer.stage("save"):
        ckpt.save_compact(
            model.cpu(),
            out / "model.safetensors",
            arch=run.loaded.arch,
            build_kwargs=_build_kwargs(run.loaded, run.model_classes, run.shape),
            activations=run.swap,
            extra={"input_shape": list(run.shape)},
            preprocessing=run.preprocessing,
        )
        model.to(run.device)
    return latency


def _quantize_int8(run: Run) -> dict | None:
    """``model.int8.onnx`` (``export.int8``: static or dynamic), quantized from ``model.onnx``
    in onnxruntime, checked, compared with it on the validation split and timed beside it;
    left out (and, with ``export.int8_required``, a failed gate) when it fails the accuracy
    gate. None when ``export.int8`` is off."""
    cfg = run.recipe.export
    if cfg.int8 == "off":
        return None
    path = run.out / outdir.INT8_FILE
    info = {"mode": cfg.int8, "required": cfg.int8_required, "file": None, "error": None}
    with run.timer.stage("int8"):
        if cfg.int8 == "static" and run.splits is None:
            info["error"] = (
                "static INT8 needs --data to calibrate on (without data: --int8 dynamic)"
            )
        else:
            try:
                info.update(_measure_int8(run, run.out / "model.onnx", path))
            except Exception as exc:  # the float model still ships
                log.warning(
                    "INT8 quantization failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG)
                )
                info["error"] = f"quantization failed: {type(exc).__name__}: {exc}"[:500]
        info["gate"] = report_mod.int8_gate(
            info, run.baseline.get("accuracy"), run.recipe.gates.max_accuracy_drop
        )
        info["passed"] = info["gate"]["passed"]
    if info["passed"]:
        info["file"] = outdir.INT8_FILE
    else:
        path.unlink(missing_ok=True)
        log.warning("%s left out: %s", outdir.INT8_FILE, info["gate"]["detail"])
    return info


def _measure_int8(run: Run, onnx_path: Path, int8_path: Path) -> dict:
    """Quantize, then the checker, accuracy and agreement against the float ONNX model (the
    validation split; the verification inputs without data), size and latency at batch 16.
    The accuracy is top-1, or the task's own metric (:meth:`Task.evaluate_onnx`: detection's
    mAP) where top-1 is not the metric."""
    calibration = None
    if run.recipe.export.int8 == "static":
        # training images as the deployed model sees them: no augmentation
        train = data_mod.unaugmented_train(run.splits)
        subset = data_mod.subset(train, INT8_CALIBRATION_SAMPLES, run.seed)
        calibration = torch.stack([x for x, _ in subset])
    made = export.quantize_int8(onnx_path, int8_path, mode=run.recipe.export.int8,
                                calibration=calibration)  # fmt: skip
    try:
        export.check_onnx(int8_path)
        checker = True
    except VerificationError as exc:
        checker, made["error"] = False, str(exc)
    val = None
    if run.splits is not None:
        val = torch.utils.data.DataLoader(
            run.splits.val, batch_size=64, collate_fn=run.splits.collate
        )
    compared = export.compare_onnx(onnx_path, int8_path, _int8_inputs(run, val))
    if val is not None and not run.task.top1_labels:  # the task's metric, where it can judge
        int8_metric = run.task.evaluate_onnx(run.model, int8_path, val)
        if int8_metric is not None:
            compared["accuracy"] = int8_metric
            compared["reference_accuracy"] = run.task.evaluate_onnx(run.model, onnx_path, val)
    latency = export.measure_latency(
        {"float": onnx_path, "int8": int8_path}, tuple(run.shape), batch_sizes=(16,),
        threads=run.recipe.export.latency_threads,
    )  # fmt: skip
    float_bytes, int8_bytes = export.onnx_size_bytes(onnx_path), export.onnx_size_bytes(int8_path)
    return {
        **made, "onnx_checker": checker, "onnx_bytes": int8_bytes, "float_onnx_bytes": float_bytes,
        "size_x": float_bytes / max(int8_bytes, 1),
        "weights_size_x": export.onnx_weight_bytes(onnx_path)
        / max(export.onnx_weight_bytes(int8_path), 1),
        "accuracy": compared["accuracy"],
        "float_accuracy": compared["reference_accuracy"],
        # argmax agreement means something only for class scores
        "top1_agreement": compared["top1_agreement"] if run.task.top1_labels else None,
        "output_relative_error": compared["output_relative_error"],
        "samples": compared["samples"],
        "latency_ms": report_mod.int8_latency(latency),
    }  # fmt: skip


def _int8_inputs(run: Run, val):
    """What the INT8 model is compared with the float one on: the validation split (labels
    and all where top-1 is the metric, else the task's model inputs), or without data the
    verification inputs."""
    if val is None:
        return run.verify_inputs
    if run.task.top1_labels:
        return val
    return (run.task.model_inputs(x) for x, _ in val)


def _compressed_summary(run: Run, accuracy) -> dict:
    model, pruned = run.model, run.pruned
    return {
        "accuracy": accuracy,
        "sparse_accuracy": run.verification.pop("sparse_accuracy"),
        "params": metrics.count_params(model),
        "macs": metrics.count_macs(model, run.example),
        "onnx_bytes": export.onnx_size_bytes(run.out / "model.onnx"),
        # the shipped model's zero weights (conv/linear: ONNX Conv/Gemm/MatMul initializers)
        "weight_sparsity": metrics.weight_sparsity(model),
        # the sparse model's, before its zero channels were removed
        "sparse_model_weight_sparsity": run.verification.pop("sparse_weight_sparsity"),
        "channels_kept": sum(pruned.kept.values()),
        "channels_total": sum(pruned.kept.values()) + pruned.channels_removed,
    }


def _unship(run: Run, report: dict) -> None:
    """The exported model disagrees with the sparse one: its files are not shipped."""
    for name in outdir.MODEL_FILES:
        (run.out / name).unlink(missing_ok=True)
    if report.get("int8"):
        report["int8"]["file"] = None
    v = run.verification
    report["outputs"] = ["recipe.yaml"]
    report["error"] = "; ".join(v["notes"]) or (
        "the ONNX model disagrees with PyTorch: top-1 agreement "
        f"{v.get('top1_agreement', 0):.1%} on {len(run.verify_inputs)} samples, "
        f"max abs difference {v.get('torch_vs_onnxruntime_max_abs') or 0:.3g}"
    )


# ---------------------------------------------------------------------------- the report


def _assemble_report(run: Run, compressed: dict, latency: dict, int8: dict | None) -> dict:
    model, pruned, baseline = run.model, run.pruned, run.baseline
    target = _target_summary(run.sparse, compressed, baseline, latency)
    sparsity = {row["name"]: row["sparsity"] for row in metrics.layer_sparsity(model)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report = {
        "schema": 1,
        "tool": {"name": "compressor", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": run.command,
        "recipe": run.resolved,
        "input": run.record.input,
        "metric": run.task.summary(),  # what baseline/compressed "accuracy" hold
        "baseline": baseline,
        "compressed": compressed,
        "channel_groups": [  # the units of channels_kept / channels_total, in model order
            {"root": root, "before": kept + len(pruned.removed.get(root, [])), "after": kept}
            for root, kept in sorted(pruned.kept.items(), key=lambda kv: order.get(kv[0], 0))
        ],
        "layers_left_whole": [  # conv/linear layers no group thins, and why (model order)
            {"layer": layer, "reason": why}
            for layer, why in sorted(
                (run.groups.excluded if run.groups else {}).items(),
                key=lambda kv: order.get(kv[0], 0),
            )
        ],
        "preprocessing": run.preprocessing,
        "reduction": {
            "macs_x": baseline["macs"] / max(compressed["macs"], 1),
            "params_x": baseline["params"] / max(compressed["params"], 1),
            "size_x": baseline["onnx_bytes"] / max(compressed["onnx_bytes"], 1),
        },
        "verification": _with_contents(run.verification, run.task.export_contents()),
        "latency_ms": latency,
        "layers": [
            {
                "name": name,
                "type": type(model.get_submodule(name)).__name__,
                "shape_before": info["shape_before"],
                "shape_after": info["shape_after"],
                "sparsity": sparsity.get(name),
            }
            for name, info in pruned.layers.items()
        ],
        "epochs": run.history,
        "method": run.sparse.summary(),
        "target": target,
        "activations": run.activations_info,
        "int8": int8,
        "outputs": [*OUTPUT_FILES, *([int8["file"]] if int8 and int8["file"] else [])],
    }
    report["gates"] = report_mod.evaluate_gates(
        report,
        max_accuracy_drop=run.recipe.gates.max_accuracy_drop,
        # seeking has no asked factor: only the accuracy gate applies
        target=target if target and target["asked"] is not None else {},
    )
    report["gates"] += [int8["gate"]] if int8 and int8["required"] else []  # else: no exit 3
    report["exit_code"] = _exit_code(report, run.verification, run.swap is not None)
    return report


def _with_contents(verification: dict, contents: str | None) -> dict:
    """``verification`` with ``onnx_contents`` when the task exports part of the model
    (detection: the raw head, without box decoding and NMS), so that no one reads its ONNX
    check as one of the whole detector."""
    return verification if contents is None else {**verification, "onnx_contents": contents}


def _exit_code(report: dict, verification: dict, binary: bool) -> int:
    """4 when the exported model disagrees with PyTorch, 3 when a gate failed, else 0."""
    ort_ok = verification.get("top1_agreement", 0) >= 1.0 or binary
    if not verification["onnx_checker"] or not ort_ok:
        return EXIT_VERIFICATION_FAILED
    if not binary and (verification.get("torch_vs_onnxruntime_relative") or 0) > 1e-3:
        verification["notes"].append(
            "onnxruntime outputs differ from PyTorch by more than 1e-3 of the output scale"
        )
        return EXIT_VERIFICATION_FAILED
    if binary and verification.get("top1_agreement", 0) < 1.0:
        verification["notes"].append(
            "binary activations: some units sit within float rounding of 0 and flip between PyTorch and "
            "onnxruntime; top-1 agreement below 100% is reported, not hidden"
        )
    if not all(g["passed"] for g in report["gates"]):
        return EXIT_GATE_FAILED
    return EXIT_OK


def _target_summary(
    sparse: method.SparseTraining, compressed: dict, baseline: dict, latency: dict | None = None
) -> dict | None:
    """Every target given (asked, reached on the compact model, met), or the seeker's stages.

    A latency target is judged on the latencies measured side by side after export
    (``latency``): asked and reached are speedups over the baseline measured then, so
    it is met when the compact model takes at most the asked ms (within the slack)."""
    budget = sparse.budget
    if budget is None:
        return None
    common = {"group_weighting": sparse.weighting, "group_term": sparse.term.name}
    most = budget.floor_factors()
    if sparse.seeker is not None:
        return {
            "kind": "seek_macs", "asked": None, "within": True,
            "reached": baseline["macs"] / max(compressed["macs"], 1),
            "max_reachable": most["macs"],
            "stages": sparse.seeker.log,  # each check: step, MACs x, sparse accuracy
            **common,
        }  # fmt: skip
    measured = {"macs": "macs", "params": "params", "size": "onnx_bytes"}
    entries = []
    for t in budget.targets:
        extra = {}
        if t.kind == "latency":
            key = f"batch_{budget.latency.batch}"
            base_ms, reached_ms = latency["baseline"][key], latency["compressed"][key]
            asked, reached = base_ms / t.asked, base_ms / max(reached_ms, 1e-9)
            extra = {
                "asked_ms": t.asked, "reached_ms": reached_ms, "baseline_ms": base_ms,
                "batch": budget.latency.batch, "model": budget.latency.summary(),
                "predicted_ms": None if budget.zero is None else budget.latency.predict(budget.zero),
            }  # fmt: skip
        else:
            asked = t.factor
            reached = baseline[measured[t.kind]] / max(compressed[measured[t.kind]], 1)
        met = report_mod.target_summary(t.kind, asked, reached)["within"]
        entries.append(
            {"kind": t.kind, "asked": asked, "reached": reached, "met": met,
             "max_reachable": most[t.cost], **extra}
        )  # fmt: skip
    first = entries[0]
    return {
        "kind": first["kind"], "asked": first["asked"], "reached": first["reached"],
        "within": all(e["met"] for e in entries), "reachable": not budget.unreachable,
        "max_reachable": first["max_reachable"], "targets": entries, **common,
    }  # fmt: skip


# ---------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(
            "--device cuda was asked but no CUDA device is available. Use --device cpu or auto."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BadInputError(f"--device must be auto, cpu or cuda[:N]. Got {device!r} instead.")
    return torch.device(device)


def _distributed() -> tuple[bool, int, int]:
    """(enabled, rank, world size) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return True, torch.distributed.get_rank(), world


def _parse_shape(shape) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if isinstance(shape, str):
        try:
            shape = [int(v) for v in shape.replace("x", ",").split(",") if v.strip()]
        except ValueError as exc:
            raise BadInputError(
                f"--input-shape must look like C,H,W (e.g. 3,32,32). Got {shape!r} instead."
            ) from exc
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise BadInputError(
            f"--input-shape must be three positive ints C,H,W. Got {shape} instead."
        )
    return shape


def parse_factor(value, flag: str) -> float | None:
    """``4``, ``4x`` or ``4.5X`` -> 4.0; must be > 1."""
    if value is None:
        return None
    text = str(value).strip().lower().rstrip("x")
    try:
        factor = float(text)
    except ValueError as exc:
        raise BadInputError(
            f"{flag} must be a reduction factor like 4 or 4x. Got {value!r} instead."
        ) from exc
    if not factor > 1:
        raise BadInputError(
            f"{flag} must be a reduction factor > 1 (e.g. 4 for 4x fewer). Got {value!r} instead."
        )
    return factor


def _default_activation_skip(model: nn.Module, x: torch.Tensor, act) -> list[str]:
    """The first activation executed (first conv block) and the last one (feeds the classifier).

    Swaps every activation on a copy (functional ``F.relu`` calls included, which
    get names like ``act_fx_0``) and records the order in which they run.
    """
    from compressor import activations

    probe = activations.swap_activations(
        copy.deepcopy(model), bits=act.bits, ste=act.ste, skip=[], functional=act.functional
    ).model
    swapped = (activations.BinaryActivation, activations.QuantizedActivation)
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
        for n, m in probe.named_modules()
        if isinstance(m, swapped)
    ]
    try:
        with torch.no_grad():
            probe.eval()
            probe(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted({order[0], order[-1]}) if order else []


def _shape_from_metadata(metadata: dict | None):
    if not metadata:
        return None
    shape = (metadata.get("extra") or {}).get("input_shape")
    return tuple(shape) if shape else None


def _build_kwargs(loaded, num_classes: int, shape) -> dict:
    kwargs = dict((loaded.metadata or {}).get("build_kwargs") or {})
    kwargs.setdefault("num_classes", num_classes)
    if loaded.arch in BUILTIN_MODELS:
        kwargs.setdefault("in_channels", shape[0])
    return kwargs


def _recalibrate(run: Run) -> None:
    """Re-estimate BatchNorm statistics on training batches (``train.bn_recalibration_batches``)."""
    train.recalibrate_bn(
        run.model, run.train_loader, run.device, run.recipe.train.bn_recalibration_batches,
        task=run.task,
    )  # fmt: skip


def _snapshot(run: Run) -> dict:
    """What the accuracy seeker's rollback puts back: the model's state and the optimizer's
    per-parameter state (momentum, Adam's moments), which would otherwise go on pushing the
    weights the way the failed attempt went."""
    return {
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer": train.optimizer_state_by_name(run.optimizer, run.model),
    }


@torch.no_grad()
def _rollback(run: Run, saved: dict, units: list[torch.Tensor] | None) -> None:
    """Put the model and the optimizer's state back to the seeker's ``saved`` snapshot: all
    of it (``units`` None), or only the slices of the channel groups' ``units``
    (``target.seek_rollback: channels``; an optimizer buffer the snapshot lacked is zeroed
    there)."""
    if units is None:
        run.model.load_state_dict(saved["model"])
        train.load_optimizer_state_by_name(run.optimizer, run.model, saved["optimizer"])
        return
    params = dict(run.model.named_parameters())
    run.groups.copy_units_(params, saved["model"], units)
    if run.optimizer is None:
        return
    for kind, buffers in _row_buffers(run.optimizer, params).items():
        before = {}
        for name, now in buffers.items():
            then = saved["optimizer"].get(name, {}).get(kind)
            before[name] = torch.zeros_like(now) if then is None else then
        run.groups.copy_units_(buffers, before, units, skip_missing=True)


def _row_buffers(optimizer, params: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's buffers shaped like their parameters (SGD's ``momentum_buffer``,
    Adam's ``exp_avg`` and ``exp_avg_sq``), by kind, then by parameter name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in params.items():
        for kind, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                out.setdefault(kind, {})[name] = value
    return out


def _sparse_accuracy(run: Run) -> tuple[float, float]:
    """The task's validation metric of the sparse model ``u`` after BatchNorm recalibration,
    and the standard error of its drop from the input model, paired per sample (0 when the
    task has no per-sample scores); restores ``w`` and the BatchNorm statistics."""
    model = run.model
    with run.sparse.sparse_weights():
        saved = {
            k: v.clone()
            for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k
        }
        _recalibrate(run)
        scores = None
        if run.baseline_scores is not None:
            scores = run.task.sample_scores(model, run.val_loader, run.device)
        if scores is None:
            acc, stderr = run.task.evaluate(model, run.val_loader, run.device)[0], 0.0
        else:
            acc, stderr = metrics.paired_mean_and_stderr(scores, run.baseline_scores)
        model.load_state_dict(saved, strict=False)
    model.train()
    return acc, stderr


def _seek_reading(run: Run) -> method.Reading:
    """What the accuracy seeker reads at a check: the sparse model's score (the task's metric,
    higher is better) and the standard error of its drop."""
    acc, stderr = _sparse_accuracy(run)
    return method.Reading(run.task.score(acc), stderr)


def _preprocessing(splits, data_cfg, shape) -> dict | None:
    """The input the exported model expects: ``x = (stored * scale - mean) / std`` per channel
    on float32 NCHW input of ``input_shape``; None without data (how its inputs were scaled
    is then unknown)."""
    if splits is None or shape is None:
        return None
    channels = int(shape[0])
    mean, std = data_cfg.mean, data_cfg.std
    return {
        "scale": float(getattr(splits, "scale", 1 / 255)),
        "mean": [float(v) for v in mean] if mean is not None else [0.0] * channels,
        "std": [float(v) for v in std] if std is not None else [1.0] * channels,
        "input_shape": [int(v) for v in shape],
    }


__all__ = ["compress", "CompressorError", "Run"]
