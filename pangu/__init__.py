"""pangu: pretraining PanGu-α-style language models, from a laptop CPU to thousands of GPUs."""

from pangu.optim import registry as _registry  # noqa: F401  registers the optimizers and their config checks

__version__ = "0.1.0"


def load(path):
    """`model, tokenizer = pangu.load(DIR)` for any pangu checkpoint, checkpoints or run directory:
    the network as a plain-torch `PanguAlpha` in this process (no torch.distributed needed)."""
    from pangu.checkpoint.weights import load as _load

    return _load(path)
