"""What reading a checkpoint's index as untrusted input costs each rank at a resume: the index of a
PanGu-α checkpoint at its configured layout (default: 200b at (dp, tp, pp) = (16, 8, 16), 2048
ranks), as ZeRO-1 cuts it (each stage's tensor-parallel slices, per param group, split evenly
over the data-parallel ranks; a piece per fragment and stored tensor: the weight and S3's m and s),
read by `TensorReader` (typed records through schema.from_dict, every piece checked against the
files the manifest lists and the shapes the model declares) against `json.loads` of the same
bytes alone, the floor any reader pays. Interleaved, the median of --repeat runs; the ratio is
the figure (the machine is shared).

    python bench/checkpoint_index.py [--config 200b] [--dp 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pangu.checkpoint.format import declared_shapes
from pangu.checkpoint.store import TensorReader
from pangu.config import load_config
from pangu.model import declaration


def index_records(model, dp: int, tp: int, pp: int) -> tuple[list[dict], dict[str, int]]:
    """Piece records as every rank of the layout writes them, and each rank file's size."""
    params = declaration.parameters(model)
    stages = [params[i * len(params) // pp : (i + 1) * len(params) // pp] for i in range(pp)]
    records, sizes = [], {}
    for stage, stage_params in enumerate(stages):
        for t in range(tp):
            for decays in (True, False):
                group = [p for p in stage_params if p.weight_decay == decays]
                boxes = [p.local_range(t, tp) for p in group]
                numels = [_numel(box) for box in boxes]
                total = sum(numels)
                bounds = [d * -(-total // dp) for d in range(dp + 1)]
                start = 0
                for spec, box, numel in zip(group, boxes, numels):
                    for d in range(dp):
                        lo, hi = max(start, bounds[d]), min(start + numel, bounds[d + 1])
                        if lo >= hi:
                            continue
                        rank = (stage * dp + d) * tp + t
                        file = f"rank{rank:05d}.bin"
                        for key in ("weight", "m", "s"):
                            offset = sizes.get(file, 0)
                            records.append(
                                {
                                    "name": spec.name,
                                    "key": key,
                                    "dtype": "float32",
                                    "offset": offset,
                                    "full_shape": list(spec.shape),
                                    "index": [list(r) for r in box],
                                    "flat": [lo - start, hi - start],
                                    "xxh3": 1234567890123456789,
                                    "copy": 0 if spec.split_dim is not None else t,
                                    "file": file,
                                }
                            )
                            sizes[file] = offset + 4 * (hi - lo)
                    start += numel
    return records, sizes


def _numel(box) -> int:
    count = 1
    for a, b in box:
        count *= b - a
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="200b")
    parser.add_argument("--dp", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config)
    tp, pp = config.parallel.tp, config.parallel.pp
    records, sizes = index_records(config.model, args.dp, tp, pp)
    data = json.dumps({"pieces": records}, separators=(",", ":")).encode()
    shapes = declared_shapes(config.model)
    plain, typed = [], []
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.repeat):
            start = time.perf_counter()
            json.loads(data)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            reader = TensorReader(Path(directory), index=data, sizes=sizes, shapes=shapes)
            typed.append(time.perf_counter() - start)
    assert len(reader.pieces()) == len(records)
    plain_s, typed_s = statistics.median(plain), statistics.median(typed)
    print(
        f"{args.config} at (dp, tp, pp) = ({args.dp}, {tp}, {pp}): {len(records):,} pieces, "
        f"index {len(data) / 2**20:.1f} MiB\n"
        f"  json.loads alone:              {plain_s:.3f} s\n"
        f"  TensorReader (typed, checked): {typed_s:.3f} s ({1e6 * typed_s / len(records):.1f} us per piece)\n"
        f"  ratio:                         {typed_s / plain_s:.2f}"
    )


if __name__ == "__main__":
    main()
