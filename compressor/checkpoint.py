"""Load a model from a checkpoint (safe by default); save the compact model and load it back.

Accepted checkpoints (:func:`load_checkpoint`):

- ``.pt`` / ``.pth`` holding a ``state_dict`` (or a dict with one under ``state_dict``,
  ``model`` or ``model_state_dict``), read with ``torch.load(weights_only=True)``, which
  cannot run code; the architecture comes from ``--arch``;
- a plain ``.safetensors`` file plus ``--arch``;
- compressor's own compact ``model.safetensors`` (weights plus metadata describing the
  pruned shapes), which needs no flag unless its architecture is ``package.module:callable``;
- a whole pickled ``nn.Module`` only with ``trust_checkpoint=True``: unpickling runs code
  from the file.

Architectures (:func:`build_model`): compressor's built-ins (``resnet20``, ``lenet5``),
torchvision classification and detection models by name (never with downloaded weights,
the backbone's included), timm models
as ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``; needs the ``timm`` extra), or
``package.module:callable`` imported with the current directory on ``sys.path``.

A file never chooses code to run: a compact file's metadata may name a built-in,
torchvision or registered timm architecture (``timm:NAME`` with NAME in
``timm.list_models()``, built only with ``num_classes`` / ``in_channels``), but one importable
by path only loads when the user names it too (``arch=``, ``--arch``) or trusts the file
(``trust_checkpoint=True``, ``--trust-checkpoint``); every metadata field is checked for type
and range first.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import inspect
import io
import json
import keyword
import logging
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import CheckpointError, OutputError
from compressor.fileio import atomic_output
from compressor.models import BUILTIN_MODELS

__all__ = [
    "COMPACT_FORMAT_VERSION",
    "METADATA_KEY",
    "LoadedCheckpoint",
    "build_model",
    "list_architectures",
    "load",
    "load_checkpoint",
    "read_compact_metadata",
    "save_compact",
]

log = logging.getLogger(__name__)

METADATA_KEY = "compressor"
# 2: a pruned attention module's tensors include ``kept_heads``/``original_heads`` (which of
# the original heads it computes; compressor.attention.PrunedMultiheadAttention). Version 1
# files still load (their kept heads unknown); a compressor that reads only version 1 refuses
# a version 2 file with "upgrade compressor" instead of failing on unexpected tensors.
COMPACT_FORMAT_VERSION = 2
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_ARCH_HINT = (
    "a built-in ({builtins}), a torchvision classification model such as resnet18, "
    "timm:NAME for a timm model, or package.module:callable for your own model"
)
TIMM_PREFIX = "timm:"
# What a compact file's metadata may pass to timm.create_model for an architecture it chose:
# sizes only (other keyword arguments such as checkpoint_path would let the file choose files).
_TIMM_FILE_KWARGS = frozenset({"num_classes", "in_channels"})


@dataclass
class LoadedCheckpoint:
    """A model read from a checkpoint, in eval mode.

    ``format``: "state_dict", "safetensors", "compact" or "pickled_module".
    ``build_kwargs``: what :func:`build_model` was called with (``num_classes``,
    ``in_channels``), also under ``metadata["build_kwargs"]``.
    """

    model: nn.Module
    arch: str | None
    format: str
    metadata: dict = field(default_factory=dict)
    build_kwargs: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Architectures


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _detection_names() -> frozenset[str]:
    """torchvision's detection models (``ssdlite320_mobilenet_v3_large``, ...), for
    ``--task detection``."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models.detection))


def _is_detection(arch: str) -> bool:
    return isinstance(arch, str) and ":" not in arch and arch in _detection_names()


def _is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise CheckpointError(
            f"timm architectures (--arch timm:NAME) need the timm package, which is not "
            f'installed ({exc}). Install it with: pip install "compressor[timm]"'
        ) from None
    return timm


@functools.cache
def _timm_names() -> frozenset[str]:
    return frozenset(_timm().list_models())


def _timm_name(arch: str) -> str:
    """NAME of ``timm:NAME``, checked against ``timm.list_models()``."""
    name = arch[len(TIMM_PREFIX) :]
    names = _timm_names()
    if name in names:
        return name
    lowered = {n.lower(): n for n in names}
    close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
    hint = " Did you mean " + " or ".join(f"timm:{c}" for c in close) + "?" if close else ""
    raise CheckpointError(
        f"Unknown timm architecture {name!r} (--arch {arch}).{hint} Names are those of "
        "timm.list_models() (without a pretrained tag such as .a1_in1k)."
    )


def list_architectures() -> list[str]:
    """Built-in names followed by torchvision classification model names."""
    return sorted(BUILTIN_MODELS) + _torchvision_names()


