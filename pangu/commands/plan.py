"""`pangu plan --config CFG --gpus N --gpu-memory 80GiB`: rank the layouts (engine, dp x tp x pp,
pipeline schedule, recomputation, micro-batch size) that fit N devices
(pangu/parallel/planner.py; no torch import)."""

from __future__ import annotations

import json
import sys

from pangu.commands.common import add_config_arguments, byte_size, number, positive_float, positive_int
from pangu.config import load_config
from pangu.model.sizes import parameter_count
from pangu.parallel.planner import (
    GiB,
    Hardware,
    Kernels,
    Layout,
    enumerate_layouts,
    estimate_memory,
    estimate_step_time,
    plan,
    smallest_memory,
)
from pangu.schema import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "plan", help="rank the layouts (engine, dp x tp x pp, schedule, recompute, micro-batch) that fit N devices"
    )
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=positive_int, required=True, help="number of devices")
    parser.add_argument(
        "--gpu-memory", type=byte_size, required=True, metavar="SIZE", help="memory per device, e.g. 80GiB, 32GiB"
    )
    parser.add_argument("--gpus-per-node", type=positive_int, default=8)
    parser.add_argument(
        "--tflops",
        type=positive_float,
        default=312.0,
        help="peak TFLOP/s per device in the training dtype (default 312: A100 bf16)",
    )
    parser.add_argument(
        "--efficiency",
        type=number(float, 0, 1, low_open=True),
        default=0.5,
        help="fraction of the peak the matmuls reach (default 0.5)",
    )
    parser.add_argument(
        "--bandwidth",
        type=positive_float,
        default=150.0,
        help="intra-node all-reduce bus bandwidth per device, GB/s (default 150)",
    )
    parser.add_argument(
        "--inter-node-bandwidth",
        type=positive_float,
        default=25.0,
        help="inter-node bandwidth per device, GB/s (default 25: one 200 Gb/s NIC per GPU)",
    )
    parser.add_argument(
        "--memory-margin",
        type=number(float, 0, 1, high_open=True),
        default=0.10,
        help="fraction of device memory kept free for the CUDA context, NCCL and fragmentation (default 0.10)",
    )
    parser.add_argument(
        "--no-flash", action="store_true", help="assume an attention kernel that saves the s x s probabilities"
    )
    parser.add_argument("--top", type=positive_int, default=5, help="how many layouts to print (default 5)")
    parser.add_argument("--json", action="store_true", help="print every fitting layout, machine-readable, instead")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def _schedule(layout: Layout) -> str:
    if layout.pp == 1:
        return "-"
    return layout.schedule + (f" x{layout.virtual_stages}" if layout.virtual_stages > 1 else "")


def run(args) -> int:
    """Prints the best layouts (table and --set lines), or a JSON list with --json."""
    config = load_config(args.config, args.overrides)
    if args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory = {args.gpu_memory} bytes is not allowed: expected a size above 0, e.g. 80GiB")
    hardware = Hardware(
        args.gpus,
        args.gpu_memory,
        args.gpus_per_node,
        args.tflops,
        args.efficiency,
        args.bandwidth * 1e9,
        args.inter_node_bandwidth * 1e9,
        memory_margin=args.memory_margin,
    )
    kernels = Kernels(flash_attention=not args.no_flash)
    layouts = plan(config, hardware, kernels, limit=None if args.json else args.top)
    params = parameter_count(config.model)
    if args.json:
        print(
            json.dumps(
                {
                    "parameters": params,
                    "gpus": args.gpus,
                    "gpu_memory_bytes": args.gpu_memory,
                    "usable_memory_bytes": int(hardware.usable_memory),
                    "layouts": [layout.as_dict() for layout in layouts],
                },
                indent=1,
            )
        )
        return 0 if layouts else 1
    m = config.model
    print(
        f"model: {params / 1e9:.2f}B parameters ({m.num_layers} layers incl. the query layer, hidden "
        f"{m.hidden_size}, {m.num_heads} heads, FFN {m.ffn_size}, vocab {m.vocab_size} -> {m.padded_vocab_size}, "
        f"seq {m.seq_length}); {config.train.precision}, optimizer {config.optim.name}, "
        f"global batch {config.train.global_batch_size} sequences"
    )
    print(
        f"devices: {args.gpus} x {_gib(args.gpu_memory)} GiB ({_gib(hardware.usable_memory)} GiB usable), "
        f"{args.gpus_per_node} per node, {args.tflops:g} TFLOP/s peak at {args.efficiency:.0%}, "
        f"{args.bandwidth:g} GB/s intra-node, {args.inter_node_bandwidth:g} GB/s inter-node, "
        f"flash attention {'off' if args.no_flash else 'on'}"
    )
    total = len(enumerate_layouts(config, args.gpus))
    if not layouts:
        best = smallest_memory(config, args.gpus, kernels)
        if best is None:
            print(
                f"no layout of {args.gpus} devices divides the model and the global batch "
                f"({config.train.global_batch_size}): try another device count",
                file=sys.stderr,
            )
        else:
            print(
                f"none of the {total} layouts fits: the smallest needs {_gib(best.memory.peak)} GiB per device "
                f"({best.describe()})",
                file=sys.stderr,
            )
        return 1
    print(
        f"{total} layouts (engine, dp x tp x pp, schedule, recomputation, micro-batch size); the fastest "
        f"{len(layouts)} that fit, memory in GiB on the most loaded device:"
    )
    header = (
        f"{'#':>2} {'engine':<9} {'dp':>4} {'tp':>3} {'pp':>3} {'schedule':<18} {'sp':>3} {'recompute':>9} "
        f"{'mbs':>3} {'m':>4} | {'params':>6} {'grads':>6} {'master':>6} {'optim':>6} {'activ':>6} {'peak':>6} | "
        f"{'step s':>7} {'bubble':>6} {'tp s':>6} {'dp s':>6} {'MFU':>5}"
    )
    print(header)
    print("-" * len(header))
    for i, layout in enumerate(layouts, 1):
        mem, t = layout.memory, layout.step_time
        print(
            f"{i:>2} {layout.engine:<9} {layout.dp:>4} {layout.tp:>3} {layout.pp:>3} {_schedule(layout):<18} "
            f"{'on' if layout.sequence_parallel else '-':>3} {layout.recompute:>9} {layout.micro_batch_size:>3} "
            f"{layout.micro_batches:>4} | {_gib(mem.parameters):>6} {_gib(mem.gradients):>6} "
            f"{_gib(mem.master_weights):>6} {_gib(mem.optimizer_state):>6} "
            f"{_gib(max(mem.activations, mem.reduce_buffers + mem.sharded_gradients)):>6} {_gib(mem.peak):>6} | "
            f"{t.total:>7.3f} {t.bubble_fraction:>6.1%} {t.tensor_parallel:>6.3f} {t.data_parallel:>6.3f} {t.mfu:>5.1%}"
        )
    reference = Layout.of_config(config, args.gpus)
    if reference is not None:
        memory = estimate_memory(config, reference, kernels)
        seconds = estimate_step_time(config, reference, hardware).total
        fits = "fits" if memory.peak <= hardware.usable_memory else "does not fit"
        print(
            f"the config's own layout ({reference.describe()}): {_gib(memory.peak)} GiB ({fits}), "
            f"{seconds:.3f} s/step, {seconds / layouts[0].step_time.total:.2f}x #1's"
        )
    print("\nto train with one of them:")
    for i, layout in enumerate(layouts, 1):
        print(f"  #{i}: {layout.set_args()}")
    return 0
