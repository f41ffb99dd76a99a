"""A throwaway optimizer, registered the way a user adds one: torch's SGD with momentum. Importing
this module registers `optim.name: momentum_sgd` (see tests/optim/test_registry.py)."""

from pangu.optim import registry


def _build(optim, groups):
    import torch

    return torch.optim.SGD(groups, lr=optim.lr, momentum=0.9, weight_decay=optim.weight_decay, foreach=True)


if "momentum_sgd" not in registry.names():
    registry.register(registry.OptimizerSpec("momentum_sgd", _build, lambda optim, group: ("momentum_buffer",)))