def _builtins_text() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _import_callable(arch: str, flag: str = "--arch") -> Callable:
    """``package.module:attr`` imported with the current directory on ``sys.path``; errors
    name ``flag`` (the option that named it)."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise CheckpointError(
            f"{flag} {arch!r} must be package.module:callable (e.g. mynets.cifar:resnet32)."
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"Cannot import {module_name!r} for {flag} {arch} ({exc}). Run from the folder that "
            f"contains it, or add that folder to PYTHONPATH."
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"Importing {module_name!r} for {flag} {arch} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [
                n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
            ]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean {module_name}:{close[0]}?" if close else ""
            raise CheckpointError(
                f"{module_name} has no attribute {attr!r} ({flag} {arch}).{hint} "
                f"Callables there: {', '.join(names[:20]) or 'none'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"{flag} {arch}: {attr} is not callable; name a function or class.")
    return obj


def _first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return name, module
    return None


def _set_in_channels(model: nn.Module, in_channels: int, arch: str) -> None:
    """Replace the first conv by one reading ``in_channels`` channels (e.g. MNIST into resnet18)."""
    found = _first_conv(model)
    if found is None:
        raise CheckpointError(
            f"--arch {arch} has no convolution to take {in_channels} input channels; "
            "pass 3-channel data or your own model as package.module:callable."
        )
    name, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise CheckpointError(
            f"Cannot change the input channels of --arch {arch}: its first conv is grouped."
        )
    new = type(conv)(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    _set_submodule(model, name, new)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_model(
    arch: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A freshly initialised model (no downloaded weights) for ``arch``.

    ``arch``: a compressor built-in (``resnet20``, ``lenet5``), a torchvision classification
    model name, ``timm:NAME`` (``timm.create_model(NAME, pretrained=False, num_classes=,
    in_chans=)``), or ``package.module:callable`` (imported with the current directory on
    ``sys.path``; called with ``num_classes=`` / ``in_channels=`` when given and accepted).
    For torchvision models and callables without an ``in_channels`` argument,
    ``in_channels`` replaces the first convolution. Other ``kwargs`` (e.g. ``width`` for
    ``resnet20``) go to the constructor as they are.
    """
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"--arch must be a name; got {arch!r}. Use {_hint()}.")
    sizes = {
        k: v
        for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
        if v is not None
    }
    if arch in BUILTIN_MODELS:
        return _call(BUILTIN_MODELS[arch], arch, {**sizes, **kwargs})
    if _is_timm(arch):
        name = _timm_name(arch)
        create_model = _timm().create_model
        timm_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        if in_channels is not None:
            timm_kwargs["in_chans"] = in_channels
        return _call(
            lambda **kw: create_model(name, pretrained=False, **kw),
            arch,
            {**timm_kwargs, **kwargs},
        )
    if ":" in arch:
        fn = _import_callable(arch)
        accepted = {k: v for k, v in sizes.items() if _accepts(fn, k)}
        model = _call(fn, arch, {**accepted, **kwargs})
        if "in_channels" in sizes and "in_channels" not in accepted:
            _set_in_channels(model, sizes["in_channels"], arch)
        return model
    if _is_detection(arch):  # no downloaded weights, for the backbone either
        import torchvision

        tv_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        return _call(
            lambda **kw: torchvision.models.get_model(
                arch, weights=None, weights_backbone=None, **kw
            ),
            arch,
            {**tv_kwargs, **kwargs},
        )
    tv_names = _torchvision_names()
    if arch in tv_names:
        import torchvision

        tv_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        model = _call(
            lambda **kw: torchvision.models.get_model(arch, weights=None, **kw),
            arch,
            {**tv_kwargs, **kwargs},
        )
        if in_channels is not None:
            _set_in_channels(model, in_channels, arch)
        return model
    names = sorted(BUILTIN_MODELS) + tv_names
    lowered = {n.lower(): n for n in names}
    close = [lowered[c] for c in difflib.get_close_matches(arch.lower(), list(lowered), n=3)]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise CheckpointError(f"Unknown architecture {arch!r}.{hint} Use {_hint()}.")


def _hint() -> str:
    return _ARCH_HINT.format(builtins=_builtins_text())


def _call(fn: Callable, arch: str, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except CheckpointError:
        raise
    except Exception as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CheckpointError(
            f"Building --arch {arch}({args}) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"--arch {arch} returned a {type(model).__name__}, not a torch.nn.Module."
        )
    return model


# ----------------------------------------------------------------------------
# Reading files


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read {path} as safetensors ({exc}); the file is truncated or corrupt."
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read {path} as safetensors ({exc}); the file is truncated or corrupt."
        ) from None


def _refused_globals(path: Path) -> list[str]:
    """The globals (``module.name``) in the file's pickle that ``weights_only`` loading
    refuses, read by disassembling it (nothing is imported or run); [] when unreadable."""
    try:
        if zipfile.is_zipfile(path):
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        else:  # a raw pickle, or torch's legacy format (several pickles in a row)
            with open(path, "rb") as f:
                names = [n for n in _pickle_globals(f.read(64 << 20)) if n not in _safe_globals()]
    except Exception:
        return []
    return [n for n in dict.fromkeys(names) if n != "argparse.Namespace"]


def _safe_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:  # a private API: without it every global counts as refused
        return set()


