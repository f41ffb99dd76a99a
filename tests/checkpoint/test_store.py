"""The piece store under format 2 (no process group): fragments written under one layout read
under any other, checksums checked by the reader and by `pangu checkpoint verify`, and the
per-tile initialisation that lets a rank draw only its slice."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from pangu.checkpoint import format as fmt
from pangu.checkpoint.boxes import flat_runs
from pangu.checkpoint.store import CorruptCheckpointError, TensorReader, TensorWriter, write_index
from pangu.checkpoint.weights import write_weights
from pangu.cli import main
from pangu.config import ModelConfig
from pangu.model import declaration
from tests.helpers import DeviceTensor

WORDS, POSITIONS = declaration.WORD_EMBEDDING_WEIGHT, declaration.POSITION_EMBEDDING_WEIGHT


def test_flat_runs_are_rectangles_of_the_range_in_order():
    rng = random.Random(0)
    for shape in [(7,), (3, 5), (2, 3, 4), (4, 1, 6)]:
        numbered = torch.arange(math.prod(shape)).reshape(shape)
        for _ in range(50):
            start = rng.randrange(numbered.numel())
            stop = rng.randrange(start + 1, numbered.numel() + 1)
            got = torch.empty(stop - start, dtype=torch.long)
            for first, sizes, at in flat_runs(shape, start, stop):
                block = numbered[tuple(slice(f, f + n) for f, n in zip(first, sizes))]
                got[at : at + block.numel()] = block.reshape(-1)
            assert torch.equal(got, torch.arange(start, stop)), (shape, start, stop)
            assert len(list(flat_runs(shape, start, stop))) <= 2 * len(shape) - 1


def _layout_pieces(full: torch.Tensor, split: int | None, tp: int, dp: int, cuts: random.Random):
    """(writer rank, box, flat range, copy) of a tensor saved like ZeRO-1 does at (dp, tp): each
    tensor-parallel box cut at arbitrary flat positions into dp fragments."""
    out = []
    for t in range(tp):
        box = [(0, n) for n in full.shape]
        if split is not None:
            size = full.shape[split] // tp
            box[split] = (t * size, (t + 1) * size)
        numel = math.prod(b - a for a, b in box)
        bounds = [0, *sorted(cuts.sample(range(1, numel), dp - 1)), numel]
        for d in range(dp):
            copy = t if split is None else 0
            out.append((t * dp + d, tuple(box), (bounds[d], bounds[d + 1]), copy))
    return out


def _region(full: torch.Tensor, box, flat) -> torch.Tensor:
    return full[tuple(slice(a, b) for a, b in box)].reshape(-1)[flat[0] : flat[1]]


@pytest.mark.parametrize("split", [0, 1, None], ids=["rows", "columns", "replicated"])
def test_fragments_saved_under_one_layout_are_read_under_another(tmp_path, split):
    cuts = random.Random(split or 7)
    full = torch.randn(12, 8)
    writers: dict[int, TensorWriter] = {}
    for rank, box, flat, copy in _layout_pieces(full, split, tp=2, dp=3, cuts=cuts):
        writer = writers.setdefault(rank, TensorWriter(tmp_path, f"rank{rank:05d}", hash_file=False))
        data = _region(full, box, flat) if copy == 0 else torch.full((flat[1] - flat[0],), float("nan"))
        writer.add("w", "weight", data, tuple(full.shape), tuple(slice(a, b) for a, b in box), flat=flat, copy=copy)
    write_index(tmp_path, [record for w in writers.values() for record in w.finish()[1]])

    reader = TensorReader(tmp_path)
    assert torch.equal(reader.read("w"), full)  # replicas (NaN here) are not read for another layout
    for rank, box, flat, _ in _layout_pieces(full, split, tp=4, dp=2, cuts=cuts):
        assert torch.equal(reader.read_flat("w", "weight", box, flat), _region(full, box, flat)), (rank, box, flat)
    region = (slice(3, 9), slice(1, 6))
    assert torch.equal(reader.read("w", "weight", region), full[region])
    # the layout that wrote it reads its own pieces, bytes for bytes
    rank, box, flat, copy = _layout_pieces(full, split, tp=2, dp=3, cuts=random.Random(split or 7))[4]
    own = TensorReader(tmp_path, prefer=f"rank{rank:05d}.bin")
    out = torch.empty(flat[1] - flat[0])
    own.read_flat("w", "weight", box, flat, out=out)
    assert own.bytes_read == out.numel() * 4
    assert torch.equal(out, _region(full, box, flat)) or (copy and out.isnan().all())


TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, vocab_size=100, seq_length=8)


def _weights_checkpoint(tmp_path, model: ModelConfig = TINY):
    """A weights-only checkpoint of `model` (random weights) and its tensors."""
    generator = torch.Generator().manual_seed(0)
    tensors = {spec.name: torch.randn(spec.shape, generator=generator) for spec in declaration.parameters(model)}
    return write_weights(tmp_path / "ckpt", model, tensors.items()), tensors


def test_a_flipped_byte_is_found_by_the_reader_and_by_verify(tmp_path, capsys):
    path, tensors = _weights_checkpoint(tmp_path)
    assert main(["checkpoint", "verify", str(path), "--quiet"]) == 0
    shard = path / "tensors" / "rank00000.bin"
    index = json.loads((path / "tensors" / "index.json").read_text())["pieces"]
    offset = next(p["offset"] for p in index if p["name"] == POSITIONS) + 13
    with open(shard, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    fmt.check_structure(path)  # sizes are right: start-up does not read bytes
    reader = TensorReader(path / "tensors")
    assert torch.equal(reader.read(WORDS), tensors[WORDS])  # the other pieces are intact
    with pytest.raises(CorruptCheckpointError, match=rf"rank00000.bin is corrupt: '{POSITIONS}' \(weight\).*checksum"):
        reader.read(POSITIONS)
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "corrupt" and f"rank00000.bin is corrupt: '{POSITIONS}'" in err and "100.0%" in err

    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="rank00000.bin has 100 bytes"):
        fmt.check_structure(path)
    assert main(["checkpoint", "verify", str(path), "--quiet"]) == 1


def test_info_says_what_a_checkpoint_holds(tmp_path, capsys):
    path, tensors = _weights_checkpoint(tmp_path)
    assert main(["checkpoint", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "weights" and info["format"] == 2 and info["step"] == 0
    assert info["parameters"] == sum(t.numel() for t in tensors.values()) and info["state"] == ["weight"]


def test_a_rank_draws_only_the_tiles_of_its_slice(monkeypatch):
    """Initial weights are drawn per fixed tile of the full tensor: every tensor-parallel slice
    equals the slice of the full draw, and a rank draws about its share of the tiles."""
    from pangu.model import declaration, init

    monkeypatch.setattr(init, "TILE_COLUMNS", 16)
    monkeypatch.setattr(init, "TILE_ELEMENTS", 16 * 8)
    drawn = []
    generator_for = init.generator_for
    monkeypatch.setattr(init, "generator_for", lambda seed, name: drawn.append(name) or generator_for(seed, name))
    config = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=500, seq_length=16)
    table = declaration.parameter_table(config)
    for name in (
        "blocks.0.mlp.dense_h_to_4h.weight",
        "blocks.0.mlp.dense_4h_to_h.weight",
        declaration.POSITION_EMBEDDING_WEIGHT,
    ):
        spec = table[name]
        drawn.clear()
        whole = init.draw(spec, spec.local_range(0, 1), seed=3)
        tiles = len(drawn)
        assert tiles > 4 and whole.shape == spec.shape
        for tp in (2, 4):
            for rank in range(tp):
                drawn.clear()
                part = init.draw(spec, spec.local_range(rank, tp), seed=3)
                assert torch.equal(part, whole[spec.local_index(rank, tp)]), (name, tp, rank)
                assert len(drawn) == (tiles if spec.split_dim is None else tiles // tp), (name, tp, rank)


def test_async_save_is_a_checked_config_field():
    from pangu.config import load_config
    from pangu.schema import ConfigError

    assert load_config(None, []).train.async_save is False
    assert load_config(None, ["train.async_save=true"]).train.async_save is True
    with pytest.raises(ConfigError, match="train.async_save = 'maybe' is not allowed: expected true or false"):
        load_config(None, ["train.async_save=maybe"])


def test_pieces_reach_a_destination_that_is_not_host_memory(tmp_path):
    """Every read path (the exact piece from its file, the same from a preloaded file, pieces
    assembled under another layout, a cast on the way) fills a destination that cannot be read
    into directly, as a GPU tensor; the meta device too."""
    cuts = random.Random(3)
    full = torch.randn(12, 8)
    written = _layout_pieces(full, 0, tp=2, dp=3, cuts=cuts)
    writers: dict[int, TensorWriter] = {}
    for rank, box, flat, _ in written:
        writer = writers.setdefault(rank, TensorWriter(tmp_path, f"rank{rank:05d}", hash_file=False))
        writer.add("w", "weight", _region(full, box, flat), (12, 8), tuple(slice(a, b) for a, b in box), flat=flat)
    write_index(tmp_path, [record for w in writers.values() for record in w.finish()[1]])

    def device(n: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype).as_subclass(DeviceTensor)

    for preload in (False, True):
        for rank, box, flat, _ in written:  # the layout that wrote it: exact pieces, its own file
            reader = TensorReader(tmp_path, prefer=f"rank{rank:05d}.bin")
            if preload:
                reader.preload(f"rank{rank:05d}.bin")
            out = reader.read_flat("w", "weight", box, flat, out=device(flat[1] - flat[0]))
            assert torch.equal(out.as_subclass(torch.Tensor), _region(full, box, flat)), (preload, rank)
    reader = TensorReader(tmp_path)
    for _, box, flat, _ in _layout_pieces(full, 0, tp=4, dp=2, cuts=cuts):  # another layout: assembled
        out = reader.read_flat("w", "weight", box, flat, out=device(flat[1] - flat[0], torch.bfloat16))
        assert torch.equal(out.as_subclass(torch.Tensor), _region(full, box, flat).bfloat16()), (box, flat)
        on_meta = torch.empty(flat[1] - flat[0], device="meta")
        assert reader.read_flat("w", "weight", box, flat, out=on_meta) is on_meta
    _, box, flat, _ = written[0]
    assert reader.read_flat("w", "weight", box, flat, out=torch.empty(flat[1] - flat[0], device="meta")).is_meta


def test_ctrl_c_stops_verify_at_its_next_block(tmp_path, monkeypatch):
    """verify checks files in worker threads: Ctrl-C stops each at its next block, and no file
    waiting for a worker is started (the scrub of a large checkpoint does not run on to its end)."""
    import os
    import signal
    import threading
    import time

    from pangu.checkpoint import verify

    path, _ = _weights_checkpoint(tmp_path)
    blocks = []

    def slow_checksum(file, algorithm="xxh3", start=0, length=None, progress=None):
        for _ in range(100):  # 1 s a piece, about 40 s for the checkpoint
            time.sleep(0.01)
            blocks.append(file)
            progress(1)
        return 0

    monkeypatch.setattr(verify, "file_checksum", slow_checksum)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        verify.scrub(path, workers=2)
    assert time.perf_counter() - start < 2.0
    read = len(blocks)
    time.sleep(0.2)
    assert len(blocks) == read < 100  # nothing went on after the interruption
