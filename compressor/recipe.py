"""Recipes: the schema, YAML loading, ``--set key.path=value`` overrides, validation.

A recipe is a nested dict. The schema below is data: every key has a default and
a constraint (scikit-learn style: ``Interval``, ``Options``, ``ListOf``, a type,
optionally nullable), and one function (:func:`_invalid`) formats every message.

Precedence: schema defaults < recipe file < ``--set`` overrides. The result of
:func:`load_recipe` is fully resolved (every key present) and validated, and
:func:`dump_recipe` writes it back as YAML that loads to the same dict.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import yaml

from compressor.errors import RecipeError
from compressor.method.group_terms import GROUP_TERMS

__all__ = [
    "SCHEMA",
    "Interval",
    "ListOf",
    "Options",
    "Param",
    "apply_overrides",
    "builtin_recipes_dir",
    "default_recipe",
    "dump_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_source",
    "validate_recipe",
]


# ----------------------------------------------------------------------------
# Constraints


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (null, true, 'text', 1.5, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Interval:
    """A number in an interval. ``kind`` is ``int`` or ``float`` (a float accepts ints).

    ``closed`` is one of "both", "left", "right", "neither"; ``None`` bounds are open.
    """

    kind: type
    left: float | None
    right: float | None
    closed: str = "both"

    def check(self, value: Any) -> tuple[bool, Any]:
        if self.kind is int:
            if not _is_int(value):
                return False, value
            value = int(value)
        else:
            if not _is_real(value) or not math.isfinite(value):
                return False, value
            value = float(value)
        if self.left is not None:
            if value < self.left or (value == self.left and self.closed in ("right", "neither")):
                return False, value
        if self.right is not None:
            if value > self.right or (value == self.right and self.closed in ("left", "neither")):
                return False, value
        return True, value

    def __str__(self) -> str:
        noun = "an int" if self.kind is int else "a float"
        left_closed = self.closed in ("both", "left")
        right_closed = self.closed in ("both", "right")
        if self.left is not None and self.right is not None:
            lb = "[" if left_closed else "("
            rb = "]" if right_closed else ")"
            return f"{noun} in the range {lb}{_num(self.left)}, {_num(self.right)}{rb}"
        if self.left is not None:
            return f"{noun} {'>=' if left_closed else '>'} {_num(self.left)}"
        if self.right is not None:
            return f"{noun} {'<=' if right_closed else '<'} {_num(self.right)}"
        return noun


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (strings or ints; ``true`` is not ``1``)."""

    values: tuple

    def check(self, value: Any) -> tuple[bool, Any]:
        if isinstance(value, bool) and not any(isinstance(v, bool) for v in self.values):
            return False, value
        try:
            return value in self.values, value
        except TypeError:  # unhashable / incomparable
            return False, value

    def __str__(self) -> str:
        return "one of " + ", ".join(_show(v) for v in self.values)

    def suggestion(self, value: Any) -> str:
        if isinstance(value, str):
            names = {v.lower(): v for v in self.values if isinstance(v, str)}
            close = difflib.get_close_matches(value.lower(), list(names), n=1)
            if close:
                return f" Did you mean {names[close[0]]!r}?"
        return ""


@dataclass(frozen=True)
class Registered(Options):
    """One of the names in a registry (a dict filled by ``register_*`` decorators), read at
    check time, so a technique registered after import is a valid recipe value too."""

    registry: Mapping = None  # type: ignore[assignment]

    def __init__(self, registry: Mapping):
        object.__setattr__(self, "registry", registry)

    @property
    def values(self) -> tuple:  # type: ignore[override]
        return tuple(self.registry)


@dataclass(frozen=True)
class Str:
    """Any string; ``one_line`` refuses line breaks."""

    one_line: bool = False

    def check(self, value: Any) -> tuple[bool, Any]:
        if not isinstance(value, str):
            return False, value
        value = value.strip() if self.one_line else value
        if self.one_line and "\n" in value:
            return False, value
        return True, value

    def __str__(self) -> str:
        return "a one-line str" if self.one_line else "a str"


@dataclass(frozen=True)
class Bool:
    def check(self, value: Any) -> tuple[bool, Any]:
        return isinstance(value, bool), value

    def __str__(self) -> str:
        return "a bool (true or false)"


