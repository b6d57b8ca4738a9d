"""The resolved recipe as typed, frozen objects.

:mod:`compressor.recipe` owns the schema (every key's default and constraint,
written once), YAML loading, ``--set`` and validation; :meth:`Recipe.from_dict`
turns its fully resolved dict into these objects, so the rest of the code reads
``recipe.train.lr`` instead of ``recipe["train"]["lr"]``. The classes have no
defaults of their own: every field comes from the resolved recipe, and a test
checks that their fields and the schema's keys are the same.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _key(name: str) -> dict:
    """Field metadata: the recipe key when it is not a Python name (``lambda``)."""
    return {"key": name}


@dataclass(frozen=True)
class IndividualPenalty:
    kind: str  # none | l1 | l0 | tl1 | l1-l2
    strength: float
    lam: float | None = field(metadata=_key("lambda"))
    a: float
    alpha: float


@dataclass(frozen=True)
class GroupPenalty:
    kind: str  # a registered group term: l1 | l0 | tl1
    strength: float
    lam: float | None = field(metadata=_key("lambda"))
    a: float
    weighting: str  # auto | uniform | size | macs


@dataclass(frozen=True)
class Penalty:
    individual: IndividualPenalty
    group: GroupPenalty


@dataclass(frozen=True)
class Splitting:
    beta: float
    beta_growth: float
    beta_every: int
    prox_every: int
    fused: str


@dataclass(frozen=True)
class Train:
    epochs: int | str  # an int >= 0, or "auto" (compressor.train.resolve_epochs)
    min_steps: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    bn_recalibration_batches: int
    max_steps_per_epoch: int | None
    val_fraction: float | None
    amp: str  # auto | off | bf16 | fp16 (compressor.train.resolve_amp)
    channels_last: bool | str  # auto, true or false (compressor.train.resolve_precision)


@dataclass(frozen=True)
class Target:
    macs: float | None
    params: float | None
    size: int | None
    latency: float | None  # milliseconds at latency_batch, onnxruntime on this machine
    latency_batch: int
    reach_fraction: float
    balance: float | str  # in [0, 1], or "auto" (compressor.method.budget.resolve_balance)
    allocation: str  # uniform | sensitivity: how many units each group may lose
    seek_accuracy_drop: float | None
    seek_margin: float  # standard errors of the measured drop kept below seek_accuracy_drop
    seek_rollback: str  # model | channels: what an over-budget check puts back


@dataclass(frozen=True)
class Prune:
    round_to: int | str  # an int >= 1, or "auto" (compressor.runtime.resolve_round_to)
    keep: tuple[str, ...]


@dataclass(frozen=True)
class Distill:
    weight: float
    temperature: float


@dataclass(frozen=True)
class Recover:
    epochs: int
    lr: float


@dataclass(frozen=True)
class Activations:
    binarize: bool
    bits: int
    ste: str
    skip: tuple[str, ...]
    calibration_batches: int
    switch_fraction: float
    switch_order: str
    functional: bool  # functional ReLUs too (torch.fx tracing), or nn.ReLU modules only


@dataclass(frozen=True)
class Export:
    opset: int
    verify_samples: int
    latency_threads: int | None  # onnxruntime intra-op threads when timing (None: its default)
    int8: str  # off | static | dynamic
    int8_required: bool


@dataclass(frozen=True)
class Gates:
    max_accuracy_drop: float | None


@dataclass(frozen=True)
class Data:
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_shape: tuple[int, ...] | None
    augment: str  # auto | none | standard (training split only)
    workers: int | str  # loader processes: an int >= 0, or "auto"


@dataclass(frozen=True)
class Recipe:
    description: str
    penalty: Penalty
    splitting: Splitting
    train: Train
    target: Target
    prune: Prune
    distill: Distill
    recover: Recover
    activations: Activations
    export: Export
    gates: Gates
    data: Data

    @classmethod
    def from_dict(cls, resolved: Mapping[str, Any]) -> Recipe:
        """From :func:`compressor.recipe.load_recipe`'s resolved dict (every key present)."""
        return _build(cls, resolved)

    def to_dict(self) -> dict:
        """Back to the recipe's nested dict (the form ``recipe.dump_recipe`` writes)."""
        return _unbuild(self)


def recipe_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _build(cls, data: Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = data[recipe_key(f)]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            value = _build(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def _unbuild(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _unbuild(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[recipe_key(f)] = value
    return out
