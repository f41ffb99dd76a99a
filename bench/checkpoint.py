"""Checkpoint cost of pangu's format against DeepSpeed's own `save_checkpoint`/`load_checkpoint` on
the same engine, in the same run, on CPU ranks (gloo).

For each layout (default: dp 4, and (dp, tp, pp) = (2, 2, 1)) one torchrun job of 4 processes
builds a PanGu-α of about 300M parameters (the 350m config's shapes with fewer layers, or what
--layers/--hidden give), takes one training step (S3: the optimizer state exists), then measures:
- the time the training loop is blocked by a pangu save, synchronous and with train.async_save
  (the save call plus the next optimizer step's wait for the background copy), the background
  copy and write, and a training step run while it writes against one alone;
- DeepSpeed's save_checkpoint and load_checkpoint on the same engine;
- pangu's load of its checkpoint into the same engine;
- start-up: building the engine with initialisation (a fresh run) against building it without
  and resuming from the checkpoint as the trainer does (its share read while the engine is
  built), each in a new job of its own, alternately;
- bytes written and read per rank, from the kernel's count for each process (/proc/self/io
  wchar/rchar, so DeepSpeed's files and pangu's are counted alike).
Times are the slowest rank's, between barriers, the median of --repeat interleaved repeats. The
machine is shared, so the ratios between figures of the same job are the evidence, not the
absolute times.

    python bench/checkpoint.py [--layers 21] [--hidden 1024] [--layouts 4,1,1 2,2,1] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss() -> int:
    """This process's resident memory now, bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"written": int(fields["wchar"]), "read": int(fields["rchar"])}


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from pangu.checkpoint.saver import Checkpointer
    from pangu.checkpoint.training import load_checkpoint
    from pangu.config import load_config
    from pangu.data.dataset import make_batch
    from pangu.parallel.engine import MicroBatch, build_engine
    from pangu.parallel.topology import init_distributed

    dp, tp, pp = args.layout
    out = Path(args.out)
    overrides = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_heads={args.hidden // 64}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        "model.vocab_size=40000",
        f"model.seq_length={args.seq}",
        "model.dropout=0.0",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={dp}",
        "train.steps=10",
        f"train.output_dir={out / 'run'}",
        "train.keep_checkpoints=4",
        "optim.name=s3",
    ]
    config = load_config(None, overrides)
    topology = init_distributed(config.parallel)
    torch.manual_seed(config.train.seed)
    rank = topology.rank
    figures: dict = {}

    def timed(name: str, action, count_io: bool = True):
        """Runs `action` between barriers; appends this rank's seconds (and bytes) to figures[name]."""
        dist.barrier()
        before = io_counters()
        start = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - start
        after = io_counters()
        dist.barrier()
        record = {"seconds": seconds, "rss_after": rss()}
        if count_io:
            record.update({k: after[k] - before[k] for k in after})
        figures.setdefault(name, []).append(record)
        return result

    if args.phase != "main":  # one start-up per process: an engine's memory is not given back
        resumed = args.phase == "resumed"

        def startup():  # as the trainer starts
            checkpoints = Checkpointer(out / "run", config, topology)
            if resumed:  # this rank's share is read while the engine is built
                checkpoints.prefetch(out / "run" / "checkpoints" / "step_00000001")
            engine = build_engine(config, topology, initialize=not resumed)
            if resumed:
                checkpoints.restore(engine, [out / "run" / "checkpoints" / "step_00000001"])
            engine.create_optimizer_state()  # the trainer's next step: a fresh run's state is made

        timed(f"{args.phase}_startup", startup, count_io=resumed)
        gathered = [None] * topology.world_size
        dist.all_gather_object(gathered, figures)
        if rank == 0:
            with open(out / "startup.jsonl", "a") as f:
                f.write(json.dumps(gathered) + "\n")
        dist.barrier()
        return

    engine = timed("first_startup", lambda: build_engine(config, topology, initialize=True), count_io=False)
    deepspeed_engine = engine.engine  # the baseline: DeepSpeed's own save and load of the same engine
    rng = np.random.default_rng(rank)

    def step():
        batches = []
        for _ in range(config.train.global_batch_size // (dp * config.train.micro_batch_size)):
            samples = rng.integers(5, 40000, size=(1, args.seq + 1))
            batches.append(MicroBatch.from_batch(make_batch(samples, pad_id=0, eod_id=1, eod_reset=False)))
        return engine.train_step(batches, tokens=len(batches) * dp * args.seq)

    timed("train_step", step, count_io=False)
    state = {"step": 1, "sampler": {"seed": 0, "consumed_samples": 0, "skipped_ranges": []}}
    sync = Checkpointer(out / "run", config, topology)
    async_config = load_config(None, [*overrides, "train.async_save=true"])
    background = Checkpointer(out / "run", async_config, topology)
    ds_dir = out / "deepspeed"
    path = None
    for repeat in range(args.repeat):  # interleaved, so that all see the same machine load
        path = timed("pangu_save_sync", partial(sync.save, 1, engine, state, None))
        timed("deepspeed_save", partial(deepspeed_engine.save_checkpoint, str(ds_dir), tag="bench"))
        timed("pangu_save_async_call", partial(background.save, 2 + repeat, engine, state, None))
        timed("train_step_during_async_write", step, count_io=False)
        timed("pangu_save_async_rest", background.wait)
        figures.setdefault("pangu_save_async", []).append(dict(background.last))
        timed("train_step_alone", step, count_io=False)
    for _ in range(args.repeat):
        timed("pangu_load", partial(load_checkpoint, path, engine, topology, config))
        timed("deepspeed_load", partial(deepspeed_engine.load_checkpoint, str(ds_dir), tag="bench"))

    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered = [None] * topology.world_size
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        result = {"layout": [dp, tp, pp], "parameters": _parameters(config), "per_rank": gathered}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


def _parameters(config) -> int:
    from pangu.model.sizes import parameter_count

    return parameter_count(config.model)


def summarize(result: dict) -> dict:
    """Per figure: the median over repeats of the slowest rank's seconds; bytes per rank of the
    first repeat."""
    ranks = result["per_rank"]

    def slowest(name: str, key: str = "seconds", ranks=ranks) -> float:
        repeats = len(ranks[0][name])
        return statistics.median(max(r[name][i][key] for r in ranks) for i in range(repeats))

    def startup(kind: str) -> float:
        return statistics.median(max(r[f"{kind}_startup"][0]["seconds"] for r in job) for job in result[kind])

    def megabytes(name: str, key: str) -> list[float]:
        return [round(r[name][0][key] / 1e6, 1) for r in ranks]

    s = {
        "layout": result["layout"],
        "parameters_M": round(result["parameters"] / 1e6, 1),
        "pangu_sync_save_s": slowest("pangu_save_sync"),
        "deepspeed_save_s": slowest("deepspeed_save"),
        "pangu_async_save_call_s": slowest("pangu_save_async_call"),
        "pangu_async_step_wait_s": slowest("pangu_save_async", "step_wait_s"),
        "pangu_async_copy_s": slowest("pangu_save_async", "copy_s"),
        "pangu_async_background_s": slowest("pangu_save_async", "write_s"),
        "train_step_alone_s": slowest("train_step_alone"),
        "train_step_during_async_write_s": slowest("train_step_during_async_write"),
        "pangu_load_s": slowest("pangu_load"),
        "deepspeed_load_s": slowest("deepspeed_load"),
        "fresh_startup_s": startup("fresh"),
        "resumed_startup_s": startup("resumed"),
        "pangu_written_per_rank_MB": megabytes("pangu_save_sync", "written"),
        "deepspeed_written_per_rank_MB": megabytes("deepspeed_save", "written"),
        "pangu_read_per_rank_MB": megabytes("pangu_load", "read"),
        "deepspeed_read_per_rank_MB": megabytes("deepspeed_load", "read"),
        "peak_rss_per_rank_GB": [round(r["peak_rss_bytes"] / 2**30, 2) for r in ranks],
        "resumed_startup_read_per_rank_MB": [
            round(r["resumed_startup"][0]["read"] / 1e6, 1) for r in result["resumed"][0]
        ],
    }
    # the training loop is blocked by the save call and by the next optimizer step's wait for the copy
    s["pangu_async_blocked_s"] = s["pangu_async_save_call_s"] + s["pangu_async_step_wait_s"]
    s["async_blocked_over_sync"] = s["pangu_async_blocked_s"] / s["pangu_sync_save_s"]
    s["pangu_sync_over_deepspeed_save"] = s["pangu_sync_save_s"] / s["deepspeed_save_s"]
    s["pangu_load_over_deepspeed_load"] = s["pangu_load_s"] / s["deepspeed_load_s"]
    s["resumed_over_fresh_startup"] = s["resumed_startup_s"] / s["fresh_startup_s"]
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=21, help="model.num_layers (21: ~305M parameters)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64, help="sequence length (the step's cost, not the checkpoint's)")
    parser.add_argument("--layouts", nargs="+", default=["4,1,1", "2,2,1"], help="dp,tp,pp (4 processes each)")
    parser.add_argument("--repeat", type=int, default=3, help="saves and loads of each kind (medians are reported)")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--startups", type=int, default=2, help="fresh and resumed start-ups of each layout")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.layout = tuple(int(x) for x in args.layout.split(","))
        worker(args)
        return
    scratch = Path(args.out or tempfile.mkdtemp(prefix="pangu-bench-checkpoint-"))
    summaries = []
    try:
        for layout in args.layouts:
            dp, tp, pp = (int(x) for x in layout.split(","))
            out = scratch / layout.replace(",", "x")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            env = dict(
                os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
            )
            # the saves and loads, then fresh and resumed start-ups alternately, each in new processes
            for phase in ["main", *["resumed", "fresh"] * args.startups]:
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={dp * tp * pp}",
                    __file__,
                    "--worker",
                    f"--phase={phase}",
                    f"--layout={layout}",
                    f"--layers={args.layers}",
                    f"--hidden={args.hidden}",
                    f"--seq={args.seq}",
                    f"--repeat={args.repeat}",
                    f"--out={out}",
                ]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"layout {layout}, {phase}, failed:\n{done.stderr[-5000:]}")
            result = json.loads((out / "result.json").read_text())
            for kind in ("resumed", "fresh"):
                jobs = [json.loads(line) for line in (out / "startup.jsonl").read_text().splitlines()]
                result[kind] = [job for job in jobs if f"{kind}_startup" in job[0]]
            (out / "result.json").write_text(json.dumps(result, indent=1))
            summary = summarize(result)
            summaries.append(summary)
            print(json.dumps(summary, indent=1), flush=True)
            shutil.rmtree(out / "run", ignore_errors=True)
            shutil.rmtree(out / "deepspeed", ignore_errors=True)
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(
        "\nlayout      params  sync save  async blocked (ratio)  DeepSpeed save (ratio)  load / DS load  resumed / fresh start-up"
    )
    for s in summaries:
        print(
            f"{str(tuple(s['layout'])):<11} {s['parameters_M']:>5.0f}M  {s['pangu_sync_save_s']:>7.2f} s  "
            f"{s['pangu_async_blocked_s']:>6.2f} s ({s['async_blocked_over_sync']:.2f})  "
            f"{s['deepspeed_save_s']:>7.2f} s ({s['pangu_sync_over_deepspeed_save']:.2f})  "
            f"{s['pangu_load_s']:.2f} / {s['deepspeed_load_s']:.2f} s  "
            f"{s['resumed_startup_s']:.2f} / {s['fresh_startup_s']:.2f} s ({s['resumed_over_fresh_startup']:.2f})"
        )


if __name__ == "__main__":
    main()
