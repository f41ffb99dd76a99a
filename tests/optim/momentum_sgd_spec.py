"""A throwaway optimizer, registered the way a user adds one: torch's SGD with momentum, with an
option of its own (`optim.momentum`). Importing this module registers `optim.name: momentum_sgd`
(see tests/optim/test_registry.py); nothing else in pangu knows of it."""

from dataclasses import dataclass

from pangu.config.optim import OptimizerOptions
from pangu.optim import registry


@dataclass(frozen=True)
class MomentumOptions(OptimizerOptions):
    momentum: float = 0.9

    def validate(self) -> None:
        self.require(0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)")


def _build(optim, groups):
    import torch

    momentum = optim.options.momentum
    return torch.optim.SGD(groups, lr=optim.lr, momentum=momentum, weight_decay=optim.weight_decay, foreach=True)


if "momentum_sgd" not in registry.names():
    registry.register(
        registry.OptimizerSpec(
            "momentum_sgd", _build, lambda optim, group: ("momentum_buffer",), options=MomentumOptions
        )
    )
