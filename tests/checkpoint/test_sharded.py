"""Every rank writes and reads only its share: bytes per rank measured from the files each rank
created (tensors/rank{R}.bin) at (4, 1, 1) and, for both engines, (2, 2, 2) (the layout tests'
runs); what each rank read on a same-layout resume (the run's resume_read record); a corrupt piece
found by the rank that reads it makes every rank fall back to the previous checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import losses, tiny_overrides, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SETTINGS = ("model.dropout=0.0", "train.micro_batch_size=1", "train.save_interval=2", "train.steps=4")


def pretrain(corpus: Path, out: Path, layout: tuple[int, int, int], *extra: str):
    dp, tp, pp = layout
    script = out.parent / "pretrain.py"
    script.write_text("import sys\nfrom pangu.cli import entry\nentry(['pretrain', *sys.argv[1:]])\n")
    args = tiny_overrides(corpus, out, *SETTINGS, f"parallel.tp={tp}", f"parallel.pp={pp}", *extra)
    return torchrun(script, args, dp * tp * pp)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def bytes_per_rank(checkpoint: Path) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for file in (checkpoint / "tensors").glob("rank*.bin"):
        rank = int(file.stem.removeprefix("rank"))
        sizes[rank] = sizes.get(rank, 0) + file.stat().st_size
    return sizes


@pytest.fixture(scope="module")
def dp4(tiny_corpus, tmp_path_factory) -> Path:
    """(4, 1, 1): stopped after checkpoint 2, resumed on the same layout to checkpoint 4."""
    out = tmp_path_factory.mktemp("dp4") / "run"
    for extra in (["train.stop_at=2"], []):
        done = pretrain(tiny_corpus, out, (4, 1, 1), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("run", ["dp4", "deepspeed-222", "torch-222"])
def test_every_rank_writes_its_share(run, request):
    if run == "dp4":
        checkpoint = request.getfixturevalue("dp4") / "checkpoints" / "step_00000002"
    else:
        checkpoint = Path(request.getfixturevalue("layout_runs")[run]["checkpoint"])
    sizes = bytes_per_rank(checkpoint)
    world = 4 if run == "dp4" else 8
    assert sorted(sizes) == list(range(world))  # every rank wrote, every rank holds optimizer state
    mean = sum(sizes.values()) / world
    assert max(sizes.values()) <= 1.5 * mean, sizes
    # nothing else is tensor data: rank 0 adds only metadata (index, manifest, trainer state, tokenizer)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["pieces"] > 0
    assert sorted(p.name for p in (checkpoint / "tensors").iterdir()) == ["index.json"] + [
        f"rank{r:05d}.bin" for r in range(world)
    ]


def test_a_same_layout_resume_reads_only_each_ranks_own_share(dp4):
    written = bytes_per_rank(dp4 / "checkpoints" / "step_00000002")
    [read] = [e["per_rank"] for e in events(dp4) if e.get("event") == "resume_read"]
    assert len(read) == 4
    for rank, figures in enumerate(read):
        own = figures["share_bytes"]
        assert 0 < figures["bytes"] <= 1.2 * own, (rank, figures)
        assert own <= written[rank]  # its share is what it wrote (plus its RNG file)
    [resumed] = [e for e in events(dp4) if e.get("event") == "resumed"]
    assert resumed["step"] == 2 and resumed["read_over_share"] <= 1.2


def test_a_corrupt_piece_makes_every_rank_fall_back(tiny_corpus, dp4, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(dp4, out)
    checkpoint = out / "checkpoints" / "step_00000004"
    index = json.loads((checkpoint / "tensors" / "index.json").read_text())["pieces"]
    piece = next(p for p in index if p["file"] == "rank00002.bin" and p["key"] == "s")
    with open(checkpoint / "tensors" / "rank00002.bin", "r+b") as f:
        f.seek(piece["offset"])
        first = f.read(1)
        f.seek(piece["offset"])
        f.write(bytes([first[0] ^ 0x01]))
    done = pretrain(tiny_corpus, out, (4, 1, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank00002.bin is corrupt" in done.stderr and "falling back to step_00000002" in done.stderr
    assert [e["checkpoint"] for e in events(out) if e.get("event") == "resumed"][-1].endswith("step_00000002")
    reference = losses(dp4)
    assert {step: losses(out)[step] for step in (3, 4)} == {step: reference[step] for step in (3, 4)}