def _pickle_globals(data: bytes) -> list[str]:
    """Every GLOBAL / STACK_GLOBAL named in ``data`` (up to 4 pickles in a row)."""
    names: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(4):
        strings: list[str] = []  # strings pushed so far: STACK_GLOBAL takes the last two
        memo: dict[int, str] = {}
        top: str | None = None  # the string on top of the stack, if the last push was one
        memoized = 0
        try:
            for op, arg, _ in pickletools.genops(stream):
                pushed = None
                if op.name == "GLOBAL":  # protocol 2 writes Python 2 names: __builtin__
                    names.append(re.sub(r"^__builtin__ ", "builtins ", str(arg)).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif "UNICODE" in op.name and isinstance(arg, str):
                    pushed = arg
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed = memo.get(arg)
                elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    index = memoized if op.name == "MEMOIZE" else arg
                    memoized += op.name == "MEMOIZE"
                    if top is not None:
                        memo[index] = top
                    continue  # the stack is unchanged
                if pushed is not None:
                    strings.append(pushed)
                top = pushed
        except Exception:
            break
        if stream.tell() >= len(data):
            break
    return names


class _Refused(CheckpointError):
    """weights_only loading refused the file; with --trust-checkpoint, full unpickling may read it."""


def _torch_load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; never runs code."""
    try:
        # argparse.Namespace is a plain attribute bag (torchvision's reference scripts save
        # one under "args"); torch < 2.5 has no safe_globals and refuses it.
        safe_globals = getattr(torch.serialization, "safe_globals", None)
        allow = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
        with allow, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = re.search(r"GLOBAL ([\w.]+)", text)
        names = _refused_globals(path) or ([match.group(1)] if match else [])
        if names:
            raise _Refused(_refusal_message(path, names)) from None
        if "Weights only load failed" in text:
            raise _Refused(
                _corrupt_message(path, exc, text.split("WeightsUnpickler error:")[-1])
                + " If it is a checkpoint you trust, --trust-checkpoint reads it with full "
                "unpickling (which runs code from the file)."
            ) from None
        raise CheckpointError(_corrupt_message(path, exc)) from None
    except Exception as exc:
        raise CheckpointError(_corrupt_message(path, exc)) from None


def _refusal_message(path: Path, names: list[str]) -> str:
    """Why a pickle was refused: the globals it would have called, and the opt-in."""
    names = sorted(names, key=lambda n: (n.startswith("torch."), n))  # the user's first
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    if any(n.startswith(("torch.nn.modules.", "torch.nn.parallel.")) for n in names):
        return (
            f"{path} is a pickled module ({shown}); loading it runs code from the file. "
            "If you trust it, pass --trust-checkpoint; or save model.state_dict() and "
            "pass --arch."
        )
    return (
        f"{path} was refused: it holds pickled Python objects that are not tensors or "
        f"containers, and loading it would run {shown} (nothing was run). If you trust the "
        "file and its author, --trust-checkpoint loads it with full unpickling, which runs "
        "that code; otherwise save torch.save(model.state_dict(), path) and pass --arch."
    )


def _corrupt_message(path: Path, exc: BaseException, detail: str | None = None) -> str:
    text = str(exc) if detail is None else detail
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 200:
        first = first[:200] + "..."
    return (
        f"Cannot read {path} ({type(exc).__name__}: {first}); the file is truncated, corrupt, "
        "or not a PyTorch checkpoint. Save it again with torch.save(model.state_dict(), path) "
        "or pass a .safetensors file."
    )


def _torch_load_trusted(path: Path) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CheckpointError(
            f"{path} pickles a class that cannot be imported here ({exc}). Run from the folder "
            "that contains its module, or save model.state_dict() and pass --arch "
            "package.module:callable."
        ) from None
    except Exception as exc:
        raise CheckpointError(_corrupt_message(path, exc)) from None


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _extract(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor] | nn.Module, str | None]:
    """The state_dict (or module, when trusted) inside a loaded checkpoint, and where it was."""
    if isinstance(obj, nn.Module) or _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_tensor_dict(inner):
                return inner, key
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise CheckpointError(
            f"{path} holds a dict (keys: {keys}) but no state_dict under "
            f"{', '.join(repr(k) for k in _STATE_DICT_KEYS)}. Save "
            "torch.save(model.state_dict(), path) and pass --arch."
        )
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state_dict. Save "
        "torch.save(model.state_dict(), path) and pass --arch."
    )


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    """``sd`` without ``prefix`` on every key (and in its ``_metadata``), when all have it."""
    if not (sd and all(k.startswith(prefix) for k in sd)):
        return sd
    metadata = getattr(sd, "_metadata", None)
    if metadata is not None:
        root = prefix[:-1]
        metadata = {
            ("" if k == root else k[len(prefix) :]): v
            for k, v in metadata.items()
            if k == root or k.startswith(prefix)
        }
    return _with_metadata({k[len(prefix) :]: v for k, v in sd.items()}, metadata)


def _with_metadata(sd: Mapping[str, torch.Tensor], metadata: Mapping | None) -> OrderedDict:
    """``sd`` as torch's state_dicts are: an OrderedDict whose ``_metadata`` holds each
    module's ``{"version": n}`` (read by ``_load_from_state_dict``, e.g. torchvision's MNASNet)."""
    out = OrderedDict(sd)
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def _load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with the module versions ``sd`` was saved
    with, or (a file that kept none, e.g. safetensors) the model's own current versions."""
    if getattr(sd, "_metadata", None) is None:
        sd = _with_metadata(sd, model.state_dict()._metadata)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(
            f"Loading {path} into --arch {arch} failed ({type(exc).__name__}: {first}). Check "
            "that the checkpoint is a state_dict of that architecture."
        ) from exc


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


# ----------------------------------------------------------------------------
# Fitting a state_dict to an architecture


def _last_classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            last = (name, module)
    return last


def _supports(arch: str, name: str) -> bool:
    if arch in BUILTIN_MODELS:
        return _accepts(BUILTIN_MODELS[arch], name)
    if ":" in arch and not _is_timm(arch):
        return _accepts(_import_callable(arch), name) or name == "in_channels"
    if _is_detection(arch):  # its last conv is not the classes: _detection_classes reads them
        return False
    return True  # torchvision: num_classes via get_model, in_channels via the first conv;
    # timm: num_classes and in_chans via create_model


def _is_detector(model: nn.Module) -> bool:
    """A torchvision single-stage detector (SSD, SSDlite, RetinaNet, FCOS), built by name or
    by the user's ``package.module:callable``: its classes are not its last conv's rows."""
    from compressor.detection import missing_detector_parts

    return not missing_detector_parts(model)


def _detection_classes(
    model: nn.Module, sd: Mapping[str, torch.Tensor], num_classes: int | None, path: Path
) -> int | None:
    """A torchvision detector's ``num_classes`` (background included) as its checkpoint
    stores it: the first class-logits conv has ``anchors * classes`` rows and the first
    box-regression conv ``anchors * 4`` (SSD, SSDlite, RetinaNet, FCOS). ``num_classes``
    when the checkpoint does not tell; a different ``num_classes`` raises. ``model``: the
    detector's structure (a probe)."""
    from compressor.detection import prediction_layers

    layers = prediction_layers(model)
    cls = next((n for n in layers if n.startswith("head.classification_head.")), None)
    reg = next((n for n in layers if n.startswith("head.regression_head.")), None)
    rows = [sd.get(f"{n}.weight") for n in (cls, reg)]
    if None in rows or rows[1].ndim < 1 or rows[1].shape[0] % 4:
        return num_classes
    found = 4 * int(rows[0].shape[0]) // int(rows[1].shape[0])
    if num_classes is not None and num_classes != found:
        raise CheckpointError(
            f"{path} has {found} classes ({cls}.weight {_shape(rows[0])}, {reg}.weight "
            f"{_shape(rows[1])}: anchors x classes and anchors x 4 rows) but --num-classes is "
            f"{num_classes}. Drop --num-classes to use the checkpoint's, or pass the right one."
        )
    return found


