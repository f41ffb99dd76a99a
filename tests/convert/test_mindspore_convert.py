"""Reading MindSpore checkpoints and strategy files, mapping PanGu-alpha names,
and the independent NumPy reference forward used to check imported models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pangu.config import ModelConfig
from pangu.convert.importer import read_npz
from pangu.convert.mindspore import wire
from pangu.convert.mindspore.ckpt import read_mindspore_ckpt, read_mindspore_ckpt_shapes, write_mindspore_ckpt
from pangu.convert.mindspore.names import BLOCK_NAME, infer_model_shape, stored_shape, to_pangu_names
from pangu.convert.mindspore.strategy import (
    ParameterStrategy,
    read_parallel_strategy,
    read_strategy_checkpoint,
    slice_of_rank,
    write_parallel_strategy,
)
from pangu.model import declaration
from tests.helpers import RELEASE
from tests.model.numpy_pangu import (
    causal_attention_mask,
    eod_reset_positions_and_mask,
    numpy_pangu_logits,
    random_ms_params,
)

STRATEGY_FILES = {
    "2.6B": (RELEASE / "pangu_alpha_2.6B_ckpt_strategy.ckpt", 31),  # ordinary blocks (+ query layer = 32)
    "13B": (RELEASE / "pangu_alpha_13B_ckpt_strategy.ckpt", 39),
}


# ---------------------------------------------------------------------------
# protobuf wire format


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1, -(2**63)])
def test_varint_round_trip(value: int) -> None:
    encoded = wire.encode_varint(value)
    decoded, end = wire.decode_varint(encoded, 0)
    assert wire.to_signed64(decoded) == value
    assert end == len(encoded)
    if value < 0:
        assert len(encoded) == 10  # negative int32/int64 are sign-extended to 64 bits


def test_iter_fields_decodes_every_wire_type_and_packed_ints() -> None:
    message = (
        wire.encode_varint_field(1, 150)
        + wire.encode_string_field(2, "héllo")
        + wire.encode_fixed32_field(3, 0xDEADBEEF)
        + wire.encode_fixed64_field(4, 2**40 + 7)
        + wire.encode_len_field(5, b"".join(wire.encode_varint(v) for v in (3, -2, 70000)))  # packed
        + wire.encode_repeated_varints(5, [9])  # and unpacked, same field
    )
    fields = list(wire.iter_fields(message))
    assert [(f.number, f.wire_type) for f in fields] == [
        (1, wire.WireType.VARINT),
        (2, wire.WireType.LEN),
        (3, wire.WireType.FIXED32),
        (4, wire.WireType.FIXED64),
        (5, wire.WireType.LEN),
        (5, wire.WireType.VARINT),
    ]
    assert fields[0].value == 150
    assert message[fields[1].start : fields[1].end].decode() == "héllo"
    assert fields[2].value == 0xDEADBEEF and fields[3].value == 2**40 + 7
    assert wire.read_repeated_ints(message, fields[4:]) == [3, -2, 70000, 9]
    assert fields[-1].end == len(message)


def test_truncated_message_reports_offset() -> None:
    message = wire.encode_varint_field(1, 5) + wire.encode_string_field(2, "abcdef")
    with pytest.raises(wire.WireFormatError, match="at byte offset 2") as error:
        list(wire.iter_fields(message[:-1]))
    assert error.value.offset == 2
    with pytest.raises(wire.WireFormatError, match="truncated varint"):
        wire.decode_varint(b"\xff\xff", 0)


def _google_message_classes(messages: dict[str, list[tuple[str, int, str, str]]]) -> dict[str, type]:
    """Message classes built by the real protobuf library from (name, number, label, type) specs."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="mindspore_test.proto", syntax="proto2")
    scalar_types = {
        "string": proto.TYPE_STRING,
        "bytes": proto.TYPE_BYTES,
        "int64": proto.TYPE_INT64,
        "int32": proto.TYPE_INT32,
        "uint32": proto.TYPE_UINT32,
    }
    labels = {"required": proto.LABEL_REQUIRED, "repeated": proto.LABEL_REPEATED}
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for name, number, label, type_name in fields:
            if type_name in scalar_types:
                message.field.add(name=name, number=number, label=labels[label], type=scalar_types[type_name])
            else:
                message.field.add(
                    name=name, number=number, label=labels[label], type=proto.TYPE_MESSAGE, type_name="." + type_name
                )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in messages}


