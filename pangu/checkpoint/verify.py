"""Offline tools for one checkpoint, behind `pangu checkpoint`: a full scrub of every byte and of
everything a loader relies on (`scrub`, files checked in parallel), a description (`describe`),
and the conversion of a format-1 checkpoint to format 2 (`upgrade`). None needs torch.distributed."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import (
    INDEX_FILE,
    CheckpointError,
    Piece,
    TensorReader,
    TensorWriter,
    file_checksum,
    sha256_file,
    write_index,
)
from pangu.files import confined, write_synced


def scrub(path: str | Path, workers: int = 4, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Every problem of a checkpoint (empty: intact), checking what the loaders rely on: its
    structure (the typed manifest, its model valid and within what its files hold, every file
    inside the checkpoint, present, of its size), the typed index (every piece inside its file, of
    the shape the model declares, with a checksum in format 2), that the primary pieces cover every
    declared parameter and every stored tensor exactly once, every piece's and small file's
    checksum (format 1: every file's sha256), the trainer state, the RNG files (read without
    unpickling code) and the tokenizer against the fingerprint of the one the run trained with.
    Files are read by `workers` threads; `progress(bytes done, bytes in all)` is called as they go."""
    path = fmt.resolve(path)
    try:
        manifest = fmt.check_structure(path)
    except CheckpointError as err:
        return [str(err)]
    problems: list[str] = []
    pieces_by_file: dict[Path, list[Piece]] | None = defaultdict(list)
    try:
        reader = fmt.tensor_reader(path, manifest)
        for piece in reader.pieces():
            pieces_by_file[piece.file].append(piece)
        problems += _coverage(reader, fmt.declared_shapes(manifest.model))
    except CheckpointError as err:
        problems.append(str(err))
        pieces_by_file = None  # the index is damaged (said): its files' bytes are not checked piece by piece
    total = sum(info.bytes for info in manifest.files.values())
    done = [0]
    lock = threading.Lock()
    stopping = threading.Event()  # Ctrl-C: every worker stops at its next block

    def advance(n: int) -> None:
        if stopping.is_set():
            raise _Stopped
        with lock:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

    def check(rel: str) -> list[str]:
        file, info = path / rel, manifest.files[rel]
        algorithm = next((a for a in ("xxh3", "crc32") if getattr(info, a) is not None), None)
        if algorithm is not None:
            good = file_checksum(file, algorithm, progress=advance) == getattr(info, algorithm)
            return [] if good else [f"{file} does not match its checksum"]
        if info.sha256:
            digest = sha256_file(file, progress=advance)
            return [] if digest == info.sha256 else [f"{file} does not match its checksum"]
        if pieces_by_file is None:
            advance(info.bytes)
            return []
        if file not in pieces_by_file:
            advance(info.bytes)
            return [f"{file} is not checked: the manifest lists no checksum for it, and no piece lies in it"]
        found, covered = [], 0
        for piece in sorted(pieces_by_file[file], key=lambda p: p.offset):
            algorithm = piece.checksum[0] if piece.checksum else "xxh3"
            digest = file_checksum(file, algorithm, piece.offset, piece.nbytes, progress=advance)
            covered += piece.nbytes
            if piece.checksum is not None and digest != piece.checksum[1]:
                found.append(
                    f"{file} is corrupt: {piece.name!r} ({piece.key}) at byte {piece.offset} does not match its checksum"
                )
        advance(info.bytes - covered)
        return found

    damaged = set()
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for rel, found in zip(sorted(manifest.files), pool.map(check, sorted(manifest.files))):
            problems += found
            damaged |= {rel} if found else set()
    except BaseException:
        stopping.set()
        raise
    finally:
        pool.shutdown(cancel_futures=True)  # no file waiting for a worker is started after an interruption
    return problems + _small_files(path, manifest, damaged)


class _Stopped(Exception):
    """Ends a worker's file at its next block once the scrub is interrupted."""


def _small_files(path: Path, manifest: fmt.Manifest, damaged: set[str]) -> list[str]:
    """What the loaders read besides pieces, read as they read it: the trainer state and the
    tokenizer (against the fingerprint of the run's), unless their bytes are already known to be
    damaged. (The RNG files older checkpoints carry are not read by any loader: dropout is seeded
    by the step and the micro-batch.)"""
    reads = []
    if manifest.kind == "training" and fmt.TRAINER_FILE not in damaged:
        reads.append(lambda: fmt.read_trainer_state(path, manifest))
    if fmt.TOKENIZER_FILE not in damaged:
        reads.append(lambda: fmt.read_tokenizer(path, manifest))
    problems = []
    for read in reads:
        try:
            read()
        except CheckpointError as err:
            problems.append(str(err))
    return problems


