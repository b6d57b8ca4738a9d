"""The one place that knows the order of the stages (docs/design.md, "The pipeline").

checkpoint -> load -> baseline eval -> groups -> sparsify (RVSM) -> w := u, BN
recalibration -> prune zero groups (exact) -> recover -> export ONNX -> verify in
onnxruntime -> report + gates.

``compress(...)`` is the public API; the CLI only parses arguments into it.
Every stage is a call into the module that owns that job.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import __version__, export, metrics, train
from compressor import checkpoint as ckpt
from compressor import data as data_mod
from compressor import recipe as recipe_mod
from compressor import report as report_mod
from compressor.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_OTHER,
    EXIT_VERIFICATION_FAILED,
    BadInputError,
    CompressorError,
    DataError,
    OutputError,
    VerificationError,
)
from compressor.fileio import atomic_output, atomic_write_text
from compressor.groups import build_groups
from compressor.models import BUILTIN_MODELS
from compressor.progress import SILENT, Progress
from compressor.prune import prune_zero_channels
from compressor.splitting import RVSM
from compressor.strength import (
    MIN_KEEP_FRACTION,
    Strength,
    Target,
    TargetController,
    coupling_budget,
    resolve_group_weighting,
)

log = logging.getLogger(__name__)

STATE_DIR = ".compressor-state"
OUTPUT_FILES = ("model.onnx", "model.safetensors", "report.json", "report.md", "recipe.yaml")
MODEL_FILES = ("model.onnx", "model.safetensors")
# Every file a run may write into --out (the plots too); a new run moves them into
# ``--out/previous/`` before it writes anything, so --out only ever describes one run.
KNOWN_OUTPUTS = (*OUTPUT_FILES, report_mod.CHANNELS_PNG, report_mod.TRAINING_PNG)
PREVIOUS_DIR = "previous"
# The accuracy seeker's stages span at least this share of training: each stage needs
# steps for the network to adapt before its accuracy check (spread over 30%, the first
# stage of the bundled example got 4 steps, failed its check and froze at 1.00x).
SEEK_MIN_FRACTION = 0.6


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


def _prepare_out(out: Path, checkpoint: Path) -> Path | None:
    """Create ``out`` if needed and check it can be written; returns the topmost folder it
    created (None when ``out`` existed), so that a failed run can remove it again."""
    src = checkpoint.resolve()
    for name in KNOWN_OUTPUTS:
        for path in (out / name, out / PREVIOUS_DIR / name):
            if path.resolve() == src:
                raise OutputError(
                    f"The checkpoint {checkpoint} would be overwritten by the output {path} "
                    f"(a run moves the previous run's outputs into {out / PREVIOUS_DIR}). "
                    "Pass a different --out, or copy the checkpoint elsewhere first."
                )
    previous = out / PREVIOUS_DIR
    if previous.exists() and not previous.is_dir():
        raise OutputError(
            f"{previous} is a file, but a run moves the previous run's outputs into that "
            "folder. Move that file away or pass a different --out."
        )
    created = None
    top = out.absolute()
    while not top.exists() and top.parent != top:
        created, top = top, top.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_if_empty(created)
        raise OutputError(
            f"Cannot write to the output directory {out}: {exc.strerror or exc}. "
            "Pass --out with a writable directory."
        ) from exc
    return created


def _move_previous_outputs(out: Path) -> list[str]:
    """Move the outputs of an earlier run in ``out`` into ``out/previous/``; returns their names.

    Only the files a run writes (``KNOWN_OUTPUTS``) move; the user's other files stay
    where they are. The copies of the run before that in ``previous/`` are replaced (all of
    them, so ``previous/`` describes exactly one run); anything else there is left alone.
    The resume state (``STATE_DIR``) is not an output and never moves.
    """
    found = [name for name in KNOWN_OUTPUTS if (out / name).is_file()]
    if not found:
        return []
    previous = out / PREVIOUS_DIR
    try:
        previous.mkdir(exist_ok=True)
        for name in KNOWN_OUTPUTS:
            if (previous / name).is_file():
                (previous / name).unlink()
        for name in found:
            os.replace(out / name, previous / name)
    except OSError as exc:
        raise OutputError(
            f"Cannot move the previous run's outputs in {out} into {previous}: "
            f"{exc.strerror or exc}. Check the folder's permissions, or pass another --out."
        ) from exc
    log.info("moved the previous run's outputs (%s) into %s", ", ".join(found), previous)
    return found


def _restore_out(run: dict) -> None:
    """Put --out back as it was before this run (bad input leaves --out as it was): this
    run's outputs and resume state go, the previous run's outputs come back."""
    out = run["out"]
    try:
        for name in KNOWN_OUTPUTS:
            (out / name).unlink(missing_ok=True)  # written by this run: the old ones moved
        for name in run.get("moved") or []:
            os.replace(out / PREVIOUS_DIR / name, out / name)
        if not run.get("had_state"):
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        previous = out / PREVIOUS_DIR
        if not run.get("had_previous") and previous.is_dir() and not any(previous.iterdir()):
            previous.rmdir()
        _remove_if_empty(run.get("created"))
    except OSError:
        log.warning("could not put %s back as it was", out, exc_info=True)


def _remove_if_empty(created: Path | None) -> None:
    """Remove a folder this run created when nothing was written into it."""
    if created is None or not created.is_dir():
        return
    if any(not p.is_dir() for p in created.rglob("*")):
        return
    shutil.rmtree(created, ignore_errors=True)


def _read_resume_state(state_path: Path, fingerprint: str, out: Path) -> dict:
    """The saved state of an interrupted run in ``out``, checked to belong to this run.

    Read on the CPU (the RNG state must be a CPU tensor; masks are used on the CPU).
    """
    if not state_path.exists():
        raise BadInputError(
            f"--resume: no interrupted run in {out} (no {state_path}). Run without --resume."
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInputError(
            f"--resume: cannot read {state_path} ({type(exc).__name__}: {exc}). "
            "Run without --resume to start over."
        ) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise BadInputError(
            f"--resume: the run in {out} used another checkpoint, recipe, data or seed. "
            "Resume with the same arguments, or run without --resume into a new --out."
        )
    return state


def _fingerprint(checkpoint: Path, recipe: dict, data: str | None, seed: int) -> str:
    st = checkpoint.stat()
    blob = json.dumps(
        [str(checkpoint.resolve()), st.st_size, recipe, data, seed], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _default_activation_skip(model: nn.Module, x: torch.Tensor, bits: int, ste: str) -> list[str]:
    """The first activation executed (first conv block) and the last one (feeds the classifier).

    Swaps every activation on a copy (functional ``F.relu`` calls included, which
    get names like ``act_fx_0``) and records the order in which they run.
    """
    from compressor import activations

    probe = activations.swap_activations(copy.deepcopy(model), bits=bits, ste=ste, skip=[]).model
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
    if not order:
        return []
    return sorted({order[0], order[-1]})


def _apply_cli_to_recipe(
    recipe: dict, *, mean, std, input_shape, max_accuracy_drop, targets
) -> dict:
    recipe = copy.deepcopy(recipe)
    if mean is not None:
        recipe["data"]["mean"] = list(mean)
    if std is not None:
        recipe["data"]["std"] = list(std)
    if input_shape is not None:
        recipe["data"]["input_shape"] = list(input_shape)
    if max_accuracy_drop is not None:  # the gate, and (without a target) the seeker's budget
        recipe["gates"]["max_accuracy_drop"] = float(max_accuracy_drop)
        recipe["target"]["seek_accuracy_drop"] = float(max_accuracy_drop)
    for key, value in targets.items():
        if value is not None:
            recipe["target"][key] = value
    return recipe_mod.validate_recipe(recipe, source="command line")


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


_RUN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("compressor_run", default=None)


def _reports_failure(fn):
    """Wrap ``compress``: a run that fails once it has moved the previous outputs aside (a
    diverged or interrupted run, an exception) writes a report saying FAIL, its exit code and
    the error into --out, without model files; bad input found that late (exit 2, e.g. an
    unreachable target) puts --out back as it was instead, as bad input found earlier does.
    The exception goes on to the caller (the CLI maps it to the exit code)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        run: dict = {}
        token = _RUN.set(run)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if run.get("is_main"):
                _report_exception(run, exc)
            raise
        finally:
            _RUN.reset(token)

    return wrapper