def _fit_model(
    arch: str,
    sd: Mapping[str, torch.Tensor],
    num_classes: int | None,
    in_channels: int | None,
    path: Path,
) -> tuple[nn.Module, Mapping[str, torch.Tensor], dict]:
    """Build ``arch`` with the output/input sizes the state_dict implies; return it with
    the (prefix-stripped) state_dict and the build kwargs used.

    First the checkpoint must be an ``arch`` at all (keys and shapes, with its own classifier
    outputs and input channels); only then are those sizes compared with what was asked."""
    model = _probe(arch, num_classes, in_channels)
    detector = _is_detector(model)
    if detector:  # built again with the checkpoint's classes when none were asked
        found = _detection_classes(model, sd, num_classes, path)
        if found != num_classes:
            num_classes, model = found, _probe(arch, found, in_channels)
    model_keys = set(model.state_dict())
    # A wrapper prefix (e.g. Lightning's "model.") that, once stripped, fits exactly.
    if set(sd) != model_keys:
        first = {k.split(".", 1)[0] for k in sd}
        if len(first) == 1 and all("." in k for k in sd):
            stripped = _strip_prefix(sd, next(iter(first)) + ".")
            if set(stripped) == model_keys:
                sd = stripped
    current: dict[str, int] = {}  # the probe's sizes
    found: dict[str, tuple[int, str]] = {}  # the checkpoint's, and the tensor they come from
    head = _last_classifier(model)
    if head is not None and not detector and _supports(arch, "num_classes"):
        current["num_classes"] = int(head[1].weight.shape[0])
        stored = sd.get(f"{head[0]}.weight")
        if stored is not None and stored.ndim >= 1:
            found["num_classes"] = (int(stored.shape[0]), f"{head[0]}.weight {_shape(stored)}")
    stem = _first_conv(model)
    if stem is not None and _supports(arch, "in_channels"):
        current["in_channels"] = int(stem[1].in_channels)
        stored = sd.get(f"{stem[0]}.weight")
        if stored is not None and stored.ndim >= 2:
            channels = int(stored.shape[1]) * stem[1].groups
            found["in_channels"] = (channels, f"{stem[0]}.weight {_shape(stored)}")
    own = {**current, **{k: v for k, (v, _) in found.items()}}  # the checkpoint's own sizes
    try:
        natural = model if own == current else _probe(arch, **own)
    except CheckpointError:
        natural = None  # sizes this architecture cannot take: _check_fit reports the misfit
    if natural is not None:
        _check_is_arch(natural, sd, path, arch)
    if num_classes is not None and found.get("num_classes", (num_classes,))[0] != num_classes:
        outputs, tensor = found["num_classes"]
        raise CheckpointError(
            f"{path} has {outputs} outputs ({tensor}) but --num-classes is {num_classes}. Drop "
            "--num-classes to use the checkpoint's, or pass the right one."
        )
    if in_channels is not None and found.get("in_channels", (in_channels,))[0] != in_channels:
        channels, tensor = found["in_channels"]
        raise CheckpointError(
            f"{path} takes {channels}-channel inputs ({tensor}) but the data has {in_channels} "
            f"channel(s). Set `data.input_shape: [{channels}, H, W]` in the recipe to convert "
            "the images, or use matching data."
        )
    kwargs = {k: found[k][0] if k in found else v for k, v in current.items()}
    if (
        detector
        and num_classes is not None
        and (_is_detection(arch) or _supports(arch, "num_classes"))
    ):
        kwargs["num_classes"] = num_classes
    if kwargs != current or _is_meta(model):
        model = build_model(arch, **kwargs)
    _check_fit(model, sd, path, arch, kwargs)
    _load_weights(model, sd, path, arch)
    return model, sd, kwargs