# checkpoint.proto, with Checkpoint.Value flattened to a top-level message.
CHECKPOINT_PROTO = {
    "TensorProto": [
        ("dims", 1, "repeated", "int64"),
        ("tensor_type", 2, "required", "string"),
        ("tensor_content", 3, "required", "bytes"),
    ],
    "Value": [("tag", 1, "required", "string"), ("tensor", 2, "required", "TensorProto")],
    "Checkpoint": [("value", 1, "repeated", "Value")],
}


def test_checkpoint_encoding_agrees_with_protobuf_library(tmp_path: Path) -> None:
    classes = _google_message_classes(CHECKPOINT_PROTO)
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    steps = np.array([7, -3], dtype=np.int64)

    # Ours -> protobuf library.
    write_mindspore_ckpt(tmp_path / "ours.ckpt", [("w", weight), ("steps", steps)])
    parsed = classes["Checkpoint"].FromString((tmp_path / "ours.ckpt").read_bytes())
    assert [v.tag for v in parsed.value] == ["w", "steps"]
    assert list(parsed.value[0].tensor.dims) == [3, 4] and parsed.value[0].tensor.tensor_type == "Float32"
    assert parsed.value[0].tensor.tensor_content == weight.tobytes()

    # Protobuf library -> ours.
    checkpoint = classes["Checkpoint"]()
    value = checkpoint.value.add(tag="steps")
    value.tensor.dims.extend([2])
    value.tensor.tensor_type = "Int64"
    value.tensor.tensor_content = steps.tobytes()
    (tmp_path / "theirs.ckpt").write_bytes(checkpoint.SerializeToString())
    [(name, array)] = list(read_mindspore_ckpt(tmp_path / "theirs.ckpt"))
    assert name == "steps" and array.dtype == np.int64
    np.testing.assert_array_equal(array, steps)


# ---------------------------------------------------------------------------
# MindSpore checkpoints