@dataclass(frozen=True)
class ListOf:
    """A list whose items all satisfy ``item``; ``length`` fixes its length."""

    item: Any
    length: int | None = None
    min_length: int = 0

    def check(self, value: Any) -> tuple[bool, Any]:
        if not isinstance(value, (list, tuple)):
            return False, value
        if self.length is not None and len(value) != self.length:
            return False, value
        if len(value) < self.min_length:
            return False, value
        out = []
        for item in value:
            ok, item = self.item.check(item)
            if not ok:
                return False, value
            out.append(item)
        return True, out

    def __str__(self) -> str:
        item = str(self.item)
        for article in ("an ", "a "):
            if item.startswith(article):
                item = item[len(article) :]
                break
        item = re.sub(r"^(int|float)\b", r"\1s", item).replace("str", "strings", 1)
        if self.length is not None:
            return f"a list of {self.length} {item}"
        if self.min_length:
            return f"a non-empty list of {item}"
        return f"a list of {item}"


@dataclass(frozen=True)
class _OffOr(Options):
    """Options whose first value is ``"off"``; YAML reads a bare ``off`` as false, so false is
    read as ``"off"`` too."""

    def check(self, value: Any) -> tuple[bool, Any]:
        if value is False:
            return True, "off"
        return super().check(value)


@dataclass(frozen=True)
class AutoOr:
    """``"auto"`` (resolved later, from the data or the machine) or a value satisfying
    ``constraint``."""

    constraint: Any

    def check(self, value: Any) -> tuple[bool, Any]:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return True, "auto"
        return self.constraint.check(value)

    def __str__(self) -> str:
        return f"'auto' or {self.constraint}"


@dataclass(frozen=True)
class Param:
    """One recipe key: its default and its constraint; ``nullable`` also allows null."""

    default: Any
    constraint: Any
    nullable: bool = False
    help: str = ""

    def describe(self) -> str:
        return f"null or {self.constraint}" if self.nullable else str(self.constraint)


def _float(left=None, right=None, closed="both"):
    return Interval(float, left, right, closed)


def _int(left=None, right=None, closed="both"):
    return Interval(int, left, right, closed)


# ----------------------------------------------------------------------------
# The schema: key -> Param, or key -> nested section.

