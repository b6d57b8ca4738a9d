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


def load(path, *, arch=None, trust_checkpoint=False):
    """Rebuild the compact ``nn.Module`` from compressor's ``model.safetensors``.

    A model the file names by ``package.module:callable`` is imported only when ``arch``
    names it too or ``trust_checkpoint=True``; see :func:`compressor.checkpoint.load`.
    """
    from compressor.checkpoint import load as _load

    return _load(path, arch=arch, trust_checkpoint=trust_checkpoint)


__all__ = ["__version__", "compress", "load"]
