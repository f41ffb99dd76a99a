"""What train.sdc_check costs per training step, against the same step without it, measured in the
same run (docs/sdc.md).

    python bench/sdc.py [--config configs/tiny.yaml] [--steps 40] [--repeats 50] [--set k=v ...]

Two trainers in one process, of the same config but for train.sdc_check.enabled, train on the
same batches, their steps alternating (A B B A A B ...) so that neighbours see the same machine
load; a checked step is the trainer's step followed by the check's verdict
(`SdcCheck.after_step`, as `pangu pretrain` runs it). The median ratio of neighbouring steps is
printed. A 1% difference is within the noise of that comparison on a shared machine, so the
check's parts are also timed on their own, alternating with their baselines (the cost of the
bound is the median of paired differences), and set against the median unchecked step:

- in the optimizer step: S3 over fp32 tensors of the sizes of this rank's flat ZeRO-1
  partitions (what the optimizer steps under the DeepSpeed engine), with and without an
  UpdateBound, on the foreach path and the fused one;
- the verdict: `after_step` without a fingerprint (the all-reduce of each rank's largest ratio
  and reading it);
- a fingerprint: the checksums of every weight of the model (at world size 1 there are no replicas
  to gather them from), once every train.sdc_check.fingerprint_interval steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def timings(functions: dict, repeats: int, warmup: int = 3) -> dict[object, list[float]]:
    """Milliseconds of `repeats` calls of each function, called in turn (A B C, then C B A, ...) so
    that neighbours in time see the same load and neither order is favoured."""
    for function in functions.values():
        for _ in range(warmup):  # includes torch.compile's first call
            function()
    times: dict[object, list[float]] = {name: [] for name in functions}
    order = list(functions)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            functions[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
        order.reverse()
    return times


def paired_difference(times: dict[object, list[float]], a: object, b: object) -> float:
    """The median over rounds of a's time minus b's in the same round: slow changes of the
    machine's load cancel, where a difference of medians keeps them."""
    return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))


def optimizer_steps(sizes: list[int], options, lr: float) -> dict[str, Callable[[], None]]:
    """One S3 step over flat fp32 tensors of `sizes` (each with its own copy of the parameters and
    state), on the foreach and the fused path, with and without the bound."""
    from pangu.optim.s3 import S3, UpdateBound

    steps = {}
    for path in ("foreach", "fused"):
        for bounded in (False, True):
            generator = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in sizes]
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator) * 1e-3
            settings = dict(beta=options.beta, p=options.p, nesterov=options.nesterov, eps=options.eps)
            optimizer = S3(params, lr=lr, fused=path == "fused", **settings)
            optimizer.update_bound = UpdateBound(1e-4) if bounded else None
            steps[(path, bounded)] = lambda optimizer=optimizer: (
                optimizer.step(),
                optimizer.update_bound and optimizer.update_bound.take(),
            )
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each trainer")
    parser.add_argument("--repeats", type=int, default=50, help="timings of each part on its own")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pangu.cli import configure_output

    configure_output(-1)  # before megatron-core and DeepSpeed are imported: their notices stay out
    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.optim.registry import fused
    from pangu.parallel.sdc import checksum
    from pangu.pretrain.trainer import Trainer

    with tempfile.TemporaryDirectory() as output_dir:
        overrides = [
            *args.overrides,
            "train.save_interval=0",
            "train.steps=1000",
            "optim.warmup_steps=10",
        ]
        trainers = {}
        for name, enabled in (("unchecked", "false"), ("checked", "true")):
            config = load_config(
                args.config, [*overrides, f"train.output_dir={output_dir}/{name}", f"train.sdc_check.enabled={enabled}"]
            )
            prepare(config, progress=False)
            trainers[name] = Trainer(config)
        checked = trainers["checked"]

        def checked_step() -> None:
            checked.train_step()
            checked.sdc.after_step(fingerprint=False)

        steps = {"unchecked": trainers["unchecked"].train_step, "checked": checked_step}
        step_times = timings(steps, args.steps, warmup=2)
        step_ms = {name: statistics.median(t) for name, t in step_times.items()}

        engine = checked.engine
        sizes = [buffer["weight"].numel() for buffer in engine.checkpoint_buffers(weights_only=True)]
        optim = config.optim
        weights = [p for stage in engine.stages for p in stage.parameters()]
        parts = {
            **optimizer_steps(sizes, optim.options, optim.lr),
            "verdict": lambda: checked.sdc.after_step(fingerprint=False),
            "fingerprint": lambda: [checksum(w) for w in weights],
        }
        part_times = timings(parts, args.repeats)
        part_ms = {name: statistics.median(t) for name, t in part_times.items()}
        bound_ms = {path: paired_difference(part_times, (path, True), (path, False)) for path in ("foreach", "fused")}
        verdict_ms, fingerprint_ms = part_ms["verdict"], part_ms["fingerprint"]

    interval = config.train.sdc_check.fingerprint_interval
    path = "fused" if fused(optim) else "foreach"
    base = step_ms["unchecked"]
    per_step = bound_ms[path] + verdict_ms + (fingerprint_ms / interval if interval else 0.0)
    print(
        f"{config.train.global_batch_size} x {config.model.seq_length} tokens per step, {sum(sizes):,} optimizer "
        f"elements in {len(sizes)} flat partitions, {torch.get_num_threads()} threads"
    )
    print(f"training step, {args.steps} each, alternating:")
    for name, ms in step_ms.items():
        print(f"  {name:<10} {ms:9.2f} ms (median)")
    ratio = statistics.median(c / u for c, u in zip(step_times["checked"], step_times["unchecked"], strict=True))
    print(f"  ratio checked / unchecked (median of neighbouring pairs): {ratio:.4f}")
    print(f"the parts, {args.repeats} each, alternating:")
    for kind in ("foreach", "fused"):
        without, with_bound = part_ms[(kind, False)], part_ms[(kind, True)]
        print(
            f"  S3 step, {kind:<7}: {without:8.3f} ms without the bound, {with_bound:8.3f} ms with it (medians); "
            f"the bound: {bound_ms[kind]:+.3f} ms ({100 * bound_ms[kind] / base:+.2f}% of a step)"
        )
    print(f"  the verdict (all-reduce of the largest ratio): {verdict_ms:.3f} ms ({100 * verdict_ms / base:.2f}%)")
    print(
        f"  a fingerprint of {sum(w.numel() for w in weights):,} weights: {fingerprint_ms:.3f} ms, every {interval} "
        f"steps: {fingerprint_ms / max(interval, 1):.4f} ms per step"
    )
    print(
        f"the check per step ({path} path, as optim.fused = {optim.fused!r} runs here): {per_step:.3f} ms = "
        f"{100 * per_step / base:.2f}% of a {base:.1f} ms step"
    )


if __name__ == "__main__":
    main()
