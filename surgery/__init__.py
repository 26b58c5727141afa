"""surgery: model surgery and export for PyTorch and Hugging Face checkpoints."""

__version__ = "0.1.0"
