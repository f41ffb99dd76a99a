"""MindSpore parallel-strategy files (`*_ckpt_strategy.ckpt`, `strategy.ckpt`), without MindSpore.

A strategy file is a protobuf `ParallelStrategyMap` (mindspore/ccsrc/utils/node_strategy.proto)
that records, for every parameter, how MindSpore split it over the devices (`ParameterStrategy`),
and for every operator how its inputs were sharded (`OperatorStrategy`). `slice_of_rank` turns a
parameter's layout into the part of the full tensor one device holds, with or without the
parallel optimizer's further cut (`optimizer_sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pangu.convert.mindspore import wire

PathLike = str | Path


@dataclass(frozen=True)
class ParameterStrategy:
    """How MindSpore laid one parameter out over the devices (a `ParallelLayouts`).

    The devices (ranks 0..N-1) are arranged in a row-major grid of shape
    `dev_matrix`: the LAST device-matrix dimension varies fastest with the
    rank. `tensor_map` has one entry per tensor dimension; entry m >= 0 says
    "this tensor dimension is split evenly into dev_matrix[-1 - m] pieces,
    and a device takes the piece given by its coordinate along that
    device-matrix dimension" (m counts device-matrix dimensions from the
    right); -1 means not split. Devices whose coordinates differ only along
    unused device-matrix dimensions hold the same slice (replicas).

    Example (PanGu-alpha 2.6B, 512 devices): dev_matrix (64, 8) is 64-way
    data x 8-way model parallel, rank = 8 * data_index + model_index;
    tensor_map (0, -1) splits dimension 0 into 8 by the model index.

    With the parallel optimizer (`opt_weight_shard_step` > 0) the replicas of
    a slice additionally split it along dimension 0: the group is the ranks
    holding the same slice, `opt_weight_shard_step` apart, and
    `opt_weight_shard_size` of them (-1: all the replicas).

    `field` (> 0 only for field-sliced embedding lookups), `param_split_shape`
    (uneven sizes along dimension 0) and `indices_offset` are stored for
    completeness; the PanGu-alpha files leave them 0 / empty.
    """

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[int, ...]
    field: int = 0
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0
    param_split_shape: tuple[int, ...] = ()
    indices_offset: tuple[int, ...] = ()

    def model_split(self, dimension: int) -> int:
        """Into how many model-parallel pieces tensor dimension `dimension` is cut (1: not cut)."""
        entry = self.tensor_map[dimension]
        return 1 if entry == -1 else self.dev_matrix[-1 - entry]


@dataclass(frozen=True)
class OperatorStrategy:
    """The sharding MindSpore chose for one operator's inputs (a `ParallelStrategyItem`).

    Keyed in the file by "<Operator>_<parameter name>", e.g.
    "MatMul_backbone.blocks.0.output.mapping.weight"; one tuple per operator
    input giving how many pieces each of its dimensions is cut into.
    """

    stage: int
    input_strategies: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class StrategyCheckpoint:
    """Everything in a parallel-strategy file (a `ParallelStrategyMap`), in file order."""

    current_stage: int
    operator_strategies: dict[str, OperatorStrategy]
    parameters: dict[str, ParameterStrategy]


def read_parallel_strategy(path: PathLike) -> dict[str, ParameterStrategy]:
    """The per-parameter layouts of a MindSpore parallel-strategy file.

    The 2021 PanGu-alpha files hold the model's parameters and, under the
    prefixes "adam_m." and "adam_v.", the optimizer moments'.
    """
    return read_strategy_checkpoint(path).parameters


def read_strategy_checkpoint(path: PathLike) -> StrategyCheckpoint:
    """Decode a whole parallel-strategy file; `ValueError` names the file and offset on bad input.

    Field numbers (verified against the released PanGu-alpha files)::

        ParallelStrategyMap  { 1: uint32 current_stage;
                               2: repeated ParallelStrategyItem; 3: repeated ParallelLayoutItem }
        ParallelStrategyItem { 1: string node_name; 2: ParallelStrategys }
        ParallelStrategys    { 1: uint32 stage; 2: repeated ParallelStrategy { 1: repeated uint32 dim } }
        ParallelLayoutItem   { 1: string param_name; 2: ParallelLayouts }
        ParallelLayouts      { 1: DevMatrix; 2: TensorMap; 3: ParamSplitShape; 4: IndicesOffset
                               (each { 1: repeated int dim }, written once);
                               5: int32 field; 6: int32 opt_weight_shard_step; 7: int32 opt_weight_shard_size }
    """
    path = Path(path)
    data = path.read_bytes()  # small: a few hundred bytes per parameter
    if not data:
        raise ValueError(f"{path}: file is empty")
    try:
        return _decode_strategy_map(data)
    except wire.WireFormatError as error:
        raise ValueError(f"{path}: not a readable MindSpore parallel-strategy file: {error}") from error


def write_parallel_strategy(
    path: PathLike,
    parameters: Mapping[str, ParameterStrategy],
    *,
    operator_strategies: Mapping[str, OperatorStrategy] | None = None,
    current_stage: int = 0,
) -> None:
    """Write a parallel-strategy file that MindSpore (and `read_strategy_checkpoint`) can read.

    Fields are written in MindSpore's order and encoding, so rewriting a
    decoded file reproduces it byte for byte.
    """
    out = bytearray(wire.encode_varint_field(1, current_stage))
    for node_name, operator in (operator_strategies or {}).items():
        strategys = wire.encode_varint_field(1, operator.stage) + b"".join(
            wire.encode_len_field(2, wire.encode_repeated_varints(1, dims)) for dims in operator.input_strategies
        )
        item = wire.encode_string_field(1, node_name) + wire.encode_len_field(2, strategys)
        out += wire.encode_len_field(2, item)
    for param_name, strategy in parameters.items():
        layouts = (
            wire.encode_len_field(1, wire.encode_repeated_varints(1, strategy.dev_matrix))
            + wire.encode_len_field(2, wire.encode_repeated_varints(1, strategy.tensor_map))
            + wire.encode_len_field(3, wire.encode_repeated_varints(1, strategy.param_split_shape))
            + wire.encode_len_field(4, wire.encode_repeated_varints(1, strategy.indices_offset))
            + wire.encode_varint_field(5, strategy.field)
            + wire.encode_varint_field(6, strategy.opt_weight_shard_step)
            + wire.encode_varint_field(7, strategy.opt_weight_shard_size)
        )
        item = wire.encode_string_field(1, param_name) + wire.encode_len_field(2, layouts)
        out += wire.encode_len_field(3, item)
    Path(path).write_bytes(out)


def _fields_by_number(data: bytes, start: int, end: int) -> dict[int, list[wire.Field]]:
    fields: dict[int, list[wire.Field]] = {}
    for item in wire.iter_fields(data, start, end):
        fields.setdefault(item.number, []).append(item)
    return fields


def _single_scalar(fields: dict[int, list[wire.Field]], number: int) -> int:
    items = fields.get(number, [])
    if not items:
        return 0  # proto2 default; older MindSpore versions lack some fields
    if items[-1].wire_type != wire.WireType.VARINT:
        raise wire.WireFormatError(f"field {number} should be an integer", items[-1].offset)
    return wire.to_signed64(items[-1].value)  # proto2: the last occurrence wins


def _required_string(data: bytes, fields: dict[int, list[wire.Field]], number: int, offset: int) -> str:
    items = fields.get(number, [])
    if len(items) != 1 or items[0].wire_type != wire.WireType.LEN:
        raise wire.WireFormatError(f"expected one string in field {number}", offset)
    return wire.decode_string(data, items[0])


def _required_message(fields: dict[int, list[wire.Field]], number: int, offset: int) -> wire.Field:
    items = fields.get(number, [])
    if len(items) != 1 or items[0].wire_type != wire.WireType.LEN:
        raise wire.WireFormatError(f"expected one message in field {number}", offset)
    return items[0]


def _dims_message(data: bytes, message: wire.Field) -> tuple[int, ...]:
    """The `repeated dim = 1` of a DevMatrix / TensorMap / ParamSplitShape / IndicesOffset / ParallelStrategy."""
    fields = _fields_by_number(data, message.start, message.end)
    return tuple(wire.read_repeated_ints(data, fields.get(1, [])))


def _optional_dims(data: bytes, fields: dict[int, list[wire.Field]], number: int, offset: int) -> tuple[int, ...]:
    """A layout sub-message MindSpore writes exactly once (older files may omit it)."""
    items = fields.get(number, [])
    if len(items) > 1:
        raise wire.WireFormatError(f"field {number} repeated {len(items)} times; MindSpore writes it once", offset)
    return _dims_message(data, items[0]) if items else ()


def _decode_strategy_map(data: bytes) -> StrategyCheckpoint:
    top = _fields_by_number(data, 0, len(data))
    unknown = set(top) - {1, 2, 3}
    if unknown or 1 not in top:
        raise wire.WireFormatError(f"top-level fields {sorted(top)} are not those of a ParallelStrategyMap", 0)
    operator_strategies: dict[str, OperatorStrategy] = {}
    for item in top.get(2, []):
        item_fields = _fields_by_number(data, item.start, item.end)
        node_name = _required_string(data, item_fields, 1, item.offset)
        strategys = _required_message(item_fields, 2, item.offset)
        strategys_fields = _fields_by_number(data, strategys.start, strategys.end)
        operator_strategies[node_name] = OperatorStrategy(
            stage=_single_scalar(strategys_fields, 1),
            input_strategies=tuple(_dims_message(data, dims) for dims in strategys_fields.get(2, [])),
        )

    parameters: dict[str, ParameterStrategy] = {}
    for item in top.get(3, []):
        item_fields = _fields_by_number(data, item.start, item.end)
        param_name = _required_string(data, item_fields, 1, item.offset)
        layouts = _required_message(item_fields, 2, item.offset)
        layout_fields = _fields_by_number(data, layouts.start, layouts.end)
        if len(layout_fields.get(1, [])) != 1 or len(layout_fields.get(2, [])) != 1:
            raise wire.WireFormatError(f"{param_name}: expected one dev_matrix and one tensor_map", layouts.offset)
        parameters[param_name] = ParameterStrategy(
            dev_matrix=_dims_message(data, layout_fields[1][0]),
            tensor_map=_dims_message(data, layout_fields[2][0]),
            param_split_shape=_optional_dims(data, layout_fields, 3, layouts.offset),
            indices_offset=_optional_dims(data, layout_fields, 4, layouts.offset),
            field=_single_scalar(layout_fields, 5),
            opt_weight_shard_step=_single_scalar(layout_fields, 6),
            opt_weight_shard_size=_single_scalar(layout_fields, 7),
        )
    return StrategyCheckpoint(_single_scalar(top, 1), operator_strategies, parameters)


def slice_of_rank(
    strategy: ParameterStrategy,
    rank: int,
    full_shape: Sequence[int],
    *,
    optimizer_sharded: bool,
) -> tuple[slice, ...]:
    """The part of the full tensor that device `rank` holds under `strategy`.

    With `optimizer_sharded=False` this is the model-parallel slice
    (MindSpore's `_get_tensor_slice_index`), which is what a rank's
    checkpoint holds when the parameter was gathered over the
    parallel-optimizer group before saving. With `optimizer_sharded=True`
    the model-parallel slice is further cut along dimension 0 among the
    ranks of the rank's parallel-optimizer group (MindSpore's
    `_load_tensor_by_layout`), which is what a rank's checkpoint holds when
    saved without that gather. A merger should check which one the
    checkpoint files match (the slice shapes tell).
    """
    dev_matrix, tensor_map = strategy.dev_matrix, strategy.tensor_map
    device_count = math.prod(dev_matrix)
    if not 0 <= rank < device_count:
        raise ValueError(f"rank {rank} is outside the {device_count} devices of dev_matrix {dev_matrix}")
    if len(tensor_map) != len(full_shape):
        raise ValueError(f"tensor_map {tensor_map} does not match the {len(full_shape)}-d shape {tuple(full_shape)}")
    if strategy.field or strategy.param_split_shape:
        raise ValueError("field-sliced or unevenly split parameters are not supported (PanGu-alpha uses neither)")

    # Row-major coordinates of the rank in the device matrix.
    coordinates = []
    remainder = rank
    for size in reversed(dev_matrix):
        coordinates.append(remainder % size)
        remainder //= size
    coordinates.reverse()

    bounds = []
    for dimension, (length, device_dimension) in enumerate(zip(full_shape, tensor_map)):
        if device_dimension == -1:
            bounds.append((0, length))
            continue
        axis = len(dev_matrix) - 1 - device_dimension
        pieces = dev_matrix[axis]
        if length % pieces:
            raise ValueError(f"dimension {dimension} of length {length} does not split evenly into {pieces}")
        piece = length // pieces
        bounds.append((coordinates[axis] * piece, (coordinates[axis] + 1) * piece))

    if optimizer_sharded and strategy.opt_weight_shard_step > 0:
        bounds[0] = _optimizer_shard_of(strategy, coordinates, bounds[0])
    return tuple(slice(start, stop) for start, stop in bounds)


def _optimizer_shard_of(
    strategy: ParameterStrategy, coordinates: list[int], bounds: tuple[int, int]
) -> tuple[int, int]:
    """Cut a model-parallel slice along dimension 0 for the rank's parallel-optimizer group."""
    dev_matrix = strategy.dev_matrix
    used_axes = {len(dev_matrix) - 1 - m for m in strategy.tensor_map if m != -1}
    # The replicas of a slice, in rank order, are enumerated row-major by the
    # coordinates along the device-matrix axes the tensor does not use.
    replica_index = 0
    replica_count = 1
    for axis, size in enumerate(dev_matrix):
        if axis not in used_axes:
            replica_index = replica_index * size + coordinates[axis]
            replica_count *= size
    group_size = replica_count if strategy.opt_weight_shard_size == -1 else strategy.opt_weight_shard_size
    if group_size <= 0 or replica_count % group_size:
        raise ValueError(
            f"opt_weight_shard_size {strategy.opt_weight_shard_size} does not divide the {replica_count} replicas"
        )
    start, stop = bounds
    if (stop - start) % group_size:
        raise ValueError(f"dimension 0 slice of length {stop - start} does not split evenly into {group_size}")
    piece = (stop - start) // group_size
    index_in_group = replica_index % group_size
    return start + index_in_group * piece, start + (index_in_group + 1) * piece
