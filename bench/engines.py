"""The engines against each other where they differ, measured with real training steps on the CPU.

1. Exposed data-parallel communication per step: what the gradient reduction adds to a step that
backward does not hide. For dp = N, the same N processes run twice on this machine, with the same work per process (the
same micro-batches per rank): as one data-parallel job (gradients reduced over the N ranks), and
as N independent one-process jobs (nothing to reduce; the same competition for the cores). The
exposed communication is the difference of their median step times. "Before" is the DeepSpeed
engine (ZeRO-1: the reduction runs after the last micro-batch's backward, nothing overlaps it);
"after" is the torch engine (FSDP2: each layer's reduce-scatter in fp32 starts as backward leaves
the layer, overlapping the backward of the layers below).

2. Pipeline schedules at pp = 2: the step time of the DeepSpeed engine's 1F1B, and the torch
engine's 1F1B, interleaved 1F1B and interleaved zero bubble (two stages per rank), 8 micro-batches
(bench/pipeline_bubble.py measures the bubble itself, with sleeps for compute).

    python bench/engines.py [--dp 2,4] [--steps 8] [--skip dp|pp] [--set k=v ...]

On a CPU with gloo the overlap is threads (gloo's) against compute on few cores, and pipeline
stages share the cores: the figures say what the engines do; the scale of the win is a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a model whose gradients take gloo a visible time (about 13M parameters), short sequences
MODEL = [
    "model.num_layers=4",
    "model.hidden_size=512",
    "model.num_heads=8",
    "model.vocab_size=2000",  # the builtin corpus prepared by configs/tiny.yaml
    "model.seq_length=64",
    "model.dropout=0.0",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "train.save_interval=0",
]
WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from pangu.cli import configure_output
configure_output(-1)
from pangu.config import load_config
from pangu.pretrain.trainer import Trainer
import torch.distributed as dist
result, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
trainer = Trainer(load_config("configs/tiny.yaml", overrides))
times = []
for i in range(steps + 2):
    dist.barrier()
    start = time.perf_counter()
    trainer.train_step()
    if i >= 2:
        times.append(time.perf_counter() - start)
if dist.get_rank() == 0:
    open(result, "w").write(json.dumps(times))
dist.destroy_process_group()
"""


def run(processes: int, joint: bool, overrides: list[str], steps: int, work: Path) -> float:
    """Median step time of `processes` processes, as one job (joint) or as independent ones."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = work / "worker.py"
    script.write_text(WORKER)
    launches = []
    for i in range(1 if joint else processes):
        result = work / f"times-{joint}-{i}.json"
        args = [str(result), str(steps), *overrides, f"train.output_dir={work / f'run-{joint}-{i}'}"]
        if joint:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        else:
            command = [sys.executable]
        launches.append((subprocess.Popen([*command, str(script), *args], env=env, cwd=REPO), result))
    medians = []
    for process, result in launches:
        if process.wait(timeout=1800) != 0:
            raise SystemExit(f"bench/engines.py: a run failed (exit {process.returncode})")
        medians.append(statistics.median(json.loads(result.read_text())))
    return max(medians)  # the slowest independent job, as a joint step waits for its slowest rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", default="2,4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=4, help="per rank and step")
    parser.add_argument("--prepared", default="", help="a prepared corpus (default: the builtin one, prepared once)")
    parser.add_argument("--skip", choices=["dp", "pp"], help="leave out one of the two measurements")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = args.prepared or str(REPO / "data_cache" / "tiny")
        if not args.prepared and not (Path(prepared) / "meta.json").is_file():
            subprocess.run([sys.executable, "-m", "pangu", "-q", "prepare", "--config", "tiny"], cwd=REPO, check=True)
        for dp in (int(n) for n in args.dp.split(",")) if args.skip != "dp" else ():
            for engine in ("deepspeed", "torch"):
                base = [*MODEL, *args.overrides, f"data.prepared_dir={prepared}", f"parallel.engine={engine}"]
                per_rank = 2 * args.micro_batches  # micro_batch_size 2
                joint = run(dp, True, [*base, f"train.global_batch_size={dp * per_rank}"], args.steps, work)
                alone = run(dp, False, [*base, f"train.global_batch_size={per_rank}"], args.steps, work)
                rows.append((dp, engine, joint, alone))
                print(
                    f"dp {dp} {engine:<9} step {joint * 1e3:7.1f} ms, without the reduction {alone * 1e3:7.1f} ms: "
                    f"exposed {max(joint - alone, 0.0) * 1e3:6.1f} ms ({max(joint - alone, 0.0) / joint:5.1%} of the step)",
                    flush=True,
                )
        if args.skip != "pp":
            schedules(prepared, args, work)
    for dp in sorted({row[0] for row in rows}):
        exposed = {engine: max(joint - alone, 0.0) for d, engine, joint, alone in rows if d == dp}
        if exposed.get("deepspeed"):
            print(
                f"dp {dp}: exposed communication, torch engine / DeepSpeed engine: {exposed['torch'] / exposed['deepspeed']:.2f}"
            )


SCHEDULES = {
    "deepspeed 1f1b": ["parallel.engine=deepspeed"],
    "torch 1f1b": ["parallel.engine=torch"],
    "torch interleaved_1f1b": [
        "parallel.engine=torch",
        "parallel.schedule=interleaved_1f1b",
        "parallel.virtual_stages=2",
    ],
    "torch zero_bubble": ["parallel.engine=torch", "parallel.schedule=zero_bubble", "parallel.virtual_stages=2"],
}


def schedules(prepared: str, args, work: Path) -> None:
    """Step times at pp = 2 (world 2), 8 micro-batches of 2 per step, beside the torch engine's 1F1B."""
    base = [*MODEL, *args.overrides, f"data.prepared_dir={prepared}", "parallel.pp=2", "train.global_batch_size=16"]
    times = {name: run(2, True, [*base, *settings], args.steps, work) for name, settings in SCHEDULES.items()}
    for name, seconds in times.items():
        print(
            f"pp 2 {name:<24} step {seconds * 1e3:7.1f} ms ({times['torch 1f1b'] / seconds:.2f} x torch 1f1b's speed)"
        )


if __name__ == "__main__":
    main()
