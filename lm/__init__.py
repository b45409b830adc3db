"""lm: a PyTorch Lightning framework for the architecture families of modern language models."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load a trained model from a checkpoint (file or run folder), in eval mode."""
    from lm.checkpoint import load_model as _load

    return _load(path, device)


__all__ = ["load_model", "__version__"]
