"""Sequence parallelism's activation memory: the measured peak of saved-activation bytes per rank
of the torch engine at tp = 2, with and without `parallel.sequence_parallel`, beside the planner's
prediction (pangu/parallel/memory_torch.py), the ratio printed.

Two gloo processes on the CPU run tests/probes/memory_probe_torch.py (one torchrun launch for all
cases): each case builds the engine for a small PanGu-alpha and runs one real training step,
counting with torch.autograd.graph.saved_tensors_hooks every storage autograd saves (once), what
torch's checkpoint keeps and recomputes, and what the pipeline keeps per micro-batch; the peak of
their sum over the step is what a rank needs for activations. Beside it, the model's prediction
for the same layout, and what sequence parallelism saves, measured and predicted.

    python bench/activations.py [--hidden 256] [--seq 256] [--layers 4] [--micro-batch 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pangu.config import load_config  # noqa: E402
from pangu.files import write_json_atomic  # noqa: E402
from pangu.parallel.memory_model import Kernels, stage_memory  # noqa: E402
from pangu.parallel.planner import Layout  # noqa: E402

PROBE = REPO / "tests" / "probes" / "memory_probe_torch.py"
TP = 2


def settings(args) -> list[str]:
    return [
        "parallel.engine=torch",
        f"parallel.tp={TP}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_heads={args.heads}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        "model.vocab_size=1000",
        f"model.seq_length={args.seq}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={4 * args.micro_batch}",
        "train.steps=1",
        "optim.warmup_steps=0",
    ]


def cases(args) -> list[dict]:
    out = []
    for precision in ("fp32", "bf16"):
        for recompute in ("none", "selective", "full"):
            for sp in (False, True):
                name = f"{precision} recompute={recompute} sp={'on' if sp else 'off'}"
                overrides = [
                    *settings(args),
                    f"train.precision={precision}",
                    f"parallel.recompute={recompute}",
                    f"parallel.sequence_parallel={str(sp).lower()}",
                ]
                out.append({"name": name, "config": None, "overrides": overrides})
    return out


def measure(all_cases: list[dict]) -> dict:
    with tempfile.TemporaryDirectory(prefix="activations-") as out_dir:
        result = Path(out_dir) / "measured.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={TP}",
            str(PROBE),
            str(result),
            json.dumps(all_cases),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"the memory probe failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the rows here")
    args = parser.parse_args()
    if args.hidden % args.heads or args.heads % TP or args.seq % TP:
        parser.error(f"--heads must divide --hidden, and tp = {TP} the heads and --seq")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the directory {args.json.parent} does not exist")

    all_cases = cases(args)
    measured = measure(all_cases)
    rows = []
    for case in all_cases:
        config = load_config(None, case["overrides"])
        model = stage_memory(config, Layout.of_config(config, TP), 0, Kernels.cpu())
        rank = measured[case["name"]][0]  # both tp ranks hold the same
        rows.append({"case": case["name"], "measured": rank["saved_peak"], "model": model.saved_activations})
    print(
        f"torch engine, tp = {TP}, one stage: hidden {args.hidden}, {args.heads} heads, FFN {4 * args.hidden}, "
        f"seq {args.seq}, {args.layers} layers, micro-batch {args.micro_batch}, 4 micro-batches a step; "
        "peak saved-activation bytes per rank during one step (MiB)"
    )
    header = f"{'case':<32} | {'measured':>9} {'model':>9} {'meas/model':>10} | {'SP saves: measured':>18} {'model':>6}"
    print(header)
    print("-" * len(header))
    mib = 2**20
    for i, row in enumerate(rows):
        saves = ""
        if row["case"].endswith("sp=on"):
            off = rows[i - 1]
            saves = f"{1 - row['measured'] / off['measured']:>18.1%} {1 - row['model'] / off['model']:>6.1%}"
        print(
            f"{row['case']:<32} | {row['measured'] / mib:>9.2f} {row['model'] / mib:>9.2f} "
            f"{row['measured'] / row['model']:>10.3f} | {saves}"
        )
    if args.json is not None:
        write_json_atomic(args.json, {"settings": vars(args) | {"json": str(args.json)}, "rows": rows})


if __name__ == "__main__":
    main()
