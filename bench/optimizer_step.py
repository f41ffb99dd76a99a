"""Time one optimizer step of S3 against torch's AdamW on the same parameters.

    python bench/optimizer_step.py                  # 1M and 16M elements (~1-2 min on 2 cores)
    python bench/optimizer_step.py --sizes 100M --repeats 10 --layouts flat

Two layouts of the same elements:
- tensors: one tensor per weight of a stack of transformer blocks (80 tensors), as a plain
  training loop hands them over. Every fused call has a fixed cost (torch.compile's ~25 us
  call path), which small tensors do not amortise.
- flat: one flat tensor per param group (decay, no decay), which is what pangu's optimizer
  actually receives: DeepSpeed ZeRO-1 passes it flat fp32 partitions.

Every optimizer steps the same parameters and gradients (the timing does not depend on their
values), each with its own state. Steps are interleaved (A B C ... A B C ...) so that machine
noise hits all of them alike; the first --warmup rounds (which include torch.compile) are
dropped and the median of the rest is reported, with its ratio to AdamW(fused=True) measured
in the same run. Runs on CUDA when available.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from pangu.optim.s3 import S3

# (hidden size, layers) of a stack of transformer blocks holding about that many elements.
SIZES = {"1M": (128, 5), "16M": (512, 5), "100M": (1024, 8)}
LAYOUTS = ("tensors", "flat")

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
    "S3 foreach p=2": lambda params: S3(params, lr=1e-4, p=2.0),
    "S3 foreach p=3": lambda params: S3(params, lr=1e-4, p=3.0),
    "S3 fused p=2": lambda params: S3(params, lr=1e-4, p=2.0, fused=True),
    "S3 fused p=3": lambda params: S3(params, lr=1e-4, p=3.0, fused=True),
}
BASELINE = "AdamW fused"


def block_shapes(hidden: int) -> list[tuple[int, ...]]:
    """Parameter shapes of one pre-LN transformer block (separate Q, K, V as in PanGu-alpha)."""
    h, ffn = hidden, 4 * hidden
    return [
        (h,),
        (h,),  # LayerNorm 1
        (h, h),
        (h,),
        (h, h),
        (h,),
        (h, h),
        (h,),  # Q, K, V
        (h, h),
        (h,),  # attention output
        (h,),
        (h,),  # LayerNorm 2
        (ffn, h),
        (ffn,),
        (h, ffn),
        (h,),
    ]  # FFN up, down


def layout_shapes(size: str, layout: str) -> list[tuple[int, ...]]:
    hidden, layers = SIZES[size]
    shapes = block_shapes(hidden) * layers
    if layout == "tensors":
        return shapes
    matrices = sum(math.prod(shape) for shape in shapes if len(shape) > 1)
    vectors = sum(math.prod(shape) for shape in shapes if len(shape) == 1)
    return [(matrices,), (vectors,)]  # the decay and no-decay groups, flattened


def make_params(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device))
        param.grad = torch.randn(shape, generator=generator, device=device)
        params.append(param)
    return params


def time_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Milliseconds of one optimizer.step()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def bench(
    shapes: list[tuple[int, ...]], repeats: int, warmup: int, device: torch.device, names: tuple[str, ...] = ()
) -> dict[str, float]:
    """Median ms per step of the optimizers `names` of OPTIMIZERS (default: every one), interleaved."""
    params = make_params(shapes, device)
    optimizers = {name: make(params) for name, make in OPTIMIZERS.items() if not names or name in names}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            elapsed = time_step(optimizer, device)
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,16M", help=f"comma-separated, from {', '.join(SIZES)} (default: 1M,16M)")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)} (default: both)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first rounds, compilation included (default: 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default: torch's choice). On a shared machine 1 "
        "avoids timing the wait for a descheduled second thread",
    )
    args = parser.parse_args()
    sizes, layouts = args.sizes.split(","), args.layouts.split(",")
    unknown = [name for name in sizes if name not in SIZES]
    unknown += [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown sizes or layouts {unknown}; sizes: {list(SIZES)}, layouts: {list(LAYOUTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"median of {args.repeats} interleaved steps after {args.warmup} warmup rounds"
    )
    print(f"{'size':>6} {'layout':<8} {'optimizer':<16} {'ms/step':>9} {'vs ' + BASELINE:>16}")
    for size in sizes:
        for layout in layouts:
            shapes = layout_shapes(size, layout)
            medians = bench(shapes, args.repeats, args.warmup, device)
            for name, median in medians.items():
                print(f"{size:>6} {layout:<8} {name:<16} {median:>9.2f} {median / medians[BASELINE]:>15.2f}x")
            elements = sum(math.prod(shape) for shape in shapes)
            print(f"{'':>6} {'':<8} ({elements / 1e6:.1f}M elements in {len(shapes)} tensors)")


if __name__ == "__main__":
    main()
