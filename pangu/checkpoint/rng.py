"""Every RNG of a rank, in a checkpoint, without pickle: rng/rank{R}.json holds the states of
torch's CPU generator, of the tensor-parallel dropout streams (DeepSpeed's RNG tracker) and, on a
GPU, of the CUDA generator, as base64 bytes. Checkpoints written before hold rng/rank{R}.pt (a
torch.save file): it is loaded with `weights_only=True`, which rebuilds tensors and plain
containers only and runs no code. Either way the states are checked against the shapes this
process's generators have before the checkpoint is accepted: a damaged file makes the checkpoint
corrupt (the run falls back to an older one), never a traceback while restoring. DeepSpeed is
imported where the generators are touched: `pangu checkpoint verify` decodes without it."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pangu.checkpoint.store import CorruptCheckpointError, parse_json


@dataclass(frozen=True)
class RngFile:
    """rng/rank{R}.json: each state as base64 bytes."""

    torch: str
    tracker: dict[str, str]  # DeepSpeed's RNG tracker: one state per named stream
    cuda: str | None = None  # written where CUDA is available


@dataclass(frozen=True)
class RngStates:
    torch: torch.Tensor
    tracker: dict[str, torch.Tensor]
    cuda: torch.Tensor | None


def file_name(rank_file: str) -> str:
    return f"rng/{rank_file}.json"


def older_file_name(rank_file: str) -> str:
    """The name checkpoints written before rng/rank{R}.json gave the file (torch.save)."""
    return f"rng/{rank_file}.pt"


def current() -> RngStates:
    import deepspeed

    return RngStates(
        torch.get_rng_state(),
        deepspeed.checkpointing.get_cuda_rng_tracker().get_states(),
        torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    )


def encode(states: RngStates) -> bytes:
    """The contents of rng/rank{R}.json."""
    text = RngFile(
        torch=_b64(states.torch),
        tracker={name: _b64(state) for name, state in states.tracker.items()},
        cuda=None if states.cuda is None else _b64(states.cuda),
    )
    return json.dumps({k: v for k, v in dataclasses.asdict(text).items() if v is not None}).encode()


def decode(data: bytes, file: Path) -> RngStates:
    """The states of an RNG file (JSON, or an older checkpoint's torch.save file)."""
    if file.suffix == ".json":
        stored = parse_json(RngFile, data, file)
        try:
            states = RngStates(
                _tensor(stored.torch),
                {name: _tensor(state) for name, state in stored.tracker.items()},
                None if stored.cuda is None else _tensor(stored.cuda),
            )
        except ValueError as err:  # not base64 (binascii.Error), or empty
            raise CorruptCheckpointError(f"{file} is corrupt: {err}") from None
        return states
    return _decode_older(data, file)


def restore(states: RngStates) -> None:
    import deepspeed

    torch.set_rng_state(states.torch)
    deepspeed.checkpointing.get_cuda_rng_tracker().set_states(states.tracker)
    if states.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states.cuda)


def _decode_older(data: bytes, file: Path) -> RngStates:
    try:
        stored = torch.load(io.BytesIO(data), weights_only=True)  # tensors and containers only: no code runs
    except Exception as err:  # noqa: BLE001 - whatever the unpickler refuses, the file is not an RNG file
        raise CorruptCheckpointError(f"{file} is corrupt: not an RNG state file ({type(err).__name__})") from None
    tracker = stored.get("tracker") if isinstance(stored, dict) else None
    if not (
        isinstance(tracker, dict)
        and all(isinstance(name, str) and torch.is_tensor(state) for name, state in tracker.items())
        and torch.is_tensor(stored.get("torch"))
        and (stored.get("cuda") is None or torch.is_tensor(stored["cuda"]))
    ):
        raise CorruptCheckpointError(f"{file} is corrupt: it does not hold RNG states")
    return RngStates(stored["torch"], tracker, stored.get("cuda"))


def check(states: RngStates, file: Path) -> None:
    """The stored states fit this process's generators (seeded: seed_rng_streams): the same
    streams, each state of the same size."""
    now = current()
    pairs = [("torch", states.torch, now.torch)]
    if set(states.tracker) != set(now.tracker):
        raise CorruptCheckpointError(
            f"{file} is corrupt: it holds the RNG streams {sorted(states.tracker)}, this run has {sorted(now.tracker)}"
        )
    pairs += [(f"tracker {name!r}", state, now.tracker[name]) for name, state in states.tracker.items()]
    if states.cuda is not None and now.cuda is not None:
        pairs.append(("cuda", states.cuda, now.cuda))
    for what, stored, expected in pairs:
        if stored.dtype != torch.uint8 or stored.shape != expected.shape:
            raise CorruptCheckpointError(
                f"{file} is corrupt: its {what} RNG state is {stored.dtype} {tuple(stored.shape)}, "
                f"not uint8 {tuple(expected.shape)}"
            )


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
