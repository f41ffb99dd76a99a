"""Merging a sliced PanGu-α release (per-rank MindSpore slices + strategy file + embedding .npy files).

The releases here are synthetic but built the way the real one is: the REAL strategy files of
the 2.6B and 13B models (re-encoded with only the first blocks, so the model is small), every one
of the 512 ranks' slices cut with `slice_of_rank` and written as a MindSpore checkpoint, the
embeddings as .npy files.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pangu
from pangu.checkpoint.store import TensorReader
from pangu.convert.importer import import_mindspore
from pangu.convert.mindspore import wire
from pangu.convert.mindspore.ckpt import (
    TensorChunk,
    index_mindspore_ckpt,
    read_mindspore_ckpt,
    read_stored_into,
    scan_records,
    write_mindspore_ckpt,
)
from pangu.convert.mindspore.release import (
    EMBEDDING_FILE_BASES,
    MODEL_SLICE,
    OPTIMIZER_SHARD,
    ReleaseError,
    SlicedRelease,
)
from pangu.convert.mindspore.strategy import read_parallel_strategy, slice_of_rank, write_parallel_strategy
from tests.helpers import RELEASE
from tests.model.numpy_pangu import causal_attention_mask, numpy_pangu_logits, random_ms_params

STRATEGY = {size: RELEASE / f"pangu_alpha_{size}_ckpt_strategy.ckpt" for size in ("2.6B", "13B")}

LAYERS = 3  # two blocks + the query layer
SEQ = 16


def _small_strategy(size: str, path: Path) -> dict:
    """The real strategy file with only blocks 0..LAYERS-2 kept, re-encoded with the real encoder."""

    def kept(name: str) -> bool:  # also the optimizer moments' entries (adam_m.*, adam_v.*)
        block = re.search(r"backbone\.blocks\.(\d+)\.", name)
        return block is None or int(block.group(1)) < LAYERS - 1

    strategies = {name: s for name, s in read_parallel_strategy(STRATEGY[size]).items() if kept(name)}
    write_parallel_strategy(path, strategies)
    return strategies


def write_release(
    directory: Path,
    params: dict[str, np.ndarray],
    strategy_file: Path,
    *,
    optimizer_sharded: bool,
    dtype,
    npy: tuple[str, ...],
    prefix: str = "filtered_",
) -> None:
    """Every rank's slice file, as MindSpore wrote them (optimizer state left out), plus .npy tables."""
    directory.mkdir(parents=True)
    strategies = {n: s for n, s in read_parallel_strategy(strategy_file).items() if n.startswith("backbone.")}
    sliced = [name for name in strategies if name not in npy]
    world = int(np.prod(next(iter(strategies.values())).dev_matrix))
    for rank in range(world):
        write_mindspore_ckpt(
            directory / f"{prefix}{rank}.ckpt",
            (
                (
                    name,
                    np.ascontiguousarray(
                        params[name][
                            slice_of_rank(
                                strategies[name], rank, params[name].shape, optimizer_sharded=optimizer_sharded
                            )
                        ]
                    ).astype(dtype),
                )
                for name in sliced
            ),
        )
    for name in npy:
        np.save(directory / f"{EMBEDDING_FILE_BASES[name]}.npy", params[name])


@pytest.fixture(scope="module")
def sharded_release(tmp_path_factory):
    """2.6B strategy, optimizer-sharded pieces (as the public files), fp16, embeddings as .npy."""
    root = tmp_path_factory.mktemp("sharded")
    strategy = root / "strategy.ckpt"
    _small_strategy("2.6B", strategy)
    # hidden and ffn must split 8 ways (model) then 64 ways (parallel optimizer): 512 is the least
    params = random_ms_params(LAYERS, 512, 8, 1024, 300, SEQ, np.random.default_rng(0))
    params = {name: array.astype(np.float16) for name, array in params.items()}
    write_release(
        root / "slices", params, strategy, optimizer_sharded=True, dtype=np.float16, npy=tuple(EMBEDDING_FILE_BASES)
    )
    return root, params


@pytest.fixture(scope="module")
def gathered_release(tmp_path_factory):
    """13B strategy, 8-way model-parallel slices (saved after the optimizer gather), fp32; the word
    embedding padded to 40064 rows as the PyTorch ports store it; position and query embeddings
    inside the slices, the strategy file next to them."""
    root = tmp_path_factory.mktemp("gathered")
    slices = root / "slices"
    params = random_ms_params(LAYERS, 64, 4, 256, 40000, SEQ, np.random.default_rng(1))
    word = "backbone.word_embedding.embedding_table"
    params[word] = np.concatenate([params[word], np.zeros((64, 64), np.float32)])
    strategy = root / "strategy.ckpt"
    _small_strategy("13B", strategy)
    write_release(slices, params, strategy, optimizer_sharded=False, dtype=np.float32, npy=(word,))
    shutil.copyfile(strategy, slices / "pangu_alpha_13B_ckpt_strategy.ckpt")
    return root, params


