"""What the runtime the model is exported for prefers: the channel block of its kernels.

onnxruntime's CPU convolutions run fastest in MLAS's blocked ``NCHWc`` layout,
whose block is 8 channels with AVX2 and 16 with AVX-512. Its graph optimiser
pads a convolution's output channels up to a multiple of the block (the padded
channels cost MACs like real ones) and keeps a convolution whose input channels
are more than one block but not a multiple of it on the slower plain-layout
kernels. So a pruned layer is cheapest when its kept channel count is a
multiple of the block: ``prune.round_to: auto`` asks for that.

The block is read from onnxruntime itself, not guessed from CPU flags: a
one-convolution model with 4 output channels is optimised as onnxruntime would
optimise the exported model, and the blocked convolution's padded weight says
how many output channels one block holds (1 when the optimiser does not use the
blocked layout on this machine). When the model will run on another CPU than the
one compressing it, ``COMPRESSOR_CHANNEL_BLOCK=N`` (or ``prune.round_to: N``) names
that CPU's block instead.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from pathlib import Path

from compressor.errors import BadInputError

log = logging.getLogger(__name__)

_NCHWC_DOMAIN = "com.microsoft.nchwc"


BLOCK_ENV = "COMPRESSOR_CHANNEL_BLOCK"


def channel_block() -> int:
    """The channel block ``prune.round_to: auto`` rounds to: ``COMPRESSOR_CHANNEL_BLOCK``
    when set (the deployment CPU's), else :func:`probed_channel_block`."""
    value = os.environ.get(BLOCK_ENV)
    if value is None:
        return probed_channel_block()
    try:
        block = int(value)
    except ValueError:
        block = 0
    if block < 1:
        raise BadInputError(
            f"{BLOCK_ENV}={value!r} is not a channel count: set it to a positive integer "
            "(8 for AVX2, 16 for AVX-512) or unset it to probe onnxruntime on this machine."
        )
    return block


@functools.cache
def probed_channel_block() -> int:
    """onnxruntime's convolution channel block on this machine (1: no blocked layout)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((4, 16, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix="compressor-probe-") as tmp:
        source, optimised = Path(tmp) / "probe.onnx", Path(tmp) / "optimised.onnx"
        onnx.save(model, source)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(optimised)
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        result = onnx.load(optimised).graph
    shapes = {t.name: list(t.dims) for t in result.initializer}
    for n in result.node:
        if n.domain == _NCHWC_DOMAIN and n.op_type == "Conv" and n.input[1] in shapes:
            block = int(shapes[n.input[1]][0])  # 4 output channels padded up to one block
            log.info("onnxruntime convolutions use a channel block of %d here", block)
            return block
    return 1


def kept_in_blocks(keep: int, size: int, block: int) -> int:
    """``keep`` of a group's ``size`` units rounded up to a multiple of ``block`` (at most the
    whole group): the channels a runtime with that block computes anyway."""
    return min(size, math.ceil(keep / block) * block) if keep > 0 else 0


def resolve_round_to(value: int | str, *, latency_target: bool = False) -> int:
    """``prune.round_to``: an integer as given, ``auto`` as :func:`channel_block`; with a
    latency target at least the block (a latency model cannot predict the plain-layout
    kernels a count off the block falls back to)."""
    round_to = channel_block() if value == "auto" else int(value)
    return max(round_to, channel_block()) if latency_target else round_to
