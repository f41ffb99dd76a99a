"""`pangu checkpoint`: verify (a full scrub of every byte, in parallel), info (what a checkpoint
holds) and upgrade (format 1 to format 2) for one checkpoint, checkpoints or run directory."""

from __future__ import annotations

import os
import sys
import time


def add_parser(commands) -> None:
    parser = commands.add_parser("checkpoint", help="verify, describe or upgrade a checkpoint")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verify = verbs.add_parser("verify", help="check every byte against its checksum (exit 1 if any is wrong)")
    verify.add_argument("path", help="a checkpoint, checkpoints directory or run directory (its latest)")
    verify.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="files read in parallel (default: CPUs, <= 8)"
    )
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    info = verbs.add_parser("info", help="step, layout, sizes and what a checkpoint holds")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    upgrade = verbs.add_parser("upgrade", help="convert a format-1 checkpoint to format 2 (a new directory)")
    upgrade.add_argument("path")
    upgrade.add_argument("out")


def run(args) -> int:
    from pangu.checkpoint import verify

    if args.verb == "verify":
        bar = None if args.quiet else ProgressBar()
        problems = verify.scrub(args.path, workers=args.workers, progress=bar)
        if bar is not None:
            bar.close()
        for problem in problems:
            print(f"pangu checkpoint verify: {problem}", file=sys.stderr)
        print("corrupt" if problems else "intact")
        return 1 if problems else 0
    if args.verb == "info":
        info = verify.describe(args.path)
        print(verify.dumps(info) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in info.items()))
        return 0
    print(verify.upgrade(args.path, args.out))
    return 0


class ProgressBar:
    """bytes done / all, rate and ETA on one stderr line (redrawn at most 5 times a second)."""

    def __init__(self):
        self.start = self.shown = time.perf_counter()
        self.last = (0, 0)
        self.drawn = (-1, -1)

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        now = time.perf_counter()
        if now - self.shown >= 0.2:
            self.shown = now
            self.draw(done, total, now)

    def draw(self, done: int, total: int, now: float) -> None:
        fraction = done / total if total else 1.0
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(30 * fraction)
        self.drawn = (done, total)
        print(
            f"\r[{bar:<30}] {fraction:6.1%} {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB {rate / 2**20:,.0f} MiB/s "
            f"ETA {eta:,.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.drawn != self.last:
            self.draw(*self.last, time.perf_counter())
        print(file=sys.stderr, flush=True)