def _every_supported_dtype(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    floats = rng.standard_normal((5, 7))
    return [
        ("float32", floats.astype(np.float32)),
        ("float16", floats.astype(np.float16)),
        ("float64", floats),
        ("int8", rng.integers(-128, 128, (4, 3), dtype=np.int8)),
        ("uint8", rng.integers(0, 256, (6,), dtype=np.uint8)),
        ("int16", rng.integers(-(2**15), 2**15, (2, 2, 2), dtype=np.int16)),
        ("uint16", rng.integers(0, 2**16, (3,), dtype=np.uint16)),
        ("int32", rng.integers(-(2**31), 2**31, (3, 5), dtype=np.int32)),
        ("uint32", rng.integers(0, 2**32, (3,), dtype=np.uint32)),
        ("int64", rng.integers(-(2**63), 2**63 - 1, (4,), dtype=np.int64)),
        ("uint64", rng.integers(0, 2**63, (4,), dtype=np.uint64)),
        ("bool", rng.integers(0, 2, (9,)).astype(np.bool_)),
        ("complex64", (floats + 1j * floats[::-1]).astype(np.complex64)),
        ("complex128", floats + 2j * floats),
        ("scalar_step", np.array(1234, dtype=np.int32)),
        ("scalar_lr", np.array(3e-4, dtype=np.float32)),
        ("empty", np.zeros((0, 4), np.float16)),
        ("non_contiguous", floats.astype(np.float32).T),
    ]


def test_checkpoint_round_trip_is_bitwise_for_every_dtype(tmp_path: Path) -> None:
    arrays = _every_supported_dtype(np.random.default_rng(0))
    path = tmp_path / "all.ckpt"
    write_mindspore_ckpt(path, arrays)
    read_back = list(read_mindspore_ckpt(path))
    assert [name for name, _ in read_back] == [name for name, _ in arrays]
    for (name, original), (_, array) in zip(arrays, read_back):
        assert array.dtype == original.dtype and array.shape == original.shape, name
        assert array.tobytes() == np.ascontiguousarray(original).tobytes(), name
        assert array.flags.writeable
    assert read_mindspore_ckpt_shapes(path) == {name: array.shape for name, array in arrays}


def test_scalars_use_mindspores_dims_zero_convention(tmp_path: Path) -> None:
    write_mindspore_ckpt(tmp_path / "s.ckpt", [("global_step", np.array(5, np.int32))])
    data = (tmp_path / "s.ckpt").read_bytes()
    [value] = list(wire.iter_fields(data))
    [_, tensor] = list(wire.iter_fields(data, value.start, value.end))
    dims = [f for f in wire.iter_fields(data, tensor.start, tensor.end) if f.number == 1]
    assert wire.read_repeated_ints(data, dims) == [0]


def test_bfloat16_is_read_as_float32(tmp_path: Path) -> None:
    exact = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 2.0**-130], np.float32)  # all bfloat16 values
    rounded = np.array([1.00390625, 1.01171875, 65520.0], np.float32)  # ties to even / carry
    write_mindspore_ckpt(
        tmp_path / "bf16.ckpt",
        [("exact", exact), ("rounded", rounded), ("nan", np.array([np.nan], np.float32))],
        tensor_types={"exact": "BFloat16", "rounded": "BFloat16", "nan": "BFloat16"},
    )
    read_back = dict(read_mindspore_ckpt(tmp_path / "bf16.ckpt"))
    assert read_back["exact"].dtype == np.float32
    assert read_back["exact"].tobytes() == exact.tobytes()
    np.testing.assert_array_equal(read_back["rounded"], [1.0, 1.015625, 65536.0])
    assert np.isnan(read_back["nan"]).all()
    assert (tmp_path / "bf16.ckpt").stat().st_size < 200  # 2 bytes per element on disk


def test_large_tensors_split_into_several_values_are_reassembled(tmp_path: Path) -> None:
    embedding = np.random.default_rng(1).standard_normal((101, 7)).astype(np.float16)
    bias = np.arange(5, dtype=np.float32)
    path = tmp_path / "chunked.ckpt"
    write_mindspore_ckpt(path, [("embedding", embedding), ("bias", bias)], chunk_bytes=256)
    assert len(list(wire.iter_fields(path.read_bytes()))) == 7  # ceil(1414 / 256) + 1 Values
    read_back = dict(read_mindspore_ckpt(path))
    assert read_back["embedding"].tobytes() == embedding.tobytes()
    assert read_back["bias"].tobytes() == bias.tobytes()


def test_truncated_checkpoint_fails_before_yielding_anything(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    write_mindspore_ckpt(path, [("a", np.ones((4, 4), np.float32)), ("b", np.ones(300, np.float32))])
    whole = path.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[:-10])
    tensors = read_mindspore_ckpt(truncated)
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*byte offset \d+"):
        next(tensors)


def test_foreign_and_empty_files_are_rejected_by_name(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.ckpt: not a readable MindSpore checkpoint"):
        list(read_mindspore_ckpt(text))
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.ckpt: file is empty"):
        list(read_mindspore_ckpt(empty))


def test_strategy_file_is_not_mistaken_for_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="not a Checkpoint.Value"):
        list(read_mindspore_ckpt(STRATEGY_FILES["2.6B"][0]))


def test_unknown_tensor_type_is_named(tmp_path: Path) -> None:
    tensor = (
        wire.encode_repeated_varints(1, [1]) + wire.encode_string_field(2, "Float8") + wire.encode_len_field(3, b"x")
    )
    value = wire.encode_string_field(1, "odd") + wire.encode_len_field(2, tensor)
    (tmp_path / "odd.ckpt").write_bytes(wire.encode_len_field(1, value))
    with pytest.raises(ValueError, match=r"'odd'.*unsupported tensor_type 'Float8'"):
        list(read_mindspore_ckpt(tmp_path / "odd.ckpt"))