SCHEMA: dict[str, Any] = {
    "description": Param("", Str(one_line=True), help="one line, shown by --list-recipes"),
    "penalty": {
        "individual": {
            "kind": Param("tl1", Options(("none", "l1", "l0", "tl1", "l1-l2"))),
            "strength": Param(0.1, _float(0), help="scale-free strength"),
            "lambda": Param(None, _float(0), nullable=True, help="raw lambda; overrides strength"),
            "a": Param(1.0, _float(0, closed="neither"), help="transformed-L1 parameter"),
            "alpha": Param(1.0, _float(0, 1, closed="right"), help="L1-L2 parameter"),
        },
        "group": {
            "kind": Param(
                "l0",
                Registered(GROUP_TERMS),
                help="the group term on each unit's norm: l1 (group lasso), l0 (group hard "
                "threshold), tl1 (transformed L1 of the norm)",
            ),
            "strength": Param(1.0, _float(0), help="scale-free strength"),
            "lambda": Param(None, _float(0), nullable=True, help="raw lambda; overrides strength"),
            "a": Param(1.0, _float(0, closed="neither"), help="tl1 group term parameter"),
            "weighting": Param(
                "auto",
                Options(("auto", "uniform", "size", "macs")),
                help="auto: size with lambda keys, macs with a MACs target, else uniform",
            ),
        },
    },
    "splitting": {
        "beta": Param(1.0, _float(0, closed="neither")),
        "beta_growth": Param(1.25, _float(1)),
        "beta_every": Param(1, _int(1), help="epochs"),
        "prox_every": Param(1, _int(1), help="steps"),
        "fused": Param(
            "auto",
            Options(("auto", "on", "off")),
            help="torch.compile the coupling and TL1 prox (auto: from 1M penalised weights)",
        ),
    },
    "train": {
        "epochs": Param(
            "auto",
            AutoOr(_int(0)),
            help="auto: 3, or more on a small training set, up to train.min_steps steps",
        ),
        "min_steps": Param(
            600, _int(1), help="the fewest SGD steps epochs: auto trains (whole epochs)"
        ),
        "batch_size": Param(128, _int(1)),
        "optimizer": Param("sgd", Options(("sgd", "adam", "adamw"))),
        "lr": Param(0.01, _float(0, closed="neither")),
        "momentum": Param(0.9, _float(0, 1, closed="left")),
        "weight_decay": Param(0.0, _float(0)),
        "schedule": Param("cosine", Options(("cosine", "constant", "step"))),
        "bn_recalibration_batches": Param(
            10, _int(0), help="training batches that re-estimate BatchNorm statistics"
        ),
        "max_steps_per_epoch": Param(None, _int(1), nullable=True),
        "val_fraction": Param(None, _float(0, 1, closed="neither"), nullable=True),
        "amp": Param(
            "auto",
            _OffOr(("off", "auto", "bf16", "fp16")),
            help="mixed precision of the training steps (forward and loss under autocast; "
            "weights, gradients and the method's updates stay float32). auto: bf16 on a CUDA "
            "device that has it, else fp16 with loss scaling; off on the CPU. fp16 needs CUDA",
        ),
        "channels_last": Param(
            "auto",
            Options(("auto", True, False)),
            help="training batches in channels-last memory format (convolutions in NHWC; "
            "the parameters and exports are unchanged). auto: on for models with 2-D "
            "convolutions on CUDA; YAML's on/off are true/false",
        ),
    },
    "target": {
        "macs": Param(None, _float(1, closed="neither"), nullable=True, help="reduction factor"),
        "params": Param(None, _float(1, closed="neither"), nullable=True, help="reduction factor"),
        "size": Param(None, _int(1), nullable=True, help="bytes"),
        "latency": Param(
            None,
            _float(0, closed="neither"),
            nullable=True,
            help="milliseconds: onnxruntime latency of the exported model on this machine, at "
            "latency_batch (a latency model calibrated before training steers the budget; "
            "channel counts go in the runtime's blocks, prune.round_to at least auto)",
        ),
        "latency_batch": Param(1, _int(1), help="batch size of target.latency"),
        "reach_fraction": Param(0.3, _float(0, 1, closed="right")),
        "balance": Param(
            "auto",
            AutoOr(_float(0, 1)),
            help="every group keeps at least this times the share a uniform ratio would keep. "
            "auto: 1 (the uniform floor) under a target given by the user, 0.75 when the "
            "accuracy seeker sets the budget",
        ),
        "allocation": Param(
            "uniform",
            Options(("uniform", "sensitivity")),
            help="how many units each group may lose to a budget. uniform: the balance floor "
            "alone; sensitivity: also capped by a one-shot sensitivity analysis before training "
            "(the damage of removing each group's weakest units, KL divergence on training "
            "batches; classifiers only), greedy on damage per MACs saved",
        ),
        "seek_accuracy_drop": Param(
            1.0,
            _float(0),
            nullable=True,
            help="percentage points; with no macs/params/size/latency target, seek the largest MACs "
            "reduction whose sparse model stays within this drop (null: no seeking, the group "
            "term's lambda alone decides). "
            "--max-accuracy-drop sets it; so does setting gates.max_accuracy_drop in a recipe "
            "or with --set when this key is not set",
        ),
        "seek_margin": Param(
            1.0,
            _float(0),
            help="standard errors of the drop the seeker measures on the validation split "
            "(paired per sample with the input model) kept below seek_accuracy_drop: a check "
            "counts as within when drop + seek_margin * stderr <= seek_accuracy_drop "
            "(0: the measured drop alone; tasks without per-sample scores have none)",
        ),
        "seek_rollback": Param(
            "model",
            Options(("model", "channels")),
            help="what the seeker puts back after a check over the allowance: model (every "
            "weight as at the last check within it) or channels (only the slices of the "
            "channels zeroed since; the rest keeps its training)",
        ),
    },
    "prune": {
        "round_to": Param(
            "auto",
            AutoOr(_int(1)),
            help="kept channels per group in multiples of this (or the whole group), chosen by "
            "the budget from the first step. auto: onnxruntime's convolution channel block on "
            "this machine (8 with AVX2, 16 with AVX-512; compressor.runtime)",
        ),
        "keep": Param([], ListOf(Str()), help="module-name fnmatch patterns"),
    },
    "distill": {
        "weight": Param(
            0.7,
            _float(0, 1),
            help="share of the loss that matches the input model's softened outputs (0: off)",
        ),
        "temperature": Param(4.0, _float(0, closed="neither")),
    },
    "recover": {
        "epochs": Param(0, _int(0)),
        "lr": Param(0.001, _float(0, closed="neither")),
    },
    "activations": {
        "binarize": Param(False, Bool()),
        "bits": Param(1, Options((1, 2, 4))),
        "ste": Param("clipped_relu", Options(("clipped_relu", "relu", "identity"))),
        "skip": Param([], ListOf(Str()), help="module-name fnmatch patterns"),
        "calibration_batches": Param(
            10,
            _int(0),
            help="training batches that set each channel's scale and threshold before "
            "training (0: alpha = 1, theta = 0)",
        ),
        "switch_fraction": Param(
            0.5,
            _float(0, 1),
            help="share of training over which the activations go from ReLU to quantised "
            "(0: quantised from the first step)",
        ),
        "functional": Param(
            True,
            Bool(),
            help="also quantise functional ReLUs (F.relu, torch.relu, x.relu()) by tracing the "
            "model with torch.fx; false: nn.ReLU modules only, functional ones stay full "
            "precision (for models torch.fx cannot trace, such as torchvision's detectors)",
        ),
        "switch_order": Param(
            "together",
            Options(("together", "input_first")),
            help="together: every activation switches at once; input_first: one after "
            "another from the input side, each over its share of the switch",
        ),
    },
    "export": {
        "opset": Param(18, _int(13, 23)),
        "verify_samples": Param(64, _int(1)),
        "latency_threads": Param(
            None,
            _int(1),
            nullable=True,
            help="onnxruntime intra-op threads for every latency measured (the report's, "
            "the INT8 model's, target.latency's calibration); null: onnxruntime's default "
            "(all cores). 1 is steadier on a shared machine",
        ),
        "int8": Param(
            "off",
            _OffOr(("off", "static", "dynamic")),
            help="also ship model.int8.onnx, quantized from model.onnx with onnxruntime "
            "(static: calibrated on training images; dynamic: activations quantized at run "
            "time) when it passes gates.max_accuracy_drop; --int8 sets it",
        ),
        "int8_required": Param(
            False,
            Bool(),
            help="an INT8 model that fails the accuracy gate fails the run (exit 3) instead "
            "of being left out",
        ),
    },
    "gates": {
        "max_accuracy_drop": Param(
            5.0,
            _float(0),
            nullable=True,
            help="percentage points; a larger drop fails the run (exit 3); null: no gate",
        ),
    },
    "data": {
        "mean": Param(None, ListOf(_float(), min_length=1), nullable=True),
        "std": Param(None, ListOf(_float(0, closed="neither"), min_length=1), nullable=True),
        "input_shape": Param(None, ListOf(_int(1), length=3), nullable=True, help="[C, H, W]"),
        "augment": Param(
            "auto",
            Options(("auto", "none", "standard")),
            help="training-split augmentation. standard: random resized crop and flip for "
            "images of side >= 64, pad-by-side/8 random crop and flip for smaller ones; image "
            "folders are then evaluated resized by 256/224 and center-cropped. auto: standard "
            "for image folders, none for in-memory arrays (npz, idx, CIFAR batches)",
        ),
        "workers": Param(
            "auto",
            AutoOr(_int(0)),
            help="data-loader worker processes (--workers). auto: for image folders (decoded "
            "per image) the usable CPUs minus one, at most 8; 0 for in-memory arrays, where "
            "workers only add copies. 0: load in the training process",
        ),
    },
}