def _logits_match(model, params, *, rtol=1e-4, atol=1e-4) -> None:
    rng = np.random.default_rng(5)
    vocab = model.config.vocab_size
    input_ids = rng.integers(0, vocab, size=(2, SEQ))
    positions = np.broadcast_to(np.arange(SEQ), (2, SEQ))
    expected = numpy_pangu_logits(
        params, input_ids, positions, causal_attention_mask(2, SEQ), num_heads=model.config.num_heads
    )
    with torch.no_grad():
        got = model(torch.from_numpy(input_ids)).numpy()
    np.testing.assert_allclose(got, expected[..., :vocab], rtol=rtol, atol=atol)


def test_sharded_release_merges_bit_for_bit_and_imports(sharded_release, tmp_path):
    root, params = sharded_release
    release = SlicedRelease(root / "slices", strategy=root / "strategy.ckpt")
    assert release.mode == OPTIMIZER_SHARD and release.world_size == 512
    assert set(release.embedding_files) == set(EMBEDDING_FILE_BASES)
    names = []
    for name, merged in release.tensors():
        names.append(name)
        assert merged.dtype == params[name].dtype and merged.shape == params[name].shape, name
        assert np.array_equal(merged.view(np.uint16), params[name].view(np.uint16)), name
    assert sorted(names) == sorted(params)

    out = import_mindspore(root / "slices", tmp_path / "imported", num_heads=8, strategy=root / "strategy.ckpt")
    reader = TensorReader(out / "tensors")
    assert reader.read("blocks.1.attention.query.weight").dtype == torch.float16  # stored dtype kept
    model, _ = pangu.load(out)
    assert model.config.vocab_size == 300 and model.config.num_layers == LAYERS
    assert model.config.ffn_size == 1024 and model.config.hidden_size == 512
    _logits_match(model, params)


def test_gathered_release_with_padded_vocabulary_and_dtype(gathered_release, tmp_path):
    root, params = gathered_release
    release = SlicedRelease(root / "slices")  # the strategy file is found next to the slices
    assert release.mode == MODEL_SLICE
    assert release.shapes["backbone.position_embedding.embedding_table"] == (SEQ, 64)
    for name in (
        "backbone.blocks.1.output.mapping.weight",
        "backbone.top_query_embedding.embedding_table",
        "backbone.top_query_layer.attention.projection.weight",
    ):
        assert np.array_equal(release.read(name), params[name]), name

    out = import_mindspore(root / "slices", tmp_path / "imported", num_heads=4, dtype="bfloat16")
    reader = TensorReader(out / "tensors")
    stored = reader.read("blocks.0.mlp.dense_h_to_4h.weight")
    assert stored.dtype == torch.bfloat16
    original = torch.from_numpy(params["backbone.blocks.0.output.mapping.weight"].T.copy())
    assert torch.equal(stored, original.to(torch.bfloat16))
    model, _ = pangu.load(out)
    assert model.config.vocab_size == 40000 and model.config.padded_vocab_size == 40064  # zero padding recognised
    rounded = {name: torch.from_numpy(a).to(torch.bfloat16).float().numpy() for name, a in params.items()}
    _logits_match(model, rounded)


# ---------------------------------------------------------------------------------------------
# Broken releases: each error names the file


def _variant(release_dir: Path, tmp_path: Path) -> Path:
    """A copy of a release made of symbolic links, to break one file without touching the others."""
    variant = tmp_path / "variant"
    variant.mkdir()
    for path in release_dir.iterdir():
        (variant / path.name).symlink_to(path)
    return variant


def test_missing_slice_is_named(gathered_release, tmp_path):
    variant = _variant(gathered_release[0] / "slices", tmp_path)
    (variant / "filtered_17.ckpt").unlink()
    with pytest.raises(ReleaseError, match=r"1 of the 512 slice files are missing: filtered_17\.ckpt"):
        SlicedRelease(variant)


def test_two_files_for_one_rank_are_named(gathered_release, tmp_path):
    variant = _variant(gathered_release[0] / "slices", tmp_path)
    (variant / "filtered_005.ckpt").symlink_to(variant / "filtered_5.ckpt")
    with pytest.raises(ReleaseError, match=r"filtered_5\.ckpt and .*filtered_005\.ckpt are both the slice of rank 5"):
        SlicedRelease(variant)


def test_slice_copied_under_another_rank_is_named(gathered_release, tmp_path):
    variant = _variant(gathered_release[0] / "slices", tmp_path)
    (variant / "filtered_3.ckpt").unlink()
    (variant / "filtered_3.ckpt").symlink_to(variant / "filtered_2.ckpt")  # same shapes, wrong part
    release = SlicedRelease(variant)
    with pytest.raises(ReleaseError, match=r"filtered_3\.ckpt: its part of .* same values as filtered_2\.ckpt"):
        for _ in release.tensors():
            pass