def test_stopping_early_releases_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    write_mindspore_ckpt(path, [(f"t{i}", np.full(10, i, np.float32)) for i in range(3)])
    tensors = read_mindspore_ckpt(path)
    name, first = next(tensors)
    tensors.close()  # must not raise BufferError from the memory map
    assert name == "t0" and (first == 0).all()


def test_npz_reader_has_the_same_interface(tmp_path: Path) -> None:
    arrays = {"backbone.layernorm.gamma": np.ones(4, np.float32), "global_step": np.array(3)}
    np.savez(tmp_path / "weights.npz", **arrays)
    read_back = list(read_npz(tmp_path / "weights.npz"))
    assert [name for name, _ in read_back] == list(arrays)
    for name, array in read_back:
        np.testing.assert_array_equal(array, arrays[name])
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.npz"):
        list(read_npz(tmp_path / "bad.npz"))


# ---------------------------------------------------------------------------
# Parallel-strategy files


@pytest.mark.parametrize("size", ["2.6B", "13B"])
def test_real_strategy_files_decode(size: str) -> None:
    path, block_count = STRATEGY_FILES[size]
    strategy = read_strategy_checkpoint(path)
    parameters = strategy.parameters
    model_parameters = [name for name in parameters if name.startswith("backbone.")]
    # 16 per block and in the query layer, 3 embedding tables, the final LayerNorm.
    assert len(model_parameters) == 16 * (block_count + 1) + 3 + 2
    # The optimizer's two moments have the same layouts as the parameters.
    assert len(parameters) == 3 * len(model_parameters)
    for name in model_parameters:
        assert parameters[f"adam_m.{name}"] == parameters[name] == parameters[f"adam_v.{name}"]

    # 64-way data x 8-way model parallel over 512 devices, for every parameter.
    assert {p.dev_matrix for p in parameters.values()} == {(64, 8)}
    column_parallel = ParameterStrategy((64, 8), (0, -1), 0, 8, -1)  # stored [out, in], out split 8-way
    assert parameters["backbone.blocks.0.attention.dense1.weight"] == column_parallel
    assert parameters["backbone.blocks.0.attention.dense1.bias"] == ParameterStrategy((64, 8), (0,), 0, 8, -1)
    # Stored [in, out]: projection splits its input rows, mapping its output columns.
    assert parameters["backbone.blocks.0.attention.projection.weight"].tensor_map == (0, -1)
    assert parameters["backbone.blocks.0.output.mapping.weight"].tensor_map == (-1, 0)
    assert parameters["backbone.blocks.0.output.projection.weight"].tensor_map == (0, -1)
    replicated = ParameterStrategy((64, 8), (-1,), 0, 0, 0)
    assert parameters["backbone.blocks.0.attention.projection.bias"] == replicated
    assert parameters["backbone.layernorm.gamma"] == replicated
    assert parameters["backbone.word_embedding.embedding_table"].tensor_map == (-1, -1)

    assert strategy.current_stage == 1
    matmul = strategy.operator_strategies["MatMul_backbone.blocks.0.attention.dense1.weight"]
    assert matmul.input_strategies == ((64, 1), (8, 1))


@pytest.mark.parametrize("size", ["2.6B", "13B"])
def test_real_strategy_files_rewrite_byte_for_byte(size: str, tmp_path: Path) -> None:
    path, _ = STRATEGY_FILES[size]
    strategy = read_strategy_checkpoint(path)
    write_parallel_strategy(
        tmp_path / "rewritten.ckpt",
        strategy.parameters,
        operator_strategies=strategy.operator_strategies,
        current_stage=strategy.current_stage,
    )
    assert (tmp_path / "rewritten.ckpt").read_bytes() == path.read_bytes()