def default_recipe() -> dict:
    """The schema defaults as a fresh nested dict."""

    def walk(node):
        if isinstance(node, Param):
            return copy.deepcopy(node.default)
        return {k: walk(v) for k, v in node.items()}

    return walk(SCHEMA)


# ----------------------------------------------------------------------------
# Messages


def _where(source: str | None) -> str:
    return f" ({source})" if source else ""


def _invalid(
    path: str, param: Param, value: Any, source: str | None, hint: str = ""
) -> RecipeError:
    """The one formatter of value errors: key, where it was set, what is allowed, what we got."""
    return RecipeError(
        f"`{path}`{_where(source)} must be {param.describe()}. Got {_show(value)} instead.{hint}"
    )


def _unknown_key(path: str, section: Mapping, source: str | None) -> RecipeError:
    parent, _, key = path.rpartition(".")
    allowed = list(section)
    close = difflib.get_close_matches(key, allowed, n=1)
    prefix = f"{parent}." if parent else ""
    msg = f"Unknown recipe key `{path}`{' ' + source if source else ''}."
    if close:
        msg += f" Did you mean `{prefix}{close[0]}`?"
    where = f"under `{parent}`" if parent else "at the top level"
    msg += f" Allowed keys {where}: {', '.join(allowed)}."
    return RecipeError(msg)


