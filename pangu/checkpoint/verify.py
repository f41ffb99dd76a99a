"""Offline tools for one checkpoint, behind `pangu checkpoint`: a full scrub of every byte
(`scrub`, files checked in parallel), a description (`describe`), and the conversion of a
format-1 checkpoint to format 2 (`upgrade`). None needs torch.distributed."""

from __future__ import annotations

import json
import math
import shutil
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
    write_file_synced,
    write_index,
)


def scrub(path: str | Path, workers: int = 4, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Every problem of a checkpoint (empty: intact): its structure, every piece's checksum (or, in
    format 1, every file's sha256), every small file's checksum, and that the primary pieces of
    every stored tensor cover it exactly once. Files are read by `workers` threads;
    `progress(bytes done, bytes in all)` is called as they go."""
    path = fmt.resolve(path)
    try:
        manifest = fmt.check_structure(path)
    except CheckpointError as err:
        return [str(err)]
    index_rel = f"tensors/{INDEX_FILE}"
    problems: list[str] = []
    pieces_by_file: dict[Path, list[Piece]] = defaultdict(list)
    try:
        index = fmt.read_checked(path, index_rel, manifest) if index_rel in manifest["files"] else None
        reader = TensorReader(path / "tensors", index=index)
        for piece in reader.pieces():
            pieces_by_file[piece.file].append(piece)
        problems += _coverage(reader)
    except (CheckpointError, ValueError, KeyError) as err:
        problems.append(f"{path / index_rel}: {err}")
    total = sum(info["bytes"] for info in manifest["files"].values())
    done = [0]
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

    def check(rel: str) -> list[str]:
        file, info = path / rel, manifest["files"][rel]
        algorithm = next((a for a in ("xxh3", "crc32") if a in info), None)
        if algorithm is not None:
            good = file_checksum(file, algorithm, progress=advance) == info[algorithm]
            return [] if good else [f"{file} does not match its checksum"]
        if info.get("sha256"):
            digest = sha256_file(file)
            advance(info["bytes"])
            return [] if digest == info["sha256"] else [f"{file} does not match its checksum"]
        found, covered = [], 0
        for piece in sorted(pieces_by_file.get(file, []), key=lambda p: p.offset):
            algorithm = piece.checksum[0] if piece.checksum else "xxh3"
            digest = file_checksum(file, algorithm, piece.offset, piece.nbytes, progress=advance)
            covered += piece.nbytes
            if piece.checksum is not None and digest != piece.checksum[1]:
                found.append(
                    f"{file} is corrupt: {piece.name!r} ({piece.key}) at byte {piece.offset} does not match its checksum"
                )
        advance(info["bytes"] - covered)
        return found

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(check, sorted(manifest["files"])):
            problems += found
    return problems


def _coverage(reader: TensorReader) -> list[str]:
    """Each stored tensor's primary pieces hold exactly its number of elements."""
    counted: dict[tuple[str, str], int] = defaultdict(int)
    shapes = {}
    for piece in reader.pieces():
        if piece.copy == 0:
            counted[(piece.name, piece.key)] += piece.numel
            shapes[(piece.name, piece.key)] = piece.full_shape
    return [
        f"{name!r} ({key}): pieces hold {n} of its {math.prod(shapes[(name, key)])} elements"
        for (name, key), n in sorted(counted.items())
        if n != math.prod(shapes[(name, key)])
    ]


def describe(path: str | Path) -> dict:
    """What a checkpoint holds: step, kind, format, layout, model, optimizer, sizes."""
    path = fmt.resolve(path)
    manifest = fmt.check_structure(path)
    index_rel = f"tensors/{INDEX_FILE}"
    index = fmt.read_checked(path, index_rel, manifest) if index_rel in manifest["files"] else None
    reader = TensorReader(path / "tensors", index=index)
    pieces = reader.pieces()
    keys = sorted({p.key for p in pieces})
    per_file: dict[str, int] = defaultdict(int)
    for rel, info in manifest["files"].items():
        if rel.startswith(("tensors/rank", "rng/rank")):
            per_file[Path(rel).stem] += info["bytes"]
    weights = [p for p in pieces if p.key == "weight" and p.copy == 0]
    info = {
        "checkpoint": str(path),
        "format": manifest.get("version", 1),
        "kind": manifest["kind"],
        "step": manifest["step"],
        "layout": manifest["layout"],
        "optimizer": manifest.get("config", {}).get("optim", {}).get("name"),
        "parameters": sum(p.numel for p in weights),
        "tensors": len({(p.name, p.key) for p in pieces}),
        "state": keys,
        "pieces": len(pieces),
        "files": len(manifest["files"]),
        "bytes": sum(i["bytes"] for i in manifest["files"].values()),
        "tokenizer": "tokenizer.model" in manifest["files"],
    }
    if per_file:
        sizes = sorted(per_file.values())
        info["bytes_per_rank"] = {"min": sizes[0], "mean": sum(sizes) // len(sizes), "max": sizes[-1]}
    return info


def upgrade(src: str | Path, out: str | Path) -> Path:
    """A format-2 copy of a format-1 checkpoint in `out` (one tensor at a time, written whole:
    any layout reads it); the RNG states, trainer state and tokenizer are copied."""
    src, out = fmt.resolve(src), Path(out)
    manifest = fmt.check_structure(src)
    if manifest.get("version", 1) >= fmt.VERSION:
        raise CheckpointError(f"{src} is already format {manifest['version']}: nothing to upgrade")
    if out.exists():
        raise CheckpointError(f"{out} already exists: choose a new output directory")
    for rel, info in manifest["files"].items():  # format 1 has a sha256 per file: check them all first
        if info.get("sha256") and sha256_file(src / rel) != info["sha256"]:
            raise CheckpointError(f"{src / rel} does not match its checksum: the checkpoint is corrupt")
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    reader = TensorReader(src / "tensors")
    writer = TensorWriter(tmp / "tensors", "rank00000", hash_file=False)
    try:
        for name in sorted(reader.names()):
            for key in sorted(reader.keys(name)):
                writer.add(name, key, reader.read(name, key), reader.full_shape(name, key))
        size, records = writer.finish()
        write_index(tmp / "tensors", records)
        files = {"tensors/rank00000.bin": {"bytes": size}}
        for rel in sorted(manifest["files"]):
            if not rel.startswith("tensors/"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                write_file_synced(tmp / rel, (src / rel).read_bytes())
        for rel in [f"tensors/{INDEX_FILE}"] + [r for r in manifest["files"] if not r.startswith("tensors/")]:
            files[rel] = fmt.file_entry(tmp / rel)
        upgraded = {k: v for k, v in manifest.items() if k not in ("format", "version", "files")}
        fmt.write_manifest(tmp, {**upgraded, "upgraded_from": 1, "pieces": len(records), "files": files})
        fmt.publish(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out


def dumps(info: dict) -> str:
    return json.dumps(info, indent=1)