def test_strategy_decoding_agrees_with_protobuf_library() -> None:
    dims = [("dim", 1, "repeated", "int64")]
    classes = _google_message_classes(
        {
            "Dims": dims,
            "ParallelLayouts": [
                ("dev_matrix", 1, "repeated", "Dims"),
                ("tensor_map", 2, "repeated", "Dims"),
                ("param_split_shape", 3, "repeated", "Dims"),
                ("indices_offset", 4, "repeated", "Dims"),
                ("field", 5, "required", "int32"),
                ("opt_weight_shard_step", 6, "required", "int32"),
                ("opt_weight_shard_size", 7, "required", "int32"),
            ],
            "ParallelLayoutItem": [
                ("param_name", 1, "required", "string"),
                ("parallel_layouts", 2, "required", "ParallelLayouts"),
            ],
            "ParallelStrategys": [("stage", 1, "required", "uint32"), ("parallel_strategy", 2, "repeated", "Dims")],
            "ParallelStrategyItem": [
                ("node_name", 1, "required", "string"),
                ("parallel_strategys", 2, "required", "ParallelStrategys"),
            ],
            "ParallelStrategyMap": [
                ("current_stage", 1, "required", "uint32"),
                ("parallel_strategy_item", 2, "repeated", "ParallelStrategyItem"),
                ("parallel_layout_item", 3, "repeated", "ParallelLayoutItem"),
            ],
        }
    )
    path, _ = STRATEGY_FILES["13B"]
    reference = classes["ParallelStrategyMap"].FromString(path.read_bytes())
    ours = read_parallel_strategy(path)
    assert [item.param_name for item in reference.parallel_layout_item] == list(ours)
    for item in reference.parallel_layout_item:
        layouts = item.parallel_layouts
        assert ours[item.param_name] == ParameterStrategy(
            dev_matrix=tuple(layouts.dev_matrix[0].dim),
            tensor_map=tuple(layouts.tensor_map[0].dim),
            field=layouts.field,
            opt_weight_shard_step=layouts.opt_weight_shard_step,
            opt_weight_shard_size=layouts.opt_weight_shard_size,
            param_split_shape=tuple(layouts.param_split_shape[0].dim),
            indices_offset=tuple(layouts.indices_offset[0].dim),
        )


def test_truncated_strategy_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "strategy.ckpt"
    write_parallel_strategy(path, {"backbone.layernorm.gamma": ParameterStrategy((2, 4), (-1,))}, current_stage=1)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"strategy\.ckpt: .*byte offset \d+"):
        read_parallel_strategy(path)


def _coverage_over_all_ranks(strategy: ParameterStrategy, *, optimizer_sharded: bool) -> tuple[np.ndarray, int]:
    """How many ranks hold each element of a small tensor that splits as `strategy` demands."""
    optimizer_pieces = 1
    if optimizer_sharded and strategy.opt_weight_shard_step > 0:
        optimizer_pieces = 64  # opt_weight_shard_size -1: all 64 data-parallel replicas
    shape = [
        3 * (1 if entry == -1 else strategy.dev_matrix[-1 - entry]) * (optimizer_pieces if axis == 0 else 1)
        for axis, entry in enumerate(strategy.tensor_map)
    ]
    coverage = np.zeros(shape, np.int64)
    distinct_slices = set()
    for rank in range(512):
        slices = slice_of_rank(strategy, rank, shape, optimizer_sharded=optimizer_sharded)
        coverage[slices] += 1
        distinct_slices.add(tuple((s.start, s.stop) for s in slices))
    return coverage, len(distinct_slices)