def _report_exception(run: dict, exc: BaseException) -> None:
    out = run["out"]
    history = run.get("history") or []
    if isinstance(exc, KeyboardInterrupt):
        code = EXIT_OTHER
        error = (
            f"interrupted after {len(history)} completed epoch(s); rerun the same command with "
            "--resume to continue from there"
            if history
            else "interrupted before the first epoch completed; rerun the same command"
        )
    elif isinstance(exc, CompressorError):
        code, error = exc.exit_code, str(exc)
    else:
        code, error = EXIT_OTHER, f"internal error: {type(exc).__name__}: {exc}"
    if code == EXIT_BAD_INPUT:  # found late (e.g. an unreachable target): as if found early
        _restore_out(run)
        return
    try:
        for name in MODEL_FILES:  # this run's, unverified or of a failed run: not to be shipped
            (out / name).unlink(missing_ok=True)
        _write_failed_report(
            out,
            run["resolved"],
            run["command"],
            run["input"],
            baseline=run.get("baseline"),
            verification=run.get("verification"),
            history=history,
            timer=run["timer"],
            preprocessing=run.get("preprocessing"),
            error=error,
            exit_code=code,
        )
    except Exception:  # the original error matters more than its report
        log.warning("could not write the failure report into %s", out, exc_info=True)


