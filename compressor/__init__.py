"""compressor: compress a trained PyTorch CNN into a smaller, verified ONNX model.

import compressor
report = compressor.compress("model.pt", arch="resnet18", data="data/", target_macs=4)
model = compressor.load("compressed/model.safetensors")
"""

__version__ = "0.1.0"


def compress(checkpoint, **kwargs):
    """Compress a checkpoint; see :func:`compressor.pipeline.compress`."""
    from compressor.pipeline import compress as _compress

    return _compress(checkpoint, **kwargs)


def load(path):
    """Rebuild the compact ``nn.Module`` from compressor's ``model.safetensors``."""
    from compressor.checkpoint import load as _load

    return _load(path)


__all__ = ["__version__", "compress", "load"]