# ----------------------------------------------------------------------------
# Resolution: layers (dict, source) merged over the defaults, then validated.


def _check_keys(raw: Any, schema: Mapping, prefix: str, source: str | None) -> None:
    if not isinstance(raw, Mapping):
        what = f"`{prefix}`" if prefix else "A recipe"
        raise RecipeError(
            f"{what}{_where(source)} must be a mapping of keys "
            f"(allowed: {', '.join(schema)}). Got {_show(raw)} instead."
        )
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(path, schema, source)
        node = schema[key]
        if not isinstance(node, Param):
            _check_keys(value, node, path, source)


def _lookup(raw: Mapping, keys: Sequence[str]) -> tuple[bool, Any]:
    node: Any = raw
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _resolve(layers: Sequence[tuple[Mapping, str | None]]) -> dict:
    for raw, source in layers:
        _check_keys(raw, SCHEMA, "", source)

    def walk(schema: Mapping, keys: tuple[str, ...]) -> dict:
        out = {}
        for key, node in schema.items():
            path = keys + (key,)
            if not isinstance(node, Param):
                out[key] = walk(node, path)
                continue
            value, source = node.default, None
            for raw, layer_source in layers:
                found, v = _lookup(raw, path)
                if found:
                    value, source = v, layer_source
            out[key] = _check_value(".".join(path), node, value, source)
        return out

    recipe = walk(SCHEMA, ())
    _mirror_explicit_gate(recipe, layers)
    _check_cross(recipe)
    return recipe


def _mirror_explicit_gate(recipe: dict, layers: Sequence[tuple[Mapping, str | None]]) -> None:
    """An accuracy gate the user sets (a recipe file, --set) also asks for the accuracy seeker,
    as it did before the gate had a default; the default gate alone never seeks.

    The seeker has its own key (``target.seek_accuracy_drop``) rather than a sentinel
    default, so the resolved recipe (``recipe.yaml``) states both and repeats the run as is.
    """

    def set_by_user(keys: tuple[str, ...]) -> bool:
        return any(_lookup(raw, keys)[0] for raw, _ in layers)

    if set_by_user(("gates", "max_accuracy_drop")) and not set_by_user(
        ("target", "seek_accuracy_drop")
    ):
        recipe["target"]["seek_accuracy_drop"] = recipe["gates"]["max_accuracy_drop"]


def _check_value(path: str, param: Param, value: Any, source: str | None) -> Any:
    if value is None and param.nullable:
        return None
    ok, converted = param.constraint.check(value)
    if not ok:
        hint = ""
        if isinstance(param.constraint, Options):
            hint = param.constraint.suggestion(value)
        elif isinstance(param.constraint, ListOf) and not isinstance(value, (list, tuple, Mapping)):
            hint = f" Write a YAML list, e.g. [{value}]." if value is not None else ""
        raise _invalid(path, param, value, source, hint)
    return copy.deepcopy(converted)


def _check_cross(recipe: dict) -> None:
    if recipe["export"]["int8_required"] and recipe["export"]["int8"] == "off":
        raise RecipeError(
            "`export.int8_required` is true but `export.int8` is off: set `export.int8` to "
            "static or dynamic (or pass --int8), or drop `export.int8_required`."
        )
    data = recipe["data"]
    mean, std, shape = data["mean"], data["std"], data["input_shape"]
    if (mean is None) != (std is None):
        raise RecipeError(
            "`data.mean` and `data.std` must be set together (one per input channel). "
            f"Got mean={_show(mean)} and std={_show(std)} instead."
        )
    if mean is not None and len(mean) != len(std):
        raise RecipeError(
            "`data.mean` and `data.std` must have the same length (one value per input "
            f"channel). Got {len(mean)} and {len(std)} values instead."
        )
    if mean is not None and shape is not None and len(mean) != shape[0]:
        raise RecipeError(
            f"`data.mean` and `data.std` must have one value per input channel; "
            f"`data.input_shape` has {shape[0]} channels. Got {len(mean)} values instead."
        )


