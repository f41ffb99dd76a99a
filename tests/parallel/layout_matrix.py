"""The runs the layout tests compare: every (dp, tp, pp) in {1, 2}^3 on both engines, the torch
engine's schedules and sequence parallelism, recomputation and dropout, precisions, resumes across
layouts and engines, the scale-invariant recipe. One torchrun launch per world size runs all its
cases in one process group (tests/probes/parallel_probe.py); the launches go from the largest
world down, so that a checkpoint written at (2, 2, 2) can be resumed by the smaller ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import PROBES, REPO, TINY_CONFIG

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
ENGINES = ("deepspeed", "torch")
STEPS = 5
LR = 3e-3
FIVE_LAYERS = "model.num_layers=5"  # pp x virtual stages = 4 stages need 4 transformer layers
HIDDEN_DROPOUT = ("model.dropout=0.1", "model.attention_dropout=0.0")  # attention's depends on tp
ALL_DROPOUT = ("model.dropout=0.1",)
SCALE_INVARIANT = (
    "model.scale_invariant=true",
    "model.final_layernorm=after",
    "optim.name=sgd_si",
    "optim.si_lr=0.05",
    "optim.si_weight_decay=0.1",
    "optim.si_clip_c=1e-4",
)
FP16 = ("train.precision=fp16", "train.initial_loss_scale_power=20", "train.loss_scale_window=2", "train.steps=6")


def settings(corpus: Path, out: Path, tp: int, pp: int, *extra: str) -> list[str]:
    values = [
        f"data.prepared_dir={corpus}",
        f"train.output_dir={out}",
        "model.num_layers=3",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.ffn_hidden_size=128",
        "model.vocab_size=600",
        "model.seq_length=32",
        "model.dropout=0.0",
        f"train.steps={STEPS}",
        "train.micro_batch_size=1",
        "train.global_batch_size=8",
        f"optim.lr={LR}",
        "optim.warmup_steps=2",
        "optim.grad_clip=0.3",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        *extra,
    ]
    return ["--config", TINY_CONFIG] + [arg for value in values for arg in ("--set", value)]


def name(layout: tuple[int, int, int]) -> str:
    return "".join(map(str, layout))


def matrix(corpus: Path, root: Path) -> dict[int, list[dict]]:
    """{world size: its cases, in the order they run}."""
    worlds: dict[int, list[dict]] = {8: [], 4: [], 2: [], 1: []}

    def case(label: str, layout, *extra: str, resume_from: str | None = None) -> None:
        dp, tp, pp = layout
        worlds[dp * tp * pp].append(
            {"name": label, "args": settings(corpus, root / label, tp, pp, *extra), "resume_from": resume_from}
        )

    for engine in ENGINES:
        for layout in LAYOUTS:
            # (2, 2, 2) also keeps its checkpoint of step 2, which other layouts and engines resume
            keep = ("train.save_interval=2", "train.keep_checkpoints=3") if layout == (2, 2, 2) else ()
            case(f"{engine}-{name(layout)}", layout, f"parallel.engine={engine}", *keep)
        # dropout: the hidden one does not depend on the layout; recomputation replays every mask
        case(f"{engine}-hidden-dropout-111", (1, 1, 1), f"parallel.engine={engine}", *HIDDEN_DROPOUT)
        case(f"{engine}-hidden-dropout-222", (2, 2, 2), f"parallel.engine={engine}", *HIDDEN_DROPOUT)
        for mode in ("none", "full", "selective") if engine == "deepspeed" else ("none", "full"):
            case(
                f"{engine}-dropout-{mode}",
                (2, 2, 2),
                f"parallel.engine={engine}",
                *ALL_DROPOUT,
                f"parallel.recompute={mode}",
            )
    # resumes under other layouts, across engines both ways
    for writer, reader, layout in [
        ("deepspeed", "deepspeed", (1, 2, 1)),
        ("deepspeed", "torch", (4, 1, 2)),
        ("torch", "deepspeed", (1, 2, 1)),
        ("torch", "torch", (4, 1, 2)),
    ]:
        step_2 = str(root / f"{writer}-222" / "checkpoints" / "step_00000002")
        case(f"{reader}-{name(layout)}-from-{writer}", layout, f"parallel.engine={reader}", resume_from=step_2)
    # the torch engine's schedules (5 layers: 4 stages at pp = 2 with 2 stages per rank)
    case("deepspeed-111-5", (1, 1, 1), FIVE_LAYERS)
    for schedule, layout in [
        ("interleaved_1f1b", (1, 1, 2)),
        ("zero_bubble", (1, 1, 2)),
        ("zbv", (1, 1, 2)),
        ("interleaved_1f1b", (2, 2, 2)),
    ]:
        torch = ("parallel.engine=torch", f"parallel.schedule={schedule}", "parallel.virtual_stages=2")
        case(f"torch-{schedule}-{name(layout)}", layout, FIVE_LAYERS, *torch)
    sp = ("parallel.engine=torch", "parallel.sequence_parallel=true")
    case("torch-sp-121", (1, 2, 1), *sp)
    case("torch-sp-222", (2, 2, 2), *sp)
    case("torch-sp-full-222", (2, 2, 2), *sp, "parallel.recompute=full")
    # precision
    for engine in ENGINES:
        bf16 = (f"parallel.engine={engine}", "train.precision=bf16")
        case(f"{engine}-fp32-20", (1, 1, 1), f"parallel.engine={engine}", "train.steps=20", "optim.warmup_steps=5")
        case(f"{engine}-bf16-20", (1, 1, 1), *bf16, "train.steps=20", "optim.warmup_steps=5")
        case(f"{engine}-bf16-211", (2, 1, 1), *bf16, "train.steps=2")
        case(
            f"{engine}-fp16-overflow",
            (1, 1, 1),
            f"parallel.engine={engine}",
            "train.precision=fp16",
            "train.steps=1",
            "optim.warmup_steps=0",
        )
        case(f"{engine}-fp16-straight", (1, 1, 1), f"parallel.engine={engine}", *FP16)
        case(f"{engine}-fp16-stopped", (1, 1, 1), f"parallel.engine={engine}", *FP16, "train.stop_at=2")
        worlds[1].append({**worlds[1][-1], "name": f"{engine}-fp16-resumed", "args": worlds[1][-1]["args"][:-2]})
        case(f"{engine}-si-222", (2, 2, 2), f"parallel.engine={engine}", *SCALE_INVARIANT)
    case("deepspeed-si-111", (1, 1, 1), *SCALE_INVARIANT)
    return worlds


def run(world: int, cases: list[dict], root: Path) -> dict:
    """Launches one world size's cases; {case name: record}."""
    result_file, cases_file = root / f"world{world}.json", root / f"world{world}-cases.json"
    cases_file.write_text(json.dumps(cases))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        str(PROBES / "parallel_probe.py"),
        str(result_file),
        str(cases_file),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=2400)
    finished = json.loads(result_file.read_text()) if result_file.is_file() else {}
    assert done.returncode == 0, (
        f"world {world}: case {cases[len(finished)]['name'] if len(finished) < len(cases) else '?'} failed:\n"
        f"{done.stderr[-4000:]}"
    )
    return finished


def run_all(corpus: Path, root: Path) -> dict:
    runs: dict = {}
    for world, cases in matrix(corpus, root).items():
        runs.update(run(world, cases, root))
    return runs