def _coverage(reader: TensorReader, declared: dict[str, tuple[int, ...]]) -> list[str]:
    """Every declared parameter is stored, and each stored tensor's primary pieces hold exactly its
    number of elements."""
    counted: dict[tuple[str, str], int] = defaultdict(int)
    for piece in reader.pieces():
        if piece.copy == 0:
            counted[(piece.name, piece.key)] += piece.numel
    problems = [f"{name!r}: the checkpoint holds no weights for it" for name in sorted(set(declared) - reader.names())]
    return problems + [
        f"{name!r} ({key}): pieces hold {n} of its {math.prod(declared[name])} elements"
        for (name, key), n in sorted(counted.items())
        if n != math.prod(declared[name])
    ]


def describe(path: str | Path) -> dict:
    """What a checkpoint holds: step, kind, format, layout, model, optimizer, sizes."""
    path = fmt.resolve(path)
    manifest = fmt.check_structure(path)
    reader = fmt.tensor_reader(path, manifest)
    pieces = reader.pieces()
    keys = sorted({p.key for p in pieces})
    per_file: dict[str, int] = defaultdict(int)
    for rel, info in manifest.files.items():
        if rel.startswith(("tensors/rank", "rng/rank")):
            per_file[Path(rel).stem] += info.bytes
    weights = [p for p in pieces if p.key == "weight" and p.copy == 0]
    info = {
        "checkpoint": str(path),
        "format": manifest.version,
        "kind": manifest.kind,
        "step": manifest.step,
        "layout": dataclasses.asdict(manifest.layout),
        "optimizer": manifest.optimizer,
        "parameters": sum(p.numel for p in weights),
        "tensors": len({(p.name, p.key) for p in pieces}),
        "state": keys,
        "pieces": len(pieces),
        "files": len(manifest.files),
        "bytes": sum(i.bytes for i in manifest.files.values()),
        "tokenizer": fmt.TOKENIZER_FILE in manifest.files,
    }
    if per_file:
        sizes = sorted(per_file.values())
        info["bytes_per_rank"] = {"min": sizes[0], "mean": sum(sizes) // len(sizes), "max": sizes[-1]}
    return info


def upgrade(src: str | Path, out: str | Path) -> Path:
    """A format-2 copy of a format-1 checkpoint in `out` (one tensor at a time, written whole:
    any layout reads it); the trainer state and tokenizer are copied, the RNG states rewritten
    without pickle. Every file the manifest names is read from inside SRC and written inside OUT."""
    src, out = fmt.resolve(src), Path(out)
    manifest = fmt.check_structure(src)
    if manifest.version >= fmt.VERSION:
        raise CheckpointError(f"{src} is already format {manifest.version}: nothing to upgrade")
    if out.exists():
        raise CheckpointError(f"{out} already exists: choose a new output directory")
    for rel, info in manifest.files.items():  # format 1 has a sha256 per file: check them all first
        if info.sha256 and sha256_file(confined(src, rel)) != info.sha256:
            raise CheckpointError(f"{src / rel} does not match its checksum: the checkpoint is corrupt")
    tmp = fmt.temporary_beside(out)
    reader = fmt.tensor_reader(src, manifest)
    try:
        (tmp / "tensors").mkdir()
        writer = TensorWriter(tmp / "tensors", "rank00000", hash_file=False)
        try:
            for name in sorted(reader.names()):
                for key in sorted(reader.keys(name)):
                    writer.add(name, key, reader.read(name, key), reader.full_shape(name, key))
            size, records = writer.finish()
        except BaseException:
            writer.abort()
            raise
        write_index(tmp / "tensors", records)
        files = {
            "tensors/rank00000.bin": fmt.FileRecord(bytes=size),
            f"tensors/{INDEX_FILE}": fmt.file_entry(tmp / "tensors" / INDEX_FILE),
        }
        # the RNG files of format 1 are left behind: nothing reads them (dropout is seeded by the
        # step and the micro-batch), and they are pickles
        for rel in sorted(r for r in manifest.files if not r.startswith(("tensors/", "rng/"))):
            data = fmt.read_checked(src, rel, manifest)
            target = confined(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_synced(target, data)
            files[rel] = fmt.file_entry(target)
        manifest = dataclasses.replace(manifest, upgraded_from=1, pieces=len(records), files=files)
        fmt.write_manifest(tmp, manifest)
        fmt.publish_new(tmp, out)
    except BaseException:
        fmt.discard(tmp)
        raise
    finally:
        reader.close()
    return out


def dumps(info: dict) -> str:
    return json.dumps(info, indent=1)