def validate_recipe(recipe: Mapping, *, source: str | None = None) -> dict:
    """Check ``recipe`` (possibly partial) against the schema; return it fully resolved.

    Missing keys take their defaults; ints where floats are expected become floats.
    ``source`` (e.g. a file name) is named in messages. Raises :class:`RecipeError` naming the key, ``source`` and what is allowed.
    """
    return _resolve([(recipe, _source_phrase(source))])


def _source_phrase(source: str | None) -> str | None:
    """'in recipes/x.yaml' for files, 'from the command line' for anything else."""
    if not source:
        return None
    if source.startswith(("in ", "from ")):
        return source
    if "/" in source or "\\" in source or source.endswith((".yaml", ".yml")):
        return f"in {source}"
    return f"from {source}"


# ----------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and
    refuses duplicate keys instead of silently keeping the last one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"Cannot parse {source}{where}: {problem}. Fix the YAML syntax there "
            "(indent nested keys with spaces, write `key: value`, quote strings containing ': ')."
        ) from None


# ----------------------------------------------------------------------------
# Files and built-ins


def builtin_recipes_dir() -> Path:
    return Path(__file__).parent / "recipes"


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))


def recipe_source(name_or_path: str | Path) -> Path:
    """The file a recipe name or path refers to (a built-in name, or a path to a .yaml file)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = "/" in text or "\\" in text or path.suffix in (".yaml", ".yml")
    builtins = _builtin_names()
    if looks_like_path or path.is_file():
        if path.is_file():
            return path
        if path.is_dir():
            raise RecipeError(
                f"Recipe {text} is a directory; pass a .yaml file or a built-in name."
            )
        if not looks_like_path and text in builtins:
            return builtin_recipes_dir() / f"{text}.yaml"
        raise RecipeError(
            f"Recipe file {text} does not exist. Check the path, or use a built-in recipe: "
            f"{', '.join(builtins)}."
        )
    if text in builtins:
        return builtin_recipes_dir() / f"{text}.yaml"
    close = difflib.get_close_matches(text, builtins, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(
        f"Unknown recipe {text!r}.{hint} Built-in recipes: {', '.join(builtins)}; "
        "or pass a path to a .yaml file."
    )


def _read_recipe_file(path: Path) -> tuple[Mapping, str]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"Cannot read recipe {source}: {exc}. Pass a readable UTF-8 .yaml file."
        ) from None
    raw = _parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(
            f"Recipe {source} must be a YAML mapping of keys (allowed: {', '.join(SCHEMA)}). "
            f"Got {_show(raw)} instead."
        )
    return raw, source


def _parse_override(item: str) -> tuple[Mapping, str]:
    source = f"from --set {item}"
    key, eq, value_text = str(item).partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"Cannot parse --set {item!r}: write `key.path=value`, e.g. "
            "`--set train.epochs=3` or `--set prune.keep=[conv1]`."
        )
    value = (
        _parse_yaml(value_text.strip(), f"the value of --set {item!r}")
        if value_text.strip()
        else None
    )
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    # An override of a whole section must be a mapping (checked by _check_keys).
    return nested, source


def apply_overrides(recipe: Mapping, overrides: Sequence[str]) -> dict:
    """Apply ``["train.epochs=3", "prune.keep=[conv1]"]`` on top of ``recipe``.

    Values are parsed as YAML. Returns a new, fully resolved and validated dict.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    layers: list[tuple[Mapping, str | None]] = [(recipe, None)]
    layers += [_parse_override(item) for item in overrides]
    return _resolve(layers)


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Load a built-in recipe by name or a .yaml file, apply ``--set`` overrides, validate.

    Precedence: schema defaults < file < overrides. Returns a fully resolved nested dict.
    """
    path = recipe_source(name_or_path)
    raw, source = _read_recipe_file(path)
    if isinstance(overrides, str):
        overrides = [overrides]
    layers: list[tuple[Mapping, str | None]] = [(raw, f"in {source}")]
    layers += [_parse_override(item) for item in overrides]
    return _resolve(layers)


def list_recipes() -> list[tuple[str, str]]:
    """Built-in recipes as ``(name, description)``, sorted by name."""
    return [(name, load_recipe(name)["description"]) for name in _builtin_names()]


def dump_recipe(recipe: Mapping) -> str:
    """The recipe as YAML (schema order) that :func:`load_recipe` reads back unchanged."""
    resolved = validate_recipe(recipe)
    return yaml.dump(resolved, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=10_000)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (``keep: [conv1, fc]``)."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)