@pytest.mark.parametrize("optimizer_sharded", [False, True])
def test_slices_of_all_ranks_tile_every_real_parameter(optimizer_sharded: bool) -> None:
    strategies = set(read_parallel_strategy(STRATEGY_FILES["2.6B"][0]).values())
    strategies |= set(read_parallel_strategy(STRATEGY_FILES["13B"][0]).values())
    assert len(strategies) == 5  # every parameter uses one of five layouts
    for strategy in strategies:
        coverage, distinct = _coverage_over_all_ranks(strategy, optimizer_sharded=optimizer_sharded)
        # Every element is held by the same number of ranks: the distinct
        # slices tile the tensor exactly, each replicated 512 / distinct times.
        assert (coverage == 512 // distinct).all(), strategy
        split = 8 if any(entry != -1 for entry in strategy.tensor_map) else 1
        if optimizer_sharded and strategy.opt_weight_shard_step:
            split *= 64
        assert distinct == split, strategy


def test_slice_of_rank_for_known_parameters() -> None:
    parameters = read_parallel_strategy(STRATEGY_FILES["2.6B"][0])
    dense1 = parameters["backbone.blocks.0.attention.dense1.weight"]  # [out 2560, in 2560]
    mapping = parameters["backbone.blocks.0.output.mapping.weight"]  # [in 2560, out 10240]
    rank = 8 * 3 + 5  # data-parallel index 3, model-parallel index 5
    assert slice_of_rank(dense1, rank, (2560, 2560), optimizer_sharded=False) == (slice(1600, 1920), slice(0, 2560))
    assert slice_of_rank(mapping, rank, (2560, 10240), optimizer_sharded=False) == (slice(0, 2560), slice(6400, 7680))
    # The parallel optimizer then gives data-parallel replica 3 its 1/64 of dimension 0.
    assert slice_of_rank(dense1, rank, (2560, 2560), optimizer_sharded=True) == (slice(1615, 1620), slice(0, 2560))
    assert slice_of_rank(mapping, rank, (2560, 10240), optimizer_sharded=True) == (slice(120, 160), slice(6400, 7680))
    embedding = parameters["backbone.word_embedding.embedding_table"]
    assert slice_of_rank(embedding, rank, (40000, 2560), optimizer_sharded=True) == (slice(0, 40000), slice(0, 2560))
    with pytest.raises(ValueError, match="does not split evenly"):
        slice_of_rank(dense1, rank, (2561, 2560), optimizer_sharded=False)


# ---------------------------------------------------------------------------
# MindSpore names -> pangu names

TINY = dict(num_layers=3, hidden=16, heads=4, ffn=64, vocab=200, seq=12)


@pytest.mark.parametrize("scheme", ["release", "mindformers"])
def test_name_mapping_renames_transposes_and_pads(scheme: str) -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0), names=scheme)
    extras = {
        "adam_m.backbone.blocks.0.attention.dense1.weight": np.zeros((16, 16), np.float32),
        "moments.backbone.layernorm.gamma": np.zeros(16, np.float32),
        "global_step": np.array(10, np.int32),
        "learning_rate": np.array(1e-4, np.float32),
        "scale_sense": np.array(2.0**32, np.float32),
    }
    ignored: list[str] = []
    pangu = dict(to_pangu_names([*ms.items(), *extras.items()], ignored=ignored))
    assert sorted(ignored) == sorted(extras)

    word = (
        "backbone.embedding.word_embedding.embedding_table"
        if scheme == "mindformers"
        else "backbone.word_embedding.embedding_table"
    )
    assert pangu["embedding.word_embeddings.weight"].shape == (256, 16)  # 200 padded to a multiple of 128
    np.testing.assert_array_equal(pangu["embedding.word_embeddings.weight"][:200], ms[word])
    assert not pangu["embedding.word_embeddings.weight"][200:].any()
    assert pangu["embedding.word_embeddings.weight"].dtype == np.float32

    for prefix, ms_prefix in [("blocks.1.", "backbone.blocks.1."), ("query_layer.", "backbone.top_query_layer.")]:
        same = {
            "attention.query.weight": "attention.dense1.weight",
            "attention.key.bias": "attention.dense2.bias",
            "attention.value.weight": "attention.dense3.weight",
            "input_layernorm.weight": "layernorm1.gamma",
            "post_attention_layernorm.bias": "layernorm2.beta",
            "attention.dense.bias": "attention.projection.bias",
            "mlp.dense_4h_to_h.bias": "output.projection.bias",
        }
        for name, ms_name in same.items():
            np.testing.assert_array_equal(pangu[prefix + name], ms[ms_prefix + ms_name])
        transposed = {
            "attention.dense.weight": "attention.projection.weight",
            "mlp.dense_h_to_4h.weight": "output.mapping.weight",
            "mlp.dense_4h_to_h.weight": "output.projection.weight",
        }
        for name, ms_name in transposed.items():
            np.testing.assert_array_equal(pangu[prefix + name], ms[ms_prefix + ms_name].T)
        assert pangu[prefix + "mlp.dense_h_to_4h.weight"].shape == (64, 16)  # torch [out, in]
    np.testing.assert_array_equal(pangu["final_layernorm.bias"], ms["backbone.layernorm.beta"])
    np.testing.assert_array_equal(
        pangu["query_layer.query_embeddings.weight"], ms["backbone.top_query_embedding.embedding_table"]
    )
    assert len(pangu) == 2 + 16 * 2 + 16 + 1 + 2  # embeddings, 2 blocks, query layer, query emb, final LN