@_reports_failure
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
    trust_checkpoint: bool = False,
    resume: bool = False,
    command: list[str] | None = None,
    progress: Progress = SILENT,
) -> dict:
    """Compress ``checkpoint`` and write the outputs to ``out``; returns the report (a dict).

    The report's ``exit_code`` is 0 (success), 3 (a gate failed; outputs still
    written) or 4 (verification failed). Bad input raises a ``CompressorError``
    subclass with exit code 2 that names the problem and the fix. ``progress``
    shows the training and evaluation steps as they run (silent by default).
    """
    timer = _Timer()
    checkpoint = Path(checkpoint)
    out = Path(out)
    distributed, rank, world = _distributed()
    is_main = rank == 0
    dev = _resolve_device(device)
    if distributed and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)

    with timer.stage("load"):
        resolved = recipe_mod.load_recipe(recipe, overrides)
        resolved = _apply_cli_to_recipe(
            resolved,
            mean=mean,
            std=std,
            input_shape=_parse_shape(input_shape),
            max_accuracy_drop=max_accuracy_drop,
            targets={
                "macs": parse_factor(target_macs, "--target-macs"),
                "params": parse_factor(target_params, "--target-params"),
                "size": target_size,
            },
        )
        if not checkpoint.exists():
            raise BadInputError(
                f"Checkpoint {checkpoint} does not exist. Pass the path of a .pt/.pth/.safetensors file."
            )
        created = _prepare_out(out, checkpoint) if is_main else None
        try:
            state_path = out / STATE_DIR / "state.pt"
            fingerprint = _fingerprint(checkpoint, resolved, data, seed)
            resume_state = _read_resume_state(state_path, fingerprint, out) if resume else None
            _seed_everything(seed)
            tcfg, dcfg = resolved["train"], resolved["data"]
            needs_data = tcfg["epochs"] > 0 or resolved["recover"]["epochs"] > 0
            if needs_data and data is None:
                raise DataError(
                    f"The recipe trains for {tcfg['epochs']} epoch(s) (+{resolved['recover']['epochs']} recovery) "
                    "and needs data: pass --data (ImageFolder dir, .npz, MNIST idx dir or CIFAR-10 dir), "
                    "or --set train.epochs=0 --set recover.epochs=0 to only remove already-zero channels."
                )
            splits = None
            shape = tuple(dcfg["input_shape"]) if dcfg["input_shape"] else None
            if data is not None:
                splits = data_mod.load_data(
                    data, mean=dcfg["mean"], std=dcfg["std"], input_shape=shape
                )
                shape = shape or tuple(splits.input_shape)
            in_channels = shape[0] if shape else None
            loaded = ckpt.load_checkpoint(
                checkpoint,
                arch=arch,
                num_classes=num_classes,
                in_channels=in_channels,
                trust_checkpoint=trust_checkpoint,
            )
            model = loaded.model
            if shape is None:
                shape = _shape_from_metadata(loaded.metadata)
            if shape is None:
                raise BadInputError(
                    "Cannot tell the model's input shape without data: pass --input-shape C,H,W (e.g. 3,224,224)."
                )
            model.to(dev).eval()
            example = torch.randn(1, *shape, device=dev)
            try:
                with torch.no_grad():
                    logits = model(example)
            except Exception as exc:
                raise DataError(
                    f"The model cannot run on inputs of shape {tuple(shape)} (C, H, W): {str(exc).splitlines()[0]}. "
                    "Pass the right --input-shape or --set data.input_shape=[C,H,W]."
                ) from exc
            model_classes = int(logits.shape[-1])
            if splits is not None:
                # every loader fixes the classifier from the checkpoint's weights, so
                # --num-classes cannot resize it (resizable=False)
                data_mod.check_labels(
                    splits, model_classes, classifier=_classifier(model, model_classes)
                )
                if len(splits.train) == 0 or len(splits.val) == 0:
                    raise DataError(f"The data at {data} has an empty train or val split.")
        except BaseException:
            _remove_if_empty(created)  # bad input leaves --out as it was
            raise

    # The inputs are good: from here on the run writes into --out. The previous run's outputs
    # move aside first, and a failure from here on leaves its own report (_reports_failure).
    preprocessing = _preprocessing(splits, resolved["data"], shape)
    run = _RUN.get()
    run = run if run is not None else {}
    if is_main:
        run.update(
            created=created,
            had_previous=(out / PREVIOUS_DIR).is_dir(),
            had_state=(out / STATE_DIR).exists(),
        )
        run["moved"] = _move_previous_outputs(out)
    run.update(
        is_main=is_main,
        out=out,
        resolved=resolved,
        command=command,
        timer=timer,
        preprocessing=preprocessing,
        input={
            "checkpoint": str(checkpoint),
            "arch": loaded.arch,
            "data": data,
            "device": str(dev),
        },
    )

    train_loader = val_loader = None
    if splits is not None:
        train_loader, val_loader = data_mod.make_loaders(
            splits, batch_size=tcfg["batch_size"], seed=seed, distributed=distributed
        )
        verify_inputs = torch.stack(
            [
                splits.val[i][0]
                for i in range(min(len(splits.val), resolved["export"]["verify_samples"]))
            ]
        )
    else:
        gen = torch.Generator().manual_seed(seed)
        verify_inputs = torch.randn(resolved["export"]["verify_samples"], *shape, generator=gen)
    work = out / STATE_DIR
    if is_main:
        work.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- baseline
    with timer.stage("baseline"):
        baseline = {
            "accuracy": train.evaluate(model, val_loader, dev, progress)[0]
            if val_loader is not None
            else None,
            "params": metrics.count_params(model),
            "macs": metrics.count_macs(model, example),
        }
        baseline_onnx = work / "baseline.onnx"
        if is_main:
            export.export_onnx(
                model, example.cpu(), baseline_onnx, opset=resolved["export"]["opset"]
            )
            baseline["onnx_bytes"] = export.onnx_size_bytes(baseline_onnx)
        if distributed:  # every rank needs it: --target-size sets the same controller on each
            box = [baseline.get("onnx_bytes")]
            torch.distributed.broadcast_object_list(box, src=0)
            baseline["onnx_bytes"] = box[0]
        log.info(
            "baseline: accuracy %s, %d params, %d MACs",
            baseline["accuracy"],
            baseline["params"],
            baseline["macs"],
        )
    run["baseline"] = baseline  # for a failure report

    # The input model, frozen, as the distillation teacher (the recipe's ``distill:``).
    distill = resolved["distill"]
    teacher = None
    if distill["weight"] > 0 and train_loader is not None:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)

    # ------------------------------------------------------------- activations
    act_cfg = resolved["activations"]
    activations_info = None
    if act_cfg["binarize"]:
        from compressor import activations

        skip = list(act_cfg["skip"]) or _default_activation_skip(
            model, example, act_cfg["bits"], act_cfg["ste"]
        )
        swap = activations.swap_activations(
            model, bits=act_cfg["bits"], ste=act_cfg["ste"], skip=skip
        )
        model = swap.model.to(dev)
        activations_info = {
            "bits": act_cfg["bits"],
            "ste": act_cfg["ste"],
            "swapped": list(swap.swapped),
            "skipped": list(swap.skipped),
        }

    # ------------------------------------------------------------------ groups
    with timer.stage("groups"):
        groups = build_groups(model, example, keep=resolved["prune"]["keep"])
        log.info("%d channel groups, %d channels", len(groups), groups.total_channels)

    # ----------------------------------------------------------------- sparsify
    pen, spl = resolved["penalty"], resolved["splitting"]
    rvsm = RVSM(
        model,
        groups,
        individual_kind=pen["individual"]["kind"],
        alpha=pen["individual"]["alpha"],
        beta=spl["beta"],
        beta_growth=spl["beta_growth"],
        beta_every=spl["beta_every"],
        prox_every=spl["prox_every"],
        fused=spl["fused"],
    )
    tgt = resolved["target"]
    targets = _targets(tgt, baseline)  # every target given is honoured, all at once
    target_kind, target_factor = (targets[0].kind, targets[0].factor) if targets else (None, None)
    penalty_cfg = copy.deepcopy(pen)
    epochs = tcfg["epochs"]
    steps_per_epoch = 0
    if train_loader is not None:
        steps_per_epoch = (
            len(train_loader)
            if tcfg["max_steps_per_epoch"] is None
            else min(len(train_loader), tcfg["max_steps_per_epoch"])
        )
    total_steps = max(1, epochs * steps_per_epoch)
    budget = coupling_budget(
        lr=tcfg["lr"],
        momentum=tcfg["momentum"],
        schedule=tcfg["schedule"],
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        beta=spl["beta"],
        beta_growth=spl["beta_growth"],
        beta_every=spl["beta_every"],
        optimizer=tcfg["optimizer"],
    )
    budget_points = tgt["seek_accuracy_drop"]  # asked for; the default gate alone never seeks
    seeking = (
        target_kind is None
        and budget_points is not None
        and baseline["accuracy"] is not None
        and epochs > 0
        and len(groups) > 0
    )
    penalty_cfg["group"]["weighting"] = resolve_group_weighting(
        pen["group"]["weighting"], target_kind
    )
    strength = Strength.from_recipe(
        penalty_cfg, model, groups, rvsm.individual_names, budget=budget
    )
    controller = None
    seek = None
    if seeking:
        # No target but an accuracy budget: seek the largest MACs reduction within it.
        controller = TargetController(
            "macs",
            1.0 + 1e-9,
            groups,
            strength,
            total_steps=total_steps,
            reach_fraction=max(tgt["reach_fraction"], SEEK_MIN_FRACTION),
            schedule="immediate",
            balance=tgt["balance"],
        )
        target_kind, target_factor = "seek", controller.floor_factor
        seek = AccuracySeeker(
            controller,
            stages=8,
            evaluate=lambda: _sparse_accuracy(model, rvsm, train_loader, val_loader, dev, tcfg),
            baseline_accuracy=baseline["accuracy"],
            max_drop=budget_points,
            snapshot=lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
            restore=model.load_state_dict,
        )
    elif target_kind is not None:
        controller = TargetController(
            targets,
            None,
            groups,
            strength,
            total_steps=total_steps,
            reach_fraction=tgt["reach_fraction"],
            balance=tgt["balance"],
            importance=tgt["importance"],
        )
        if not controller.reachable:  # bad input: say so before training, not after
            raise BadInputError(_unreachable_message(controller, tgt, baseline))
    if controller is not None:  # it chooses the zero units; target.shrink: shrink the others too?
        strength.shrink_kept = tgt["shrink"]
    rvsm.prox(strength.thresholds(rvsm.beta))  # u0 = prox(w0)

    optimizer = train.make_optimizer(model, tcfg)
    scheduler = train.make_scheduler(optimizer, tcfg["schedule"], total_steps)
    train_model = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    history: list[dict] = []
    start_epoch = 0
    loader_rng = getattr(train_loader, "generator", None)  # None under DDP (DistributedSampler)
    if resume_state is not None:
        state = resume_state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rvsm.load_state_dict(state["rvsm"])
        strength.group_strength = state["strength"]["group_strength"]
        strength.frozen = state["strength"]["frozen"]
        strength.forced_zero = state["strength"]["forced_zero"]
        if controller is not None:
            controller.frozen = state["controller"]["frozen"]
            controller.reached_factor = state["controller"]["reached_factor"]
            controller.reached = state["controller"].get("reached", controller.reached)
            controller.threshold = state["controller"]["threshold"]
            if state["controller"].get("taylor") is not None:
                controller.taylor, controller.taylor_seen = state["controller"]["taylor"]
        if seek is not None and state.get("seek") is not None:
            seek.load_state_dict(state["seek"])
        history = state["history"]
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng"])
        if loader_rng is not None and state.get("loader_rng") is not None:
            loader_rng.set_state(state["loader_rng"])  # the same shuffles as an uninterrupted run
        log.info("resumed after epoch %d", start_epoch)

    def before_prox(step: int) -> None:
        if controller is not None and not controller.frozen:
            if seek is not None:
                seek.check(step)
            if not controller.frozen:
                controller.update(step, dict(model.named_parameters()))
        if controller is not None:
            hold_zero_set(rvsm, strength, tgt["hold"], frozen=controller.frozen or seek is not None)

    def after_backward() -> None:
        if controller is not None and controller.importance == "taylor" and not controller.frozen:
            params = dict(model.named_parameters())
            controller.observe_gradients(params, {n: p.grad for n, p in params.items()})

    run["history"] = history  # for a failure report (the rows so far)
    for epoch in range(start_epoch, epochs):
        with timer.stage("train"):
            if distributed:
                train_loader.sampler.set_epoch(epoch)
            loss = train.train_one_epoch(
                train_model,
                train_loader,
                optimizer,
                scheduler,
                dev,
                rvsm=rvsm,
                before_prox=before_prox,
                after_backward=after_backward,
                thresholds=lambda: strength.thresholds(rvsm.beta),
                max_steps=tcfg["max_steps_per_epoch"],
                epoch=epoch,
                teacher=teacher,
                distill=distill,
                progress=progress,
                kept_epochs=epoch,  # the state after each completed epoch is saved below
            )
        with timer.stage("evaluate"):
            with rvsm.sparse_weights():
                train.recalibrate_bn(model, train_loader, dev, tcfg["bn_recalibration_batches"])
                acc = train.evaluate(model, val_loader, dev, progress)[0]
                tensors = dict(model.named_parameters())
                kept, total = metrics.channels_kept(groups, tensors)
                macs_now, params_now = groups.estimate_cost(groups.zero_masks(tensors))
                w_sparsity = metrics.weight_sparsity(model)
        row = {
            "epoch": epoch + 1,
            "loss": loss,
            "accuracy": acc,
            "weight_sparsity": w_sparsity,
            "channel_sparsity": 1 - kept / max(total, 1),
            "beta": rvsm.beta,
            "strength": (
                controller.threshold
                if controller is not None
                else strength.group_strength
                if strength.group_lambda is None
                else strength.group_lambda
            ),
            "macs_x": groups.total_macs / max(macs_now, 1.0),
            "params_x": groups.total_params / max(params_now, 1.0),
        }
        history.append(row)
        log.info(
            "epoch %d/%d: loss %.4f, sparse accuracy %.2f%%, %.2fx MACs, %.1f%% channels zero",
            epoch + 1,
            epochs,
            loss,
            acc,
            row["macs_x"],
            100 * row["channel_sparsity"],
        )
        rvsm.end_epoch(epoch)
        if is_main:
            state = {
                "fingerprint": fingerprint,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rvsm": rvsm.state_dict(),
                "strength": {
                    "group_strength": strength.group_strength,
                    "frozen": strength.frozen,
                    "forced_zero": strength.forced_zero,
                },
                "controller": {
                    "frozen": controller.frozen if controller else False,
                    "reached_factor": controller.reached_factor if controller else 1.0,
                    "reached": controller.reached if controller else None,
                    "threshold": controller.threshold if controller else 0.0,
                    "taylor": (controller.taylor, controller.taylor_seen) if controller else None,
                },
                "seek": seek.state_dict() if seek is not None and not controller.frozen else None,
                "history": history,
                "rng": torch.get_rng_state(),
                "loader_rng": loader_rng.get_state() if loader_rng is not None else None,
            }
            with atomic_output(state_path) as tmp:
                torch.save(state, tmp)

    # -------------------------------------------------------- w := u, prune
    with timer.stage("prune"):
        rvsm.finalize()
        if train_loader is not None:
            train.recalibrate_bn(model, train_loader, dev, tcfg["bn_recalibration_batches"])
        sparse_accuracy = (
            train.evaluate(model, val_loader, dev, progress)[0] if val_loader is not None else None
        )
        weight_sparsity = metrics.weight_sparsity(model)
        sample = verify_inputs.to(dev)
        verification = {"onnx_checker": False, "samples": len(verify_inputs), "notes": []}
        run["verification"] = verification
        try:
            pruned = prune_zero_channels(
                model, groups, sample, round_to=resolved["prune"]["round_to"]
            )
        except VerificationError as exc:
            verification["notes"].append(str(exc))
            return _finish_failed(
                out,
                resolved,
                baseline,
                verification,
                timer,
                command,
                exc,
                is_main,
                checkpoint=checkpoint,
                loaded=loaded,
                data=data,
                device=dev,
                history=history,
            )
        verification["sparse_vs_pruned_max_abs"] = pruned.max_abs_diff
        verification["sparse_vs_pruned_relative"] = pruned.relative_diff

    # ---------------------------------------------------------------- recover
    rec = resolved["recover"]
    if rec["epochs"] > 0:
        with timer.stage("recover"):
            masks = train.nonzero_masks(model)
            opt = train.make_optimizer(model, tcfg, lr=rec["lr"])
            sched = train.make_scheduler(opt, tcfg["schedule"], rec["epochs"] * steps_per_epoch)
            rec_model = nn.parallel.DistributedDataParallel(model) if distributed else model
            for epoch in range(rec["epochs"]):
                train.train_one_epoch(
                    rec_model,
                    train_loader,
                    opt,
                    sched,
                    dev,
                    masks=masks,
                    max_steps=tcfg["max_steps_per_epoch"],
                    epoch=epoch,
                    teacher=teacher,
                    distill=distill,
                    progress=progress,
                    kept_epochs=epochs,  # the sparsify epochs' state; recovery saves none
                    lr_key="recover.lr",
                )
    compressed_accuracy = (
        train.evaluate(model, val_loader, dev, progress)[0] if val_loader is not None else None
    )

    # ----------------------------------------------------------------- export
    model.eval()
    result_report = None
    if is_main:
        with timer.stage("export"):
            onnx_path = out / "model.onnx"
            export.export_onnx(model, example.cpu(), onnx_path, opset=resolved["export"]["opset"])
        with timer.stage("verify"):
            try:
                export.check_onnx(onnx_path)
                verification["onnx_checker"] = True
            except VerificationError as exc:
                verification["notes"].append(str(exc))
            ort = export.verify_onnx(model.cpu(), onnx_path, verify_inputs)
            model.to(dev)
            verification["torch_vs_onnxruntime_max_abs"] = ort["torch_vs_onnxruntime_max_abs"]
            verification["torch_vs_onnxruntime_relative"] = ort.get("relative_max_abs")
            verification["top1_agreement"] = ort["top1_agreement"]
            latency = export.measure_latency(
                {"baseline": baseline_onnx, "compressed": onnx_path}, tuple(shape), batch_sizes=(1,)
            )
        with timer.stage("save"):
            ckpt.save_compact(
                model.cpu(),
                out / "model.safetensors",
                arch=loaded.arch,
                build_kwargs=_build_kwargs(loaded, model_classes, shape),
                activations=swap if activations_info is not None else None,
                extra={"input_shape": list(shape)},
                preprocessing=preprocessing,
            )
            model.to(dev)
        compressed = {
            "accuracy": compressed_accuracy,
            "sparse_accuracy": sparse_accuracy,
            "params": metrics.count_params(model),
            "macs": metrics.count_macs(model, example),
            "onnx_bytes": export.onnx_size_bytes(onnx_path),
            # the shipped model's zero weights (conv/linear: ONNX Conv/Gemm/MatMul initializers)
            "weight_sparsity": metrics.weight_sparsity(model),
            "sparse_model_weight_sparsity": weight_sparsity,  # before the zero channels went
            "channels_kept": sum(pruned.kept.values()),
            "channels_total": sum(pruned.kept.values()) + pruned.channels_removed,
        }
        result_report = _build_report(
            resolved=resolved,
            command=command,
            checkpoint=checkpoint,
            loaded=loaded,
            data=data,
            device=dev,
            baseline=baseline,
            compressed=compressed,
            verification=verification,
            latency=latency,
            pruned=pruned,
            model=model,
            history=history,
            target=(target_kind, target_factor, controller, seek),
            activations=activations_info,
            timer=timer,
            onnx_path=onnx_path,
            preprocessing=preprocessing,
        )
        if result_report["exit_code"] == EXIT_VERIFICATION_FAILED:
            # the exported model disagrees with the sparse one: not shipped (as when pruning fails)
            for name in MODEL_FILES:
                (out / name).unlink(missing_ok=True)
            result_report["outputs"] = ["recipe.yaml"]
            result_report["error"] = "; ".join(verification["notes"]) or (
                "the ONNX model disagrees with PyTorch: top-1 agreement "
                f"{verification.get('top1_agreement', 0):.1%} on {len(verify_inputs)} samples, "
                f"max abs difference {verification.get('torch_vs_onnxruntime_max_abs') or 0:.3g}"
            )
        with timer.stage("report"):
            atomic_write_text(out / "recipe.yaml", recipe_mod.dump_recipe(resolved))
            result_report["timings_s"] = {k: round(v, 3) for k, v in timer.seconds.items()}
            report_mod.write_report(result_report, out)
        shutil.rmtree(work, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    return result_report if result_report is not None else {"exit_code": EXIT_OK, "rank": rank}


def _classifier(model: nn.Module, outputs: int) -> str | None:
    """``"fc3, Linear 84 -> 10"``: the last Linear/Conv with ``outputs`` outputs, for messages."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == outputs:
            found = f"{name}, Linear {m.in_features} -> {m.out_features}"
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == outputs:
            found = f"{name}, {type(m).__name__} {m.in_channels} -> {m.out_channels} channels"
    return found


def _shape_from_metadata(metadata: dict | None):
    if not metadata:
        return None
    extra = metadata.get("extra") or {}
    shape = extra.get("input_shape")
    return tuple(shape) if shape else None


def _build_kwargs(loaded, num_classes: int, shape) -> dict:
    kwargs = dict((loaded.metadata or {}).get("build_kwargs") or {})
    kwargs.setdefault("num_classes", num_classes)
    if loaded.arch in BUILTIN_MODELS:
        kwargs.setdefault("in_channels", shape[0])
    return kwargs


def _sparse_accuracy(model, rvsm, train_loader, val_loader, dev, tcfg) -> float:
    """Validation accuracy of the sparse model ``u`` after BatchNorm recalibration; restores ``w``."""
    with rvsm.sparse_weights():
        saved = {
            k: v.clone()
            for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k
        }
        train.recalibrate_bn(model, train_loader, dev, tcfg["bn_recalibration_batches"])
        acc = train.evaluate(model, val_loader, dev)[0]
        model.load_state_dict(saved, strict=False)
    model.train()
    return acc


def hold_zero_set(rvsm: RVSM, strength: Strength, hold: str, *, frozen: bool) -> None:
    """Keep the controller's current zero set exactly zero in ``w`` as the recipe's ``target.hold`` says.

    ``always``: from the first step (gradual pruning: the network never leans on
    a channel it is about to lose); ``masked``: once ``frozen`` (the zero set is
    final, or the accuracy seeker is checking a stage); ``coupled``: never, the
    coupling alone pulls those channels toward zero (plain RVSM).
    """
    zero = strength.forced_zero
    if zero is None or hold == "coupled" or (hold == "masked" and not frozen):
        return
    if rvsm.held_zero is None or not all(map(torch.equal, rvsm.held_zero, zero)):
        rvsm.hold_zero(zero)


class AccuracySeeker:
    """Raises the MACs reduction in stages while the sparse model stays within an accuracy budget.

    The reach part of training is split into ``stages``; each stage asks the
    controller for ``growth`` times the last good stage's reduction and holds
    it, so the network adapts to the new zero set. At the end of a stage the
    sparse model is evaluated (after BatchNorm recalibration): within
    ``max_drop`` the zero set is kept (and the model state saved with
    ``snapshot()``) and the next stage begins. Over budget, the model is put
    back to the last state within budget (``restore(saved)``) and, while
    stages are left, the next stage tries half the step (in log scale:
    ``growth`` becomes its square root), a bisection between the last good
    reduction and the failed one; once the step is below ``min_growth`` or the
    reach part of training is over, the last good zero set is frozen, so the
    rest of training recovers accuracy. The check is conservative: the final
    accuracy comes after more training than the check saw.
    """

    def __init__(
        self, controller, *, stages, evaluate, baseline_accuracy, max_drop, growth=1.3,
        min_growth=1.05, snapshot=None, restore=None,
    ):  # fmt: skip
        self.controller = controller
        self.snapshot, self.restore = snapshot, restore
        self.saved = snapshot() if snapshot is not None else None
        self.every = max(1, controller.reach_step // stages)
        self.evaluate = evaluate
        self.baseline_accuracy = baseline_accuracy
        self.max_drop = max_drop
        self.growth, self.min_growth = growth, min_growth
        self.good_factor = 1.0  # the asked reduction of the last stage within budget
        self.last_good: list[torch.Tensor] | None = None
        self.log: list[dict] = []
        controller.ask(min(growth, controller.floor_factor))

    def state_dict(self) -> dict:
        """What ``--resume`` needs to go on seeking where an interrupted run stopped."""
        return {
            "factor": self.controller.factor,
            "growth": self.growth,
            "good_factor": self.good_factor,
            "last_good": self.last_good,
            "saved": self.saved,
            "log": self.log,
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.ask(state["factor"])
        self.growth, self.good_factor = state["growth"], state["good_factor"]
        self.last_good, self.saved, self.log = state["last_good"], state["saved"], state["log"]

    def check(self, step: int) -> None:
        ctl = self.controller
        if step % self.every or ctl.strength.forced_zero is None:
            return
        acc = self.evaluate()
        ok = self.baseline_accuracy - acc <= self.max_drop
        self.log.append({"step": step, "macs_x": ctl.reached_factor, "accuracy": acc, "within": ok})
        log.info(
            "seek: step %d, %.2fx MACs, sparse accuracy %.2f%% (%s)",
            step,
            ctl.reached_factor,
            acc,
            "ok" if ok else "over budget",
        )
        steps_left = step + self.every <= ctl.reach_step
        if ok:
            self.good_factor = ctl.factor
            self.last_good = [m.clone() for m in ctl.strength.forced_zero]
            if self.snapshot is not None:
                self.saved = self.snapshot()
            if steps_left and ctl.factor < ctl.floor_factor:
                ctl.ask(min(ctl.factor * self.growth, ctl.floor_factor))
                return
            ctl.freeze()
        else:
            if self.restore is not None and self.saved is not None:
                self.restore(self.saved)  # the channels zeroed since then come back
            masks = self.last_good or [torch.zeros_like(m) for m in ctl.strength.forced_zero]
            self.growth = math.sqrt(self.growth)
            if steps_left and self.growth >= self.min_growth:
                ctl.strength.forced_zero = [m.clone() for m in masks]
                ctl.ask(min(self.good_factor * self.growth, ctl.floor_factor))
                return
            ctl.freeze(masks)
        log.info("seek: froze the zero set at %.2fx MACs", ctl.reached_factor)


def _targets(tgt: dict, baseline: dict) -> list[Target]:
    """The recipe's targets (``target.macs``, ``.params``, ``.size``), in that order; a size
    target (bytes) is counted in params, as the factor baseline ONNX bytes / size."""
    targets = []
    if tgt["macs"] is not None:
        targets.append(Target("macs", float(tgt["macs"])))
    if tgt["params"] is not None:
        targets.append(Target("params", float(tgt["params"])))
    if tgt["size"] is not None:
        base_bytes = baseline.get("onnx_bytes", 4 * baseline["params"])
        targets.append(Target("size", max(1.0 + 1e-9, base_bytes / float(tgt["size"])), "params"))
    return targets


def _unreachable_message(controller: TargetController, tgt: dict, baseline: dict) -> str:
    """Exit 2 before training: which target is beyond what removing channels can reach, the
    most it can reach and the value to ask instead."""
    parts = []
    for kind, most in controller.unreachable.items():
        asked = controller.costs.asked[kind]
        if kind == "size":
            base_bytes = baseline.get("onnx_bytes", 4 * baseline["params"])
            smallest = math.ceil(base_bytes / most)
            parts.append(
                f"--target-size {tgt['size']} (target.size, bytes) asks for a {asked:.2f}x smaller "
                f"model, but removing channels reaches at most {most:.2f}x fewer params here, about "
                f"{smallest} bytes: pass --target-size {smallest} or more"
            )
        else:
            words = "MACs" if kind == "macs" else "params"
            parts.append(
                f"--target-{kind} {asked:g} (target.{kind}) asks for {asked:.2f}x fewer {words}, "
                f"but removing channels reaches at most {most:.2f}x here: pass --target-{kind} "
                f"{math.floor(most * 100) / 100:g} or less"
            )
    return (
        "; ".join(parts) + f". (Every layer keeps at least {MIN_KEEP_FRACTION:.0%} of its "
        "channels, and prune.keep layers keep all.) Nothing was trained."
    )


def _target_summary(target, compressed, baseline) -> dict | None:
    kind, factor, controller, seek = target
    if kind is None:
        return None
    weighting = controller.strength.weighting if controller else None
    importance = controller.importance if controller else None
    if kind == "seek":
        reached = baseline["macs"] / max(compressed["macs"], 1)
        return {
            "kind": "seek_macs",
            "asked": None,
            "reached": reached,
            "within": True,
            "max_reachable": controller.floor_factor if controller else None,
            "stages": seek.log if seek else [],  # each check: step, MACs x, sparse accuracy
            "group_weighting": weighting,
            "importance": importance,
        }
    measured = {"macs": "macs", "params": "params", "size": "onnx_bytes"}
    asked = controller.costs.asked if controller else {kind: factor}
    most = controller.max_reachable if controller else {}
    entries = []  # every target given: asked, reached (measured on the compact model), met
    for k, f in asked.items():
        reached = baseline[measured[k]] / max(compressed[measured[k]], 1)
        met = report_mod.target_summary(k, f, reached)["within"]  # within the gate's slack
        entries.append(
            {"kind": k, "asked": f, "reached": reached, "met": met, "max_reachable": most.get(k)}
        )
    first = entries[0]
    return {
        "kind": first["kind"],
        "asked": first["asked"],
        "reached": first["reached"],
        "within": all(e["met"] for e in entries),  # every target met
        "reachable": bool(controller.reachable) if controller else True,
        "max_reachable": first["max_reachable"],
        "targets": entries,
        "group_weighting": weighting,
        "importance": importance,
    }


def _build_report(
    *,
    resolved,
    command,
    checkpoint,
    loaded,
    data,
    device,
    baseline,
    compressed,
    verification,
    latency,
    pruned,
    model,
    history,
    target,
    activations,
    timer,
    onnx_path,
    preprocessing=None,
) -> dict:
    target_summary = _target_summary(target, compressed, baseline)
    sparsity = {row["name"]: row["sparsity"] for row in metrics.layer_sparsity(model)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = [
        {
            "name": name,
            "type": type(model.get_submodule(name)).__name__,
            "shape_before": info["shape_before"],
            "shape_after": info["shape_after"],
            "sparsity": sparsity.get(name),
        }
        for name, info in pruned.layers.items()
    ]
    report = {
        "schema": 1,
        "tool": {"name": "compressor", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "recipe": resolved,
        "input": {
            "checkpoint": str(checkpoint),
            "arch": loaded.arch,
            "data": data,
            "device": str(device),
        },
        "baseline": baseline,
        "compressed": compressed,
        "channel_groups": [  # the units of channels_kept / channels_total, in model order
            {"root": root, "before": kept + len(pruned.removed.get(root, [])), "after": kept}
            for root, kept in sorted(pruned.kept.items(), key=lambda kv: order.get(kv[0], 0))
        ],
        "preprocessing": preprocessing,
        "reduction": {
            "macs_x": baseline["macs"] / max(compressed["macs"], 1),
            "params_x": baseline["params"] / max(compressed["params"], 1),
            "size_x": baseline["onnx_bytes"] / max(compressed["onnx_bytes"], 1),
        },
        "verification": verification,
        "latency_ms": report_mod.latency_section(latency),
        "layers": layers,
        "epochs": history,
        "target": target_summary,
        "activations": activations,
        "outputs": list(OUTPUT_FILES),
    }
    gates = report_mod.evaluate_gates(
        report,
        max_accuracy_drop=resolved["gates"]["max_accuracy_drop"],
        # seeking has no asked factor: only the accuracy gate applies
        target=target_summary if target_summary and target_summary["asked"] is not None else {},
    )
    report["gates"] = gates
    exit_code = EXIT_OK
    ort_ok = verification.get("top1_agreement", 0) >= 1.0 or activations is not None
    if not verification["onnx_checker"] or not ort_ok:
        exit_code = EXIT_VERIFICATION_FAILED
    elif activations is None and (verification.get("torch_vs_onnxruntime_relative") or 0) > 1e-3:
        exit_code = EXIT_VERIFICATION_FAILED
        verification["notes"].append(
            "onnxruntime outputs differ from PyTorch by more than 1e-3 of the output scale"
        )
    elif activations is not None and verification.get("top1_agreement", 0) < 1.0:
        verification["notes"].append(
            "binary activations: some units sit within float rounding of 0 and flip between PyTorch and "
            "onnxruntime; top-1 agreement below 100% is reported, not hidden"
        )
    if exit_code == EXIT_OK and not all(g["passed"] for g in gates):
        exit_code = EXIT_GATE_FAILED
    report["exit_code"] = exit_code
    return report


def _finish_failed(
    out,
    resolved,
    baseline,
    verification,
    timer,
    command,
    exc,
    is_main,
    *,
    checkpoint=None,
    loaded=None,
    data=None,
    device=None,
    history=(),
) -> dict:
    """Verification failed: no model is written, only the report (json, md, plots) and recipe."""
    run = _RUN.get() or {}
    return _write_failed_report(
        out if is_main else None,
        resolved,
        command,
        {
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "arch": loaded.arch if loaded is not None else None,
            "data": data,
            "device": str(device) if device is not None else None,
        },
        baseline=baseline,
        verification=verification,
        history=history,
        timer=timer,
        preprocessing=run.get("preprocessing"),
        error=str(exc),
        exit_code=EXIT_VERIFICATION_FAILED,
    )


def _write_failed_report(
    out,
    resolved,
    command,
    input,
    *,
    baseline,
    verification,
    history,
    timer,
    preprocessing,
    error: str,
    exit_code: int,
) -> dict:
    """The report of a run that failed (exit 1, 2 found late, or 4): FAIL, the exit code and
    the error, what was measured so far, and ``recipe.yaml``; no model files. Written into
    ``out`` unless it is None (a DDP rank other than 0)."""
    report = report_mod.new_report(command=command, recipe=resolved, input=input)
    report["baseline"].update(baseline or {})
    report["verification"].update(verification or {})
    report["epochs"] = list(history or [])
    report["preprocessing"] = preprocessing
    report["error"] = error
    report["exit_code"] = exit_code
    report["timings_s"] = {k: round(v, 3) for k, v in timer.seconds.items()}
    if out is not None:
        atomic_write_text(out / "recipe.yaml", recipe_mod.dump_recipe(resolved))
        report["outputs"] = ["recipe.yaml"]
        report_mod.write_report(report, out)
    return report


def _preprocessing(splits, data_cfg: dict, shape) -> dict | None:
    """The input the exported model expects: ``x = (stored * scale - mean) / std`` per channel
    on float32 NCHW input of ``input_shape``; None without data (how its inputs were scaled
    is then unknown)."""
    if splits is None or shape is None:
        return None
    channels = int(shape[0])
    mean, std = data_cfg["mean"], data_cfg["std"]
    return {
        "scale": float(getattr(splits, "scale", 1 / 255)),
        "mean": [float(v) for v in mean] if mean is not None else [0.0] * channels,
        "std": [float(v) for v in std] if std is not None else [1.0] * channels,
        "input_shape": [int(v) for v in shape],
    }


__all__ = ["compress", "CompressorError"]
