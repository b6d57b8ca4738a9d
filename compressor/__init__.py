"""compressor: compress a trained PyTorch CNN into a smaller, verified ONNX model."""

__version__ = "0.1.0"