@pytest.mark.parametrize("final_layernorm", ["before", "after"])
def test_name_mapping_gives_exactly_the_declared_parameters(final_layernorm: str) -> None:
    """pangu/model/declaration.py declares the network: the mapped names and shapes are its parameters."""
    model = ModelConfig(
        num_layers=3,
        hidden_size=16,
        num_heads=4,
        ffn_hidden_size=64,
        vocab_size=200,
        seq_length=12,
        final_layernorm=final_layernorm,
    )
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0))
    pangu = {name: array.shape for name, array in to_pangu_names(ms.items(), model=model)}
    assert pangu == {p.name: p.shape for p in declaration.parameters(model)}
    assert {stored_shape(name, model) for name in ms if BLOCK_NAME.fullmatch(name)} >= {(16, 64), (64, 16), (64,)}
    with pytest.raises(ValueError, match=r"gives [\w.]+ shape \(\d+, 16\), expected \(\d+, 32\)"):
        list(to_pangu_names(ms.items(), model=dataclasses.replace(model, hidden_size=32)))


def test_name_mapping_keeps_an_already_padded_vocabulary() -> None:
    ms = random_ms_params(**{**TINY, "vocab": 256}, rng=np.random.default_rng(0))
    pangu = dict(to_pangu_names(ms.items()))
    assert pangu["embedding.word_embeddings.weight"] is ms["backbone.word_embedding.embedding_table"]


def test_unknown_backbone_parameter_is_an_error_naming_it() -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0))
    ms["backbone.blocks.0.attention.rotary.weight"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.attention\.rotary\.weight"):
        list(to_pangu_names(ms.items()))


def test_missing_parameter_is_an_error_naming_it() -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0))
    del ms["backbone.blocks.1.output.mapping.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 .*blocks\.1\.mlp\.dense_h_to_4h\.bias"):
        list(to_pangu_names(ms.items()))


def test_both_naming_schemes_for_one_parameter_is_an_error() -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0))
    ms["backbone.embedding.word_embedding.embedding_table"] = ms["backbone.word_embedding.embedding_table"]
    with pytest.raises(ValueError, match="already provided"):
        list(to_pangu_names(ms.items()))


@pytest.mark.parametrize("size", ["2.6B", "13B"])
def test_every_released_parameter_name_maps(size: str) -> None:
    path, block_count = STRATEGY_FILES[size]
    ignored: list[str] = []
    tiny = np.zeros((2, 2), np.float16)
    names = [name for name, _ in to_pangu_names(((n, tiny) for n in read_parallel_strategy(path)), ignored=ignored)]
    assert len(names) == 16 * (block_count + 1) + 3 + 2
    assert all(name.startswith(("adam_m.", "adam_v.")) for name in ignored)
    assert f"blocks.{block_count - 1}.mlp.dense_4h_to_h.weight" in names


@pytest.mark.parametrize("scheme", ["release", "mindformers"])
def test_infer_model_shape(scheme: str) -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(0), names=scheme)
    shapes = {name: array.shape for name, array in ms.items()} | {"adam_m.x": (3,), "global_step": ()}
    assert infer_model_shape(shapes) == {
        "num_layers": 3,
        "hidden_size": 16,
        "ffn_hidden_size": 64,
        "vocab_size": 200,
        "seq_length": 12,
    }
    shapes["backbone.word_embedding.embedding_table"] = (40064, 16)  # PyTorch ports pad the vocabulary
    shapes.pop("backbone.embedding.word_embedding.embedding_table", None)
    assert infer_model_shape(shapes)["vocab_size"] == 40064
    shapes["backbone.blocks.1.output.projection.weight"] = (16, 64)  # transposed by mistake
    with pytest.raises(ValueError, match=r"blocks\.1\.output\.projection\.weight has shape \(16, 64\)"):
        infer_model_shape(shapes)