def _check_is_arch(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Refuse a checkpoint whose keys or shapes are not those of ``model`` (``arch`` built
    with the checkpoint's own sizes), naming the closest architectures."""
    expected = model.state_dict()
    missing, unexpected, mismatched = _misfit(expected, sd)
    if not (missing or unexpected or mismatched):
        return
    if missing or unexpected:
        what = f"this checkpoint is not a {arch}"
    else:
        what = (
            f"this checkpoint is not a {arch} as built by default: the keys match but "
            f"{len(mismatched)} tensors have other shapes"
        )
    lines = [
        f"{path} does not fit --arch {arch}: {what} ({len(missing)} missing, "
        f"{len(unexpected)} unexpected and {len(mismatched)} shape-mismatched keys).",
        *_misfit_lines(expected, sd, missing, unexpected, mismatched),
    ]
    closest = _closest_architectures(sd, exclude=arch)
    if closest:
        (best, share), others = closest[0], closest[1:]
        shown = f"{best} ({share:.0%} of keys and shapes match)" + "".join(
            f", {name} ({share:.0%})" for name, share in others
        )
        lines.append(f"Closest architectures: {shown}. Pass --arch {best} if it is one.")
    else:
        lines.append("No built-in or torchvision architecture is close.")
    lines.append(
        "For your own model, or one built with other constructor arguments, pass --arch "
        "package.module:callable that builds it."
    )
    raise CheckpointError("\n".join(lines))


@functools.cache
def _arch_shapes(arch: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the state_dict of ``arch`` as built by default; None if it cannot be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = _probe(arch, None, None).state_dict()
    except CheckpointError:
        return None
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _closest_architectures(
    sd: Mapping[str, torch.Tensor], exclude: str, n: int = 3
) -> list[tuple[str, float]]:
    """Built-in and torchvision architectures that best match ``sd``: ``(name, share of
    (key, shape) pairs in common)``, best first. Torchvision families (resnet, vgg, ...) are
    ranked by their first member's key layout; the 3 closest are compared in full."""
    ckpt = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    families: dict[str, list[str]] = {}
    for name in _torchvision_names():
        families.setdefault(re.match(r"[a-z]*", name).group(), []).append(name)

    def family_score(members: list[str]) -> float:
        shapes = _arch_shapes(min(members, key=lambda m: (len(m), m)))
        return _jaccard(_layout(ckpt), _layout(shapes)) if shapes else 0.0

    ranked = sorted(families.values(), key=family_score, reverse=True)
    scored = []
    for name in [*BUILTIN_MODELS, *(m for members in ranked[:3] for m in members)]:
        shapes = _arch_shapes(name)
        if name == exclude or not shapes:
            continue
        same = sum(shapes.get(k) == shape for k, shape in ckpt.items())
        share = same / len(ckpt.keys() | shapes.keys())
        scored.append((share, _jaccard(set(ckpt), set(shapes)), name))
    scored.sort(reverse=True)
    return [(name, share) for share, _, name in scored[:n] if share >= 0.2]


def _layout(shapes: Mapping[str, Any]) -> set[str]:
    """Key names with block indices blanked: ``layer1.#.conv1.weight``."""
    return {".".join("#" if p.isdigit() else p for p in k.split(".")) for k in shapes}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _probe(arch: str, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """The model's structure without the cost of initialising it (on the meta device)."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes=num_classes, in_channels=in_channels)
    except CheckpointError as exc:
        if exc.__cause__ is None:
            raise  # unknown arch, import errors: not about the meta device
    return build_model(arch, num_classes=num_classes, in_channels=in_channels)


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.state_dict().values())


def _shape(t: torch.Tensor | None) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if t is not None else "?"


def _misfit(
    expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """The missing, unexpected and shape-mismatched keys of ``sd`` against ``expected``."""
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    return missing, unexpected, mismatched


def _misfit_lines(expected, sd, missing, unexpected, mismatched) -> list[str]:
    lines = []
    if missing:
        lines.append("  missing: " + ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:5]))
    if unexpected:
        lines.append("  unexpected: " + ", ".join(f"{k} {_shape(sd[k])}" for k in unexpected[:5]))
    if mismatched:
        lines.append(
            "  shape mismatch: "
            + ", ".join(
                f"{k} checkpoint {_shape(sd[k])} vs model {_shape(expected[k])}"
                for k in mismatched[:5]
            )
        )
    return lines


def _check_fit(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str, kwargs: dict
) -> None:
    expected = model.state_dict()
    missing, unexpected, mismatched = _misfit(expected, sd)
    if not (missing or unexpected or mismatched):
        return
    built = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    lines = [
        f"{path} does not fit --arch {arch}{f' ({built})' if built else ''}: "
        f"{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} "
        "shape-mismatched keys.",
        *_misfit_lines(expected, sd, missing, unexpected, mismatched),
        "Check --arch (the checkpoint must be a state_dict of that architecture) and "
        "--num-classes; for a model built with other constructor arguments, pass --arch "
        "package.module:callable that builds it.",
    ]
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------
# load_checkpoint


def load_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    trust_checkpoint: bool = False,
) -> LoadedCheckpoint:
    """Read a checkpoint into a model in eval mode (see the module docstring).

    Without ``trust_checkpoint`` nothing in the file can run code: ``.pt`` files are read
    with ``weights_only=True``, a pickled module is refused with a ``CheckpointError``, and
    a compact file whose metadata names ``package.module:callable`` loads only when ``arch``
    names the same callable.
    ``num_classes`` / ``in_channels``, when None, are read from the state_dict (the last
    Linear/Conv's output size, the first Conv's input channels).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Pass the path of a .pt/.pth state_dict or a "
            ".safetensors file."
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} is not a file; pass a .pt/.pth or .safetensors file."
        )

    if _is_safetensors(path):
        header = _safetensors_header(path)
        if METADATA_KEY in header:
            meta = _parse_metadata(header, path)
            model = _load_compact(path, meta, _compact_arch(path, meta, arch, trust_checkpoint))
            return LoadedCheckpoint(
                model=model,
                arch=meta.get("arch"),
                format="compact",
                metadata=meta,
                build_kwargs=dict(meta.get("build_kwargs") or {}),
            )
        sd = _read_safetensors(path)
        fmt, container = "safetensors", None
        metadata: dict[str, Any] = {"safetensors_metadata": header}
        obj: dict[str, torch.Tensor] | nn.Module = sd
    else:
        loaded = _torch_load_safe_or_trusted(path, trust_checkpoint)
        obj, container = _extract(loaded, path)
        fmt = "pickled_module" if isinstance(obj, nn.Module) else "state_dict"
        metadata = {"container_key": container}
        if isinstance(loaded, Mapping) and container is not None:
            metadata["checkpoint_info"] = {
                k: v
                for k, v in loaded.items()
                if isinstance(v, (int, float, str, bool)) and isinstance(k, str)
            }

    if isinstance(obj, nn.Module):
        model = _unwrap(obj)
        if arch is None:
            cls = type(model)
            arch = f"{cls.__module__}:{cls.__qualname__}"
        model.eval()
        metadata["build_kwargs"] = {}
        return LoadedCheckpoint(model=model, arch=arch, format=fmt, metadata=metadata)

    sd = _strip_prefix(obj, "module.")
    sd = _strip_prefix(sd, "_orig_mod.")
    if arch is None:
        raise CheckpointError(
            f"{path} holds a state_dict (weights only), so the tool needs the architecture: "
            f"pass --arch resnet18 or pkg.module:callable ({_hint()})."
        )
    model, sd, kwargs = _fit_model(arch, sd, num_classes, in_channels, path)
    model.eval()
    metadata["build_kwargs"] = dict(kwargs)
    return LoadedCheckpoint(
        model=model, arch=arch, format=fmt, metadata=metadata, build_kwargs=kwargs
    )


def _torch_load_safe_or_trusted(path: Path, trust: bool) -> Any:
    if not trust:
        return _torch_load_safe(path)
    try:
        return _torch_load_safe(path)
    except _Refused:
        pass
    log.warning("loading %s with full unpickling (--trust-checkpoint)", path)
    obj = _torch_load_trusted(path)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        return obj
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an nn.Module or a state_dict.")


# ----------------------------------------------------------------------------
# The compact format: safetensors + metadata to rebuild pruned modules


_RESIZE_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
)


def _module_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    shapes = {}
    for name, module in model.named_modules():
        for cls, attrs in _RESIZE_ATTRS:
            if isinstance(module, cls):
                entry: dict[str, Any] = {"type": type(module).__name__}
                for attr in attrs:
                    value = getattr(module, attr)
                    entry[attr] = list(value) if isinstance(value, tuple) else value
                shapes[name] = entry
                break
    return shapes


def _activation_config(activations: Any) -> dict | None:
    """Normalise what was asked for: a dict with bits/ste/skip[/functional], or a SwapReport."""
    if activations is None:
        return None
    if hasattr(activations, "activation") and hasattr(activations, "skipped"):  # SwapReport
        cfg = dict(activations.activation)
        return {
            "bits": int(cfg.get("bits", 1)),
            "ste": cfg.get("ste", "clipped_relu"),
            "skip": list(activations.skipped),
            "functional": bool(getattr(activations, "functional", True)),
            "swapped": list(activations.swapped),
        }
    if not isinstance(activations, Mapping):
        raise TypeError(
            f"activations must be a dict or a SwapReport, not {type(activations).__name__}"
        )
    if activations.get("binarize") is False:
        return None
    out = {
        "bits": int(activations.get("bits", 1)),
        "ste": str(activations.get("ste", "clipped_relu")),
        "skip": list(activations.get("skip") or []),
        "functional": bool(activations.get("functional", True)),
    }
    if "swapped" in activations:
        out["swapped"] = list(activations["swapped"])
    return out


def _module_versions(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{module name: version}`` from a state_dict's ``_metadata`` (what torch.save keeps)."""
    metadata = getattr(state, "_metadata", None) or {}
    return {
        name: entry["version"]
        for name, entry in metadata.items()
        if isinstance(entry, Mapping) and type(entry.get("version")) is int
    }


# ----------------------------------------------------------------------------
# The compact format's metadata: every field's type and range

_INT_MAX = 2**31 - 1
_MAX_ENTRIES = 100_000  # modules, module versions, names in a list
_MAX_TEXT = 512
_MAX_DIM = 100_000  # one side of an input shape
_RESIZE_ATTR_NAMES = frozenset(a for _, attrs in _RESIZE_ATTRS for a in attrs)
_PREPROCESSING_KEYS = ("scale", "mean", "std", "input_shape")
_ACTIVATION_KEYS = ("bits", "ste", "skip", "functional", "swapped")
_ARCH_RE = re.compile(r"[A-Za-z_]\w*|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class _Invalid(Exception):
    """A metadata ``field`` that fails its check, and the ``problem``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, field: str, low: int = 0, high: int = _INT_MAX) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Invalid(field, f"must be an integer in [{low}, {high}], not {_short(value)}")
    return value


def _number(value: Any, field: str, positive: bool = False) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise _Invalid(field, f"must be {kind}, not {_short(value)}")
    return float(value)


def _text(value: Any, field: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _Invalid(
            field, f"must be a string of at most {limit} characters, not {_short(value)}"
        )
    return value


def _sized(value: Any, kind: type, field: str, low: int = 0, high: int = _MAX_ENTRIES) -> Any:
    if not isinstance(value, kind) or not low <= len(value) <= high:
        what = "an object" if kind is dict else "a list"
        raise _Invalid(field, f"must be {what} of {low} to {high} entries, not {_short(value)}")
    return value


def _scalar(value: Any, field: str) -> None:
    if value is None or type(value) is bool:
        return
    if type(value) is int:
        _int(value, field, -_INT_MAX - 1)
    elif type(value) is float:
        _number(value, field)
    elif isinstance(value, str):
        _text(value, field, 256)
    else:
        raise _Invalid(field, f"must be a number, string, boolean or null, not {_short(value)}")


def _check_build_kwargs(value: Any, field: str) -> None:
    for key, item in _sized(value, dict, field, high=32).items():
        where = f"{field}.{key[:64]}"
        if not key.isidentifier() or keyword.iskeyword(key) or len(key) > 64 or key == "arch":
            raise _Invalid(where, "is not a keyword argument name")
        if isinstance(item, list):
            for i, element in enumerate(_sized(item, list, where, high=64)):
                _scalar(element, f"{where}[{i}]")
        else:
            _scalar(item, where)


def _check_modules(value: Any, field: str) -> None:
    for name, spec in _sized(value, dict, field).items():
        where = f"{field}.{_text(name, field)}"
        _sized(spec, dict, where, 1, len(_RESIZE_ATTR_NAMES) + 1)
        kind = spec.get("type")
        if not isinstance(kind, str) or not kind.isidentifier() or len(kind) > 64:
            raise _Invalid(f"{where}.type", f"must be a module class name, not {_short(kind)}")
        for attr, size in spec.items():
            if attr == "type":
                continue
            if attr not in _RESIZE_ATTR_NAMES:
                raise _Invalid(f"{where}.{attr[:64]}", "is not a module size compressor restores")
            sizes = (
                _sized(size, list, f"{where}.{attr}", 1, 8) if isinstance(size, list) else [size]
            )
            for n in sizes:
                _int(n, f"{where}.{attr}")


def _check_activations(value: Any, field: str) -> None:
    from compressor.activations import MAX_BITS, STE_CHOICES

    if value is None:
        return
    for key in _sized(value, dict, field, high=len(_ACTIVATION_KEYS)):
        if key not in _ACTIVATION_KEYS:
            raise _Invalid(f"{field}.{key[:64]}", f"is not one of {', '.join(_ACTIVATION_KEYS)}")
    if "bits" in value:
        _int(value["bits"], f"{field}.bits", 1, MAX_BITS)
    if "ste" in value and value["ste"] not in STE_CHOICES:
        raise _Invalid(f"{field}.ste", f"must be one of {', '.join(STE_CHOICES)}")
    if "functional" in value and type(value["functional"]) is not bool:
        raise _Invalid(f"{field}.functional", "must be true or false")
    for key in ("skip", "swapped"):
        for i, name in enumerate(_sized(value.get(key, []), list, f"{field}.{key}")):
            _text(name, f"{field}.{key}[{i}]")


def _check_input_shape(value: Any, field: str, dims: tuple[int, int]) -> list[int]:
    for i, n in enumerate(_sized(value, list, field, *dims)):
        _int(n, f"{field}[{i}]", 1, _MAX_DIM)
    return value


def _check_extra(value: Any, field: str) -> None:
    if value is None:
        return
    _sized(value, dict, field)
    if "input_shape" in value:
        _check_input_shape(value["input_shape"], f"{field}.input_shape", (1, 4))


def _check_preprocessing(value: Any, field: str) -> None:
    if value is None:
        return
    for key in _sized(value, dict, field, high=len(_PREPROCESSING_KEYS)):
        if key not in _PREPROCESSING_KEYS:
            raise _Invalid(f"{field}.{key[:64]}", f"is not one of {', '.join(_PREPROCESSING_KEYS)}")
    if "scale" in value:
        _number(value["scale"], f"{field}.scale", positive=True)
    channels = None
    if "input_shape" in value:
        channels = _check_input_shape(value["input_shape"], f"{field}.input_shape", (3, 3))[0]
    for key in ("mean", "std"):
        if key in value:
            values = _sized(value[key], list, f"{field}.{key}", 1, 64)
            for i, v in enumerate(values):
                _number(v, f"{field}.{key}[{i}]", positive=key == "std")
            if channels is not None and len(values) not in (1, channels):
                raise _Invalid(
                    f"{field}.{key}", f"has {len(values)} values for {channels} input channels"
                )


def _check_module_versions(value: Any, field: str) -> None:
    for name, version in _sized(value, dict, field).items():
        _int(version, f"{field}.{_text(name, field)}")


def _check_arch(value: Any, field: str) -> None:
    if not _ARCH_RE.fullmatch(_text(value, field, 200)):
        raise _Invalid(
            field, f"must be an architecture name or package.module:callable, not {_short(value)}"
        )


_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "format_version": lambda v, f: _int(v, f, 1, COMPACT_FORMAT_VERSION),
    "compressor_version": lambda v, f: _text(v, f, 64),
    "arch": _check_arch,
    "build_kwargs": _check_build_kwargs,
    "modules": _check_modules,
    "activations": _check_activations,
    "extra": _check_extra,
    "preprocessing": _check_preprocessing,
    "module_versions": _check_module_versions,
}
_REQUIRED = ("format_version", "arch")


def _validate_metadata(meta: Any) -> None:
    """Raise :class:`_Invalid` naming the first field of ``meta`` of the wrong type or range,
    or a field the format does not have."""
    if not isinstance(meta, dict):
        raise _Invalid("compressor", f"must be a JSON object, not {_short(meta)}")
    for name in _REQUIRED:
        if name not in meta:
            raise _Invalid(name, "is missing")
    for name, value in meta.items():
        check = _FIELDS.get(name)
        if check is None:
            raise _Invalid(
                name[:64], f"is not a field of the compact format ({', '.join(_FIELDS)})"
            )
        check(value, name)


def save_compact(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    build_kwargs: Mapping[str, Any],
    activations: Any = None,
    extra: Mapping[str, Any] | None = None,
    preprocessing: dict | None = None,
) -> Path:
    """Write ``model`` (pruned) as safetensors with the metadata :func:`load` needs to rebuild it.

    ``preprocessing`` (``{"scale", "mean", "std", "input_shape"}``, the input the model
    expects: ``(x * scale - mean) / std`` per channel) is stored as ``metadata["preprocessing"]``.

    The file holds every entry of ``model.state_dict()`` (parameters and buffers, cloned so
    that tied tensors are accepted) and, under the metadata key ``"compressor"``, a JSON
    object: format version, ``arch``, ``build_kwargs``, the constructor attributes of every
    Conv/Linear/norm module after pruning, the activation config (``bits``, ``ste``,
    ``skip`` [, ``functional``, ``swapped``], or None), ``extra``, ``preprocessing`` and
    ``module_versions`` (the state_dict's per-module versions). Every field must pass the
    checks :func:`load` applies (a ``ValueError`` names the field). Written atomically.
    """
    from safetensors.torch import save_file

    from compressor import __version__

    model = _unwrap(model)
    path = Path(path)
    state = model.state_dict()
    meta = {
        "format_version": COMPACT_FORMAT_VERSION,
        "compressor_version": __version__,
        "arch": arch,
        "build_kwargs": dict(build_kwargs),
        "modules": _module_shapes(model),
        "activations": _activation_config(activations),
        "extra": dict(extra) if extra is not None else None,
        "module_versions": _module_versions(state),
    }
    if preprocessing is not None:
        meta["preprocessing"] = dict(preprocessing)
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_compact metadata must be JSON-able: {exc}") from exc
    try:
        _validate_metadata(json.loads(text))
    except _Invalid as exc:
        raise ValueError(f"save_compact: metadata field {exc.field!r} {exc.problem}") from None
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    if not path.parent.is_dir():
        raise OutputError(
            f"Cannot write {path}: the folder {path.parent} does not exist. Create it or pass "
            "another --out."
        )
    try:
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    except OSError as exc:
        raise OutputError(
            f"Cannot write {path}: {exc}. Check the folder's permissions and free space."
        ) from None
    return path


def _parse_metadata(header: Mapping[str, str], path: Path) -> dict:
    """The compressor metadata of a safetensors header, every field checked."""
    try:
        meta = json.loads(header[METADATA_KEY])
    except (KeyError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path} has unreadable compressor metadata ({str(exc)[:200]}); save it again."
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and not isinstance(version, bool):
        if version > COMPACT_FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was written in compact format version {version}; this compressor reads "
                f"version {COMPACT_FORMAT_VERSION}. Upgrade compressor to load it."
            )
    try:
        _validate_metadata(meta)
    except _Invalid as exc:
        raise CheckpointError(
            f"{path}: refused: its compressor metadata field {exc.field!r} {exc.problem}. "
            "compressor does not write such a file; it was altered or made elsewhere. Load "
            "weights you trust as a state_dict with --arch instead."
        ) from None
    return meta


def read_compact_metadata(path: str | os.PathLike) -> dict:
    """The metadata dict of a compact file written by :func:`save_compact` (every field
    checked; ``preprocessing`` and ``module_versions`` only where they were saved)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; pass a model.safetensors written by compressor."
        )
    if not _is_safetensors(path):
        raise CheckpointError(
            f"{path} is not a safetensors file written by compressor. Load other checkpoints "
            "with load_checkpoint(path, arch=...) / --arch."
        )
    header = _safetensors_header(path)
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} has no compressor metadata: it is a plain safetensors file. Load it with "
            "--arch NAME (load_checkpoint(path, arch=NAME))."
        )
    return _parse_metadata(header, path)


def load(
    path: str | os.PathLike, *, arch: str | None = None, trust_checkpoint: bool = False
) -> nn.Module:
    """Rebuild a compact model written by :func:`save_compact`, in eval mode.

    An architecture the metadata names by ``package.module:callable`` is imported only when
    ``arch`` names the same one or ``trust_checkpoint`` is True (see :func:`load_checkpoint`).
    """
    path = Path(path)
    meta = read_compact_metadata(path)
    return _load_compact(path, meta, _compact_arch(path, meta, arch, trust_checkpoint))


def _is_named_arch(arch: str) -> bool:
    """Built by name (compressor's built-ins, torchvision, registered timm models): no code
    chosen by a file. An unknown ``timm:NAME`` raises (naming close matches)."""
    if _is_timm(arch):
        return bool(_timm_name(arch))
    return (
        arch in BUILTIN_MODELS
        or (":" not in arch and arch in _torchvision_names())
        or _is_detection(arch)
    )


def _compact_arch(path: Path, meta: Mapping[str, Any], arch: str | None, trust: bool) -> str:
    """The architecture to rebuild a compact file with; refuses one importable by path
    that the user neither named (``arch``) nor trusted."""
    saved = meta["arch"]
    if _is_named_arch(saved):
        extra = sorted(set(meta.get("build_kwargs") or {}) - _TIMM_FILE_KWARGS)
        if _is_timm(saved) and extra and not trust:
            raise CheckpointError(
                f"{path}: refused: its metadata names {saved} with build_kwargs "
                f"{', '.join(extra)}; a weights file may only give a timm model its "
                "num_classes and in_channels. If you trust the file, pass --trust-checkpoint "
                "(trust_checkpoint=True)."
            )
        if arch is not None and arch != saved:
            log.warning(
                "%s is a compressor compact model of %s; ignoring --arch %s", path, saved, arch
            )
        return saved
    if arch == saved or (trust and arch is None):
        return saved
    named = f", not {arch}" if arch is not None else ""
    raise CheckpointError(
        f"{path}: refused: its metadata field 'arch' names {saved!r}{named}: code imported by "
        "path, and a weights file may not choose code to run. If you trust the file and that "
        f"code, pass --arch {saved} (or --trust-checkpoint); from Python, "
        f"compressor.load(path, arch={saved!r}) or trust_checkpoint=True."
    )


def _load_compact(path: Path, meta: dict, arch: str) -> nn.Module:
    kwargs = dict(meta.get("build_kwargs") or {})
    model = build_model(arch, **kwargs)
    act = meta.get("activations")
    if act:
        model = _swap_activations(model, act, path)
    sd = _read_safetensors(path)
    _resize(model, meta.get("modules") or {}, sd, path)
    _sync_heads(model, sd, path)
    _check_fit(model, sd, path, arch, kwargs)
    versions = meta.get("module_versions")
    if versions is not None:
        sd = _with_metadata(sd, {name: {"version": v} for name, v in versions.items()})
    _load_weights(model, sd, path, arch)
    return model.eval()


def _sync_heads(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Give every attention module whose packed q/k/v projection (timm's and Swin's ``qkv``,
    ``nn.MultiheadAttention``'s ``in_proj_weight``) was saved narrower its number of heads:
    rows / (3 x ``head_dim``), ``head_dim`` being the architecture's own (a removed head takes
    all its rows); ``nn.MultiheadAttention`` and Swin's attention become compressor's pruned
    modules, a pruned ``nn.MultiheadAttention`` with the original heads it kept where the file
    saved them (integer tensors, checked). Read from the restored sizes and tensors: the
    metadata names no code."""
    from compressor.attention import sync_heads

    try:
        changed = sync_heads(model, sd)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: refused: an attention module's saved heads: {exc}"
        ) from None
    if changed:
        log.info("%s: %d attention modules have fewer heads", path, len(changed))


def _swap_activations(model: nn.Module, act: Mapping[str, Any], path: Path) -> nn.Module:
    from compressor.activations import swap_activations

    report = swap_activations(
        model,
        bits=int(act.get("bits", 1)),
        ste=act.get("ste", "clipped_relu"),
        skip=list(act.get("skip") or []),
        functional=bool(act.get("functional", True)),
    )
    expected = act.get("swapped")
    if expected is not None and sorted(report.swapped) != sorted(expected):
        raise CheckpointError(
            f"{path}: rebuilding the activations swapped {sorted(report.swapped)[:5]} but the "
            f"saved model swapped {sorted(expected)[:5]}; the architecture's code changed since "
            "it was saved."
        )
    return report.model if report.model is not None else model


def _resize(
    model: nn.Module,
    modules: Mapping[str, Mapping[str, Any]],
    sd: Mapping[str, torch.Tensor],
    path: Path,
) -> None:
    """Give every listed module its saved constructor attributes, and every tensor whose
    shape changed an empty tensor of the saved shape (load_state_dict then fills it)."""
    for name, spec in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{path}: the saved model has a module {name!r} that --arch "
                f"{model.__class__.__name__} lacks; the architecture's code changed since it was saved."
            ) from None
        if type(module).__name__ != spec.get("type"):
            raise CheckpointError(
                f"{path}: module {name!r} is a {type(module).__name__} but was saved as a "
                f"{spec.get('type')}; the architecture's code changed since it was saved."
            )
        allowed = next((attrs for cls, attrs in _RESIZE_ATTRS if isinstance(module, cls)), ())
        for attr, value in spec.items():
            if attr == "type":
                continue
            if attr not in allowed:
                raise CheckpointError(
                    f"{path}: refused: its metadata field 'modules' sets {attr!r} of {name!r}, "
                    f"a {type(module).__name__}, which has no such size to restore."
                )
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    replaced: dict[int, torch.Tensor] = {}
    for key, tensor in sd.items():
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # reported as unexpected by _check_fit
        for store in (owner._parameters, owner._buffers):
            current = store.get(attr)
            if current is None or current.shape == tensor.shape:
                continue
            if id(current) in replaced:  # a tied tensor: keep it tied
                store[attr] = replaced[id(current)]
                continue
            empty = torch.empty(tensor.shape, dtype=current.dtype)
            new = (
                nn.Parameter(empty, requires_grad=current.requires_grad)
                if isinstance(current, nn.Parameter)
                else empty
            )
            replaced[id(current)] = new
            store[attr] = new