@pytest.mark.parametrize("which", ["neither", "other mode"])
def test_slice_with_a_shape_the_strategy_does_not_allow_is_named(sharded_release, tmp_path, which):
    root, params = sharded_release
    variant = _variant(root / "slices", tmp_path)
    target = variant / "filtered_300.ckpt"
    name = "backbone.blocks.1.attention.dense2.weight"
    strategy = read_parallel_strategy(root / "strategy.ckpt")[name]
    gathered = params[name][slice_of_rank(strategy, 300, params[name].shape, optimizer_sharded=False)]
    replacement = gathered if which == "other mode" else np.zeros((3, 512), np.float16)
    target.unlink()
    write_mindspore_ckpt(
        target,
        [(n, replacement if n == name else a) for n, a in read_mindspore_ckpt(root / "slices" / "filtered_300.ckpt")],
    )
    expected = (
        "which is rank 300's model-parallel slice"
        if which == "other mode"
        else r"expected rank 300's optimizer-sharded piece \(1, 512\)"
    )
    with pytest.raises(ReleaseError, match=rf"filtered_300\.ckpt: {name} has shape .*{expected}"):
        SlicedRelease(variant, strategy=root / "strategy.ckpt")


def test_parameter_missing_from_a_slice_is_named(gathered_release, tmp_path):
    root, _ = gathered_release
    variant = _variant(root / "slices", tmp_path)
    (variant / "filtered_42.ckpt").unlink()
    write_mindspore_ckpt(
        variant / "filtered_42.ckpt",
        [
            (n, a)
            for n, a in read_mindspore_ckpt(root / "slices" / "filtered_42.ckpt")
            if n != "backbone.blocks.0.layernorm2.beta"
        ],
    )
    with pytest.raises(ReleaseError, match=r"filtered_42\.ckpt: lacks 1 parameters .*blocks\.0\.layernorm2\.beta"):
        SlicedRelease(variant)


def test_strategy_file_is_required(sharded_release, tmp_path):
    variant = _variant(sharded_release[0] / "slices", tmp_path)
    with pytest.raises(ReleaseError, match="--strategy"):
        SlicedRelease(variant)
    with pytest.raises(ValueError, match="--strategy applies to a directory"):
        import_mindspore(variant / "filtered_0.ckpt", tmp_path / "out", num_heads=8, strategy=tmp_path / "s.ckpt")


def _decoded_in_memory(data: bytes) -> list[TensorChunk]:
    """Every Value of a checkpoint held whole in memory, decoded by the plain protobuf walk."""
    chunks = []
    for value in wire.iter_fields(data):
        fields = {field.number: field for field in wire.iter_fields(data, value.start, value.end)}
        tensor = list(wire.iter_fields(data, fields[2].start, fields[2].end))
        [tensor_type] = [field for field in tensor if field.number == 2]
        [content] = [field for field in tensor if field.number == 3]
        dims = wire.read_repeated_ints(data, [field for field in tensor if field.number == 1])
        tag, type_name = wire.decode_string(data, fields[1]), wire.decode_string(data, tensor_type)
        chunks.append(TensorChunk(tag, tuple(dims), type_name, content.start, content.end, value.offset))
    return chunks


def test_header_scan_locates_what_a_full_scan_does(tmp_path):
    rng = np.random.default_rng(2)
    arrays = [
        ("n" * 3000, rng.random(10, np.float32)),  # a name longer than the first read
        ("large", rng.random((1000, 30)).astype(np.float16)),  # cut into several Values
        ("scalar", np.array(3.0, np.float32)),
        ("bf16", rng.random((7, 3), np.float32)),
    ]
    path = tmp_path / "mixed.ckpt"
    write_mindspore_ckpt(path, arrays, chunk_bytes=4000, tensor_types={"bf16": "BFloat16"})
    assert scan_records(path) == _decoded_in_memory(path.read_bytes())
    index = index_mindspore_ckpt(path)
    assert len(index["large"].chunks) == 15 and index["scalar"].shape == ()
    out = np.empty((1000, 30), np.float16)
    read_stored_into(path, index["large"], out)
    assert np.array_equal(out, arrays[1][1])

    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"mixed\.ckpt: not a readable MindSpore checkpoint"):
        scan_records(path)


def test_indexing_reads_the_headers_not_the_tensors(tmp_path, monkeypatch):
    """What lets a release of 512 slice files be indexed without reading them: only the record
    headers are read (no memory map whose page faults would read ahead over the tensor bytes)."""
    arrays = [(f"backbone.blocks.{i}.output.mapping.weight", np.ones((256, 1024), np.float16)) for i in range(8)]
    path = tmp_path / "slice.ckpt"
    write_mindspore_ckpt(path, arrays, chunk_bytes=1 << 18)  # two Values per tensor
    read_bytes = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, length, offset: read_bytes.append(length) or pread(fd, length, offset))
    monkeypatch.setattr(mmap, "mmap", None)  # no mapping of the file either
    index = index_mindspore_ckpt(path)
    assert [stored.shape for stored in index.values()] == [(256, 1024)] * 8
    assert all(len(stored.chunks) == 2 for stored in index.values())
    assert path.stat().st_size > 4_000_000
    assert len(read_bytes) == 16 and sum(read_bytes) <= 16 * 1024  # one small read per Value