def test_checkpoint_file_to_pangu_names_end_to_end(tmp_path: Path) -> None:
    ms = random_ms_params(**TINY, rng=np.random.default_rng(3))
    path = tmp_path / "pangu.ckpt"
    write_mindspore_ckpt(path, [*ms.items(), ("adam_v.backbone.layernorm.gamma", np.zeros(16, np.float32))])
    assert infer_model_shape(read_mindspore_ckpt_shapes(path))["num_layers"] == 3
    pangu = dict(to_pangu_names(read_mindspore_ckpt(path)))
    np.testing.assert_array_equal(
        pangu["blocks.0.attention.dense.weight"], ms["backbone.blocks.0.attention.projection.weight"].T
    )


# ---------------------------------------------------------------------------
# The NumPy reference forward


def _tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    return random_ms_params(**TINY, rng=np.random.default_rng(seed))


def _logits(params: dict[str, np.ndarray], ids: np.ndarray, **options: str) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return numpy_pangu_logits(params, ids, positions, causal_attention_mask(*ids.shape), num_heads=4, **options)


def test_reference_forward_is_causal() -> None:
    params = _tiny_model()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 200, (2, 10))
    changed = ids.copy()
    changed[:, 6:] = rng.integers(0, 200, (2, 4))
    before, after = _logits(params, ids), _logits(params, changed)
    assert before.shape == (2, 10, 200)
    np.testing.assert_allclose(after[:, :6], before[:, :6], rtol=0, atol=1e-12)
    assert np.abs(after[:, 6:] - before[:, 6:]).max() > 1e-4


def test_eod_reset_makes_packed_documents_independent() -> None:
    params = _tiny_model()
    separator = 9
    first = np.array([[5, 17, 42, separator]])
    second = np.array([[101, 7, 33, 64, 2]])
    packed = np.concatenate([first, second], axis=1)
    positions, mask = eod_reset_positions_and_mask(packed, separator)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    together = numpy_pangu_logits(params, packed, positions, mask, num_heads=4)
    np.testing.assert_allclose(together[:, :4], _logits(params, first), rtol=0, atol=1e-12)
    np.testing.assert_allclose(together[:, 4:], _logits(params, second), rtol=0, atol=1e-12)
    # Without the reset the second document sees the first.
    plain = _logits(params, packed)
    assert np.abs(plain[:, 4:] - together[:, 4:]).max() > 1e-4


def test_query_embedding_only_enters_through_attention_scores() -> None:
    params = _tiny_model()
    ids = np.random.default_rng(2).integers(0, 200, (1, 6))
    query_embedding = "backbone.top_query_embedding.embedding_table"
    changed = params | {query_embedding: params[query_embedding] * 50}
    before, after = _logits(params, ids), _logits(changed, ids)
    # Position 0 attends only to itself: softmax over one key is 1 whatever
    # the query, so the query embedding cannot change it; later positions do.
    np.testing.assert_allclose(after[:, 0], before[:, 0], rtol=0, atol=1e-12)
    assert np.abs(after[:, 1:] - before[:, 1:]).max() > 1e-9  # small at this init scale, far above rounding


def test_reference_options_change_the_output() -> None:
    params = _tiny_model()
    ids = np.random.default_rng(3).integers(0, 200, (1, 5))
    default = _logits(params, ids)
    for options in [{"activation": "gelu"}, {"final_ln": "after"}]:
        assert np.abs(_logits(params, ids, **options) - default).max() > 1e-6, options
    mindformers = random_ms_params(**TINY, rng=np.random.default_rng(0), names="mindformers")
    np.testing.assert_array_equal(_logits(mindformers, ids), default)  # same draws, other names
