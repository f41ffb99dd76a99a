"""Optimizer study: AdamW, S3 and scale-invariant SGD on the same small PanGu-alpha and data.

    python bench/optimizer_study.py                 # the full study (~50 min on 2 quiet CPU cores)
    python bench/optimizer_study.py --quick         # a smoke version (a few minutes)
    python bench/optimizer_study.py --lr 5e-4 --s3-lr 1e-3 --si-lr 1 --steps 500   # no sweeps

Every run sees the same data in the same order (the sampler is seeded by train.seed) and is
trained by pangu's own trainer (DeepSpeed pipeline engine, ZeRO-1), each in a fresh process so
that no DeepSpeed or torch state carries over between runs:

    adamw       AdamW at the tuned learning rate LR                (N steps)
    adamw_10x   AdamW at 10 x LR                                   (N steps)
    s3          S3 at the same number LR                           (N steps)
    s3_10x      S3 at 10 x LR                                      (N steps)
    s3_tuned    S3 at its own tuned lr S3_LR, when that is not LR  (N steps)
    sgd_si      scale-invariant trunk (model.scale_invariant, final LayerNorm after the query
                layer) trained with SGD + weight decay + SIBERT's relative clip at SI_LR, step
                decay (/10 at 60% and 90%); embeddings with --si-other (AdamW at LR by default)
    adamw_2x    AdamW at LR for 2N steps: the schedule (warmup fraction, cosine) is laid over
                its own length, for the "S3 at N steps ~ AdamW at 2N steps" claim

Learning rates: `--sweep` first trains AdamW at each listed lr for --sweep-steps and takes the
one with the lowest final validation loss as LR; `--s3-sweep` does the same for S3_LR and
`--si-sweep` for sgd_si's SGD lr (its embeddings use LR). `--lr`, `--s3-lr` and `--si-lr` skip
the corresponding sweep. By default the full study sweeps at 100 steps and runs N = 300.
AdamW and S3 runs start from the same initial weights (same seed, same model); sgd_si's model
is a different architecture, initialised from the same seed.

Measured per run: the final validation loss (the whole validation split), loss spikes (steps
whose training loss exceeds 1.3 x the median of the previous 50 steps; before step 51, the
median of all previous steps, from step 11 on), divergence (a non-finite loss, a non-finite
validation loss, or a mean training loss over the last 10 steps above the first step's loss)
and wall time. Per-run results are kept in --workdir, in a directory named after the run's
settings, and reused when those did not change (--fresh reruns everything). The summary goes
to --json, the loss curves to --png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
SPIKE_FACTOR = 1.3
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
WARMUP_FRACTION = 0.1
NONFINITE_ABORT = 20  # a run that has seen this many non-finite losses in a row is stopped

# ---------------------------------------------------------------------------------------------
# One run, in its own process


def child(spec_path: str) -> None:
    """Trains one run described by the JSON file `spec_path`; writes result.json next to it."""
    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.model.sizes import parameter_count
    from pangu.pretrain.trainer import Trainer, validation_loss

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    train_dir = run_dir / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    config = load_config(spec["config"], [*spec["overrides"], f"train.output_dir={train_dir}"])
    prepare(config, progress=False)
    started = time.perf_counter()
    trainer = Trainer(config)
    setup_s = time.perf_counter() - started
    batch = config.train.global_batch_size
    full_eval = SimpleNamespace(
        global_batch_size=batch, eval_batches=max(1, len(trainer.valid_batches.dataset) // batch)
    )
    eval_every = spec.get("eval_every", 0)
    part_eval = SimpleNamespace(global_batch_size=batch, eval_batches=min(8, full_eval.eval_batches))

    records, evals = [], []
    nonfinite_streak = 0
    train_s = 0.0
    print(
        f"[study] {spec['name']}: {parameter_count(config.model) / 1e6:.2f}M parameters, "
        f"{config.train.steps} steps of {batch} x {config.model.seq_length} tokens",
        flush=True,
    )
    parent = os.getppid()
    for _ in range(config.train.steps):
        if trainer.stop_request.signal_name or os.getppid() != parent:  # SIGTERM, or the study was stopped
            raise SystemExit(f"[study] {spec['name']}: stopped")
        start = time.perf_counter()
        record = trainer.train_step()
        train_s += time.perf_counter() - start
        keep = {key: record[key] for key in ("step", "loss", "lr", "grad_norm", "skipped")}
        for key in ("si_clip_ratio", "si_weight_norm", "si_grad_norm", "si_clip_events"):
            if key in record:
                keep[key] = record[key]
        records.append(keep)
        step = record["step"]
        if step % 25 == 0 or step == config.train.steps:
            print(
                f"[study] {spec['name']} step {step} loss {record['loss']:.4f} ({train_s / step:.2f} s/step)",
                flush=True,
            )
        if eval_every and step % eval_every == 0 and step < config.train.steps:
            evals.append({"step": step, "val_loss": validation_loss(trainer.engine, trainer.valid_batches, part_eval)})
        nonfinite_streak = 0 if math.isfinite(record["loss"]) else nonfinite_streak + 1
        if nonfinite_streak >= NONFINITE_ABORT:
            print(f"[study] {spec['name']}: {NONFINITE_ABORT} non-finite losses in a row, stopping", flush=True)
            break
    start = time.perf_counter()
    final_val = validation_loss(trainer.engine, trainer.valid_batches, full_eval)
    eval_s = time.perf_counter() - start
    result = {
        "spec": spec,
        "parameters": parameter_count(config.model),
        "records": records,
        "evals": evals,
        "final_val_loss": final_val,
        "val_samples": full_eval.eval_batches * batch,
        "setup_s": setup_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - started,
    }
    shutil.rmtree(train_dir, ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Planning and launching runs


def base_overrides(args) -> list[str]:
    return [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"model.seq_length={args.seq}",
        "model.dropout=0.0",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        "train.save_interval=0",
        f"train.seed={args.seed}",
        *args.overrides,
    ]


def run_spec(args, name: str, optimizer: str, lr: float, steps: int, si_lr: float | None = None) -> dict:
    overrides = base_overrides(args)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    overrides += [f"train.steps={steps}", f"optim.warmup_steps={warmup}", f"optim.lr={lr}"]
    if optimizer == "sgd_si":
        overrides += [
            "model.scale_invariant=true",
            "model.final_layernorm=after",
            "optim.name=sgd_si",
            f"optim.si_lr={si_lr}",
            f"optim.si_weight_decay={args.si_wd}",
            f"optim.si_other={args.si_other}",
            f"optim.decay={args.si_decay}",
            f"optim.grad_clip={args.si_grad_clip}",
        ]
    else:
        overrides += [f"optim.name={optimizer}", "optim.decay=cosine"]
    return {
        "name": name,
        "optimizer": optimizer,
        "lr": lr,
        "si_lr": si_lr,
        "steps": steps,
        "config": args.config,
        "overrides": overrides,
        "eval_every": args.eval_every,
    }


def launch(spec: dict, workdir: Path, fresh: bool) -> dict:
    """Runs `spec` in a fresh process (or reuses a finished run with identical settings)."""
    key = {k: v for k, v in spec.items() if k != "name"}
    # the directory is named after the settings, so that equal runs under two names are one run
    key_name = "run-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    run_dir = workdir / key_name
    result_path = run_dir / "result.json"
    reused = result_path.is_file() and not fresh
    if reused:
        result = json.loads(result_path.read_text())
        print(f"[study] {spec['name']}: reusing {run_dir}", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        print(
            f"[study] {spec['name']}: {spec['optimizer']} lr {spec['lr']:g}"
            + (f" si_lr {spec['si_lr']:g}" if spec["si_lr"] is not None else "")
            + f", {spec['steps']} steps -> {run_dir}",
            flush=True,
        )
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")]
        with open(run_dir / "log.txt", "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
            for line in process.stdout:
                log.write(line)
                if line.startswith("[study]"):
                    print("   " + line.rstrip(), flush=True)
            if process.wait() != 0:
                raise SystemExit(f"run {spec['name']} failed (exit {process.returncode}); see {run_dir / 'log.txt'}")
        result = json.loads(result_path.read_text())
    return {**summarise(result, spec["name"]), "reused": reused}


# ---------------------------------------------------------------------------------------------
# Metrics


def spike_steps(losses: list[float]) -> list[int]:
    """Steps (1-based) whose loss exceeds SPIKE_FACTOR x the median of the finite losses of the
    previous SPIKE_WINDOW steps (of all previous steps before step SPIKE_WINDOW + 1), judged once
    at least SPIKE_MIN_HISTORY of them exist. A non-finite loss is not a spike: it marks the run
    as diverged."""
    spikes = []
    for i, loss in enumerate(losses):
        history = [x for x in losses[max(0, i - SPIKE_WINDOW) : i] if math.isfinite(x)]
        if (
            len(history) >= SPIKE_MIN_HISTORY
            and math.isfinite(loss)
            and loss > SPIKE_FACTOR * statistics.median(history)
        ):
            spikes.append(i + 1)
    return spikes


def summarise(result: dict, name: str) -> dict:
    spec, records = result["spec"], result["records"]
    losses = [r["loss"] for r in records]
    finite = [x for x in losses if math.isfinite(x)]
    tail = losses[-10:]
    final_train = statistics.fmean(tail) if all(math.isfinite(x) for x in tail) else float("nan")
    nonfinite = sum(1 for x in losses if not math.isfinite(x))
    initial = losses[0]
    final_val = result["final_val_loss"]
    diverged = bool(
        nonfinite or not math.isfinite(final_train) or final_train > initial or not math.isfinite(final_val)
    )
    spikes = spike_steps(losses)
    summary = {
        "name": name,
        "optimizer": spec["optimizer"],
        "lr": spec["lr"],
        "si_lr": spec["si_lr"],
        "steps": spec["steps"],
        "steps_run": len(records),
        "parameters": result["parameters"],
        "final_val_loss": final_val,
        "final_val_ppl": math.exp(min(final_val, 50)) if math.isfinite(final_val) else None,
        "final_train_loss": final_train,
        "initial_loss": initial,
        "max_loss_after_step_10": max(finite[10:], default=None),
        "spikes": len(spikes),
        "spike_steps": spikes,
        "nonfinite_steps": nonfinite,
        "diverged": diverged,
        "skipped_steps": sum(1 for r in records if r["skipped"]),
        "wall_s": round(result["wall_s"], 1),
        "s_per_step": round(result["train_s"] / max(1, len(records)), 3),
        "val_samples": result["val_samples"],
        "curve": [round(x, 4) if math.isfinite(x) else None for x in losses],
        "evals": result["evals"],
    }
    if "si_clip_events" in records[-1]:
        summary["si_clip_steps"] = records[-1]["si_clip_events"]
        summary["si_clip_fraction"] = records[-1]["si_clip_events"] / len(records)
        summary["si_weight_norm_first_last"] = [records[0]["si_weight_norm"], records[-1]["si_weight_norm"]]
    summary["grad_norm_median"] = statistics.median(
        [r["grad_norm"] for r in records if math.isfinite(r["grad_norm"])] or [float("nan")]
    )
    return summary


def pick_best(results: list[dict]) -> dict:
    ok = [r for r in results if not r["diverged"] and math.isfinite(r["final_val_loss"])]
    if not ok:
        raise SystemExit("every sweep run diverged: widen the sweep")
    return min(ok, key=lambda r: r["final_val_loss"])


# ---------------------------------------------------------------------------------------------
# Plot


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    runs = summary["runs"]
    colors = {
        "adamw": "tab:blue",
        "adamw_10x": "tab:cyan",
        "s3": "tab:red",
        "s3_10x": "tab:orange",
        "s3_tuned": "tab:brown",
        "sgd_si": "tab:green",
        "adamw_2x": "tab:purple",
    }

    def smooth(values, weight=0.9):
        out, ema = [], None
        for v in values:
            if v is None:
                out.append(float("nan"))
                continue
            ema = v if ema is None else weight * ema + (1 - weight) * v
            out.append(ema)
        return out

    def label(r):
        lr = f"lr {r['lr']:g}" if r["optimizer"] != "sgd_si" else f"SGD lr {r['si_lr']:g}, emb lr {r['lr']:g}"
        return f"{r['name']} ({lr}): val {r['final_val_loss']:.3f}, {r['spikes']} spikes"

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    for name in ("adamw", "adamw_10x", "s3", "s3_10x", "s3_tuned", "sgd_si"):
        if name in runs:
            r = runs[name]
            curve = [float("nan") if v is None else v for v in r["curve"]]
            ax.plot(range(1, len(curve) + 1), curve, color=colors[name], lw=0.8, label=label(r))
            for s in r["spike_steps"]:
                ax.plot(s, curve[s - 1], "x", color=colors[name], ms=7)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(
        f"training loss per step, {summary['setup']['steps']} steps (x: spikes > {SPIKE_FACTOR} x median of last {SPIKE_WINDOW})"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    lows = []
    for name in ("adamw", "adamw_10x", "s3", "s3_10x", "s3_tuned", "sgd_si"):
        if name in runs:
            r = runs[name]
            sm = smooth(r["curve"])
            lows.append(min(x for x in sm if math.isfinite(x)))
            ax.plot(range(1, len(sm) + 1), sm, color=colors[name], label=r["name"])
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
    ax.set_title("the same, smoothed (EMA 0.9), zoomed")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    lows = []
    for name in ("adamw", "s3", "s3_10x", "s3_tuned", "adamw_2x"):
        if name in runs:
            r = runs[name]
            sm = smooth(r["curve"])
            lows += [min(x for x in sm if math.isfinite(x)), r["final_val_loss"]]
            ax.plot(range(1, len(sm) + 1), sm, color=colors[name], label=f"{r['name']} ({r['steps']} steps)")
            ax.axhline(r["final_val_loss"], color=colors[name], ls=":", lw=1)
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
    ax.set_title("S3 at N steps vs AdamW at 2N (smoothed train loss; dotted: final validation loss)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    for key, marker, title in (
        ("sweep", "o-", "AdamW lr sweep"),
        ("s3_sweep", "^-", "S3 lr sweep"),
        ("si_sweep", "s-", "sgd_si SGD lr sweep (trunk)"),
    ):
        rows = summary.get(key) or []
        if rows:
            xs = [r["si_lr"] if key == "si_sweep" else r["lr"] for r in rows]
            ys = [r["final_val_loss"] if not r["diverged"] else float("nan") for r in rows]
            ax.plot(xs, ys, marker, label=f"{title} ({rows[0]['steps']} steps)")
    if any(summary.get(key) for key in ("sweep", "s3_sweep", "si_sweep")):
        ax.set_xscale("log")
        ax.set_title("lr sweeps: final validation loss vs learning rate")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")  # no sweep in this invocation (lrs given)

    setup = summary["setup"]
    fig.suptitle(
        f"PanGu-alpha {setup['parameters'] / 1e6:.1f}M ({setup['layers']} layers, hidden {setup['hidden']}), "
        f"batch {setup['batch']} x {setup['seq']} tokens, builtin corpus, same data order for every run"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def sweep(args, summary: dict, key: str, specs: list[dict], lr_key: str) -> float:
    """Runs the sweep `specs` (cached runs are reused), records it in summary[key]; returns the
    `lr_key` ("lr" or "si_lr") of the run with the lowest final validation loss."""
    runs = [launch(spec, Path(args.workdir), args.fresh) for spec in specs]
    summary[key] = [drop_curve(r) for r in runs]
    best = pick_best(runs)[lr_key]
    print(f"[study] {key}: best {lr_key} {best:g}", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="smoke version: hidden 128, 3 layers, 60 steps, no sweeps (a few minutes)"
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="base config (data, tokenizer)")
    parser.add_argument("--steps", type=int, default=None, help="N, the length of every run but adamw_2x (2N)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="model.num_layers (counts the query layer)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (samples of seq tokens)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--lr", type=float, default=None, help="AdamW's tuned lr LR, also S3's lr (skips --sweep)")
    parser.add_argument("--lr-mult", type=float, default=10.0)
    parser.add_argument("--sweep", default=None, help="comma-separated AdamW lrs to sweep for LR")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps of a sweep run")
    parser.add_argument("--s3-lr", type=float, default=None, help="S3's own tuned lr (skips --s3-sweep)")
    parser.add_argument("--s3-sweep", default=None, help="comma-separated S3 lrs to sweep for S3_LR")
    parser.add_argument("--si-lr", type=float, default=None, help="sgd_si's SGD lr for the trunk (skips --si-sweep)")
    parser.add_argument("--si-sweep", default=None, help="comma-separated SGD lrs for sgd_si to sweep")
    parser.add_argument("--si-wd", type=float, default=1e-2, help="sgd_si trunk weight decay (SIBERT 1e-2)")
    parser.add_argument(
        "--si-other", default="adamw", choices=("adamw", "s3"), help="optimizer of the embeddings in sgd_si (at LR)"
    )
    parser.add_argument(
        "--si-decay",
        default="step",
        choices=("step", "cosine"),
        help="sgd_si schedule (SIBERT: step, /10 at 60%% and 90%%)",
    )
    parser.add_argument(
        "--si-grad-clip",
        type=float,
        default=0.0,
        help="global gradient-norm clip in sgd_si runs (default 0: off, the trunk has its "
        "relative clip; a global clip would tie the trunk's SGD step to the embeddings' "
        "gradient norm). The other runs use 1.0",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also validate on 8 batches every this many steps (0: only at the end)",
    )
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--workdir", default="runs/optimizer_study")
    parser.add_argument(
        "--json",
        default=None,
        help="summary (default: docs/optimizer_study.json; with --quick runs/optimizer_study/quick.json)",
    )
    parser.add_argument("--png", default=None, help="loss curves (default: like --json, .png)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs whose results are kept in --workdir")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config override for every run (section.key=value)",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    os.chdir(ROOT)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    wanted = [x.strip() for x in args.runs.split(",") if x.strip()]
    unknown = set(wanted) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    started = time.time()

    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.model.sizes import parameter_count

    config = load_config(args.config, base_overrides(args))
    prepare(config, progress=False)  # once, before the runs (idempotent)
    summary: dict = {
        "setup": {
            "command": " ".join(["python bench/optimizer_study.py", *sys.argv[1:]]),
            "config": args.config,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "seq": args.seq,
            "batch": args.batch,
            "steps": args.steps,
            "sweep_steps": args.sweep_steps,
            "parameters": parameter_count(config.model),
            "seed": args.seed,
            "overrides": base_overrides(args),
            "warmup_fraction": WARMUP_FRACTION,
            "spike_rule": f"loss > {SPIKE_FACTOR} x median of the previous {SPIKE_WINDOW} steps "
            f"(fewer before step {SPIKE_WINDOW + 1}; from step "
            f"{SPIKE_MIN_HISTORY + 1} on)",
            "machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset (torch default)')}",
        }
    }

    steps = args.sweep_steps
    lr = args.lr
    if lr is None:
        lr = sweep(
            args,
            summary,
            "sweep",
            [run_spec(args, f"sweep_adamw_{x:g}", "adamw", x, steps) for x in parse_floats(args.sweep)],
            "lr",
        )
    s3_lr = args.s3_lr
    if s3_lr is None and args.s3_sweep and "s3_tuned" in wanted:
        s3_lr = sweep(
            args,
            summary,
            "s3_sweep",
            [run_spec(args, f"sweep_s3_{x:g}", "s3", x, steps) for x in parse_floats(args.s3_sweep)],
            "lr",
        )
    si_lr = args.si_lr
    if si_lr is None and "sgd_si" in wanted:
        si_lr = sweep(
            args,
            summary,
            "si_sweep",
            [run_spec(args, f"sweep_sgd_si_{x:g}", "sgd_si", lr, steps, si_lr=x) for x in parse_floats(args.si_sweep)],
            "si_lr",
        )
    summary["setup"].update(
        lr=lr,
        lr_10x=args.lr_mult * lr,
        s3_lr=s3_lr,
        si_lr=si_lr,
        si_weight_decay=args.si_wd,
        si_other=args.si_other,
        si_decay=args.si_decay,
        si_grad_clip=args.si_grad_clip,
    )

    n = args.steps
    plan = {
        "adamw": ("adamw", lr, n),
        "adamw_10x": ("adamw", args.lr_mult * lr, n),
        "s3": ("s3", lr, n),
        "s3_10x": ("s3", args.lr_mult * lr, n),
        "s3_tuned": ("s3", s3_lr, n),
        "sgd_si": ("sgd_si", lr, n),
        "adamw_2x": ("adamw", lr, 2 * n),
    }
    summary["runs"] = {}
    for name in wanted:
        optimizer, run_lr, steps = plan[name]
        if name == "s3_tuned" and s3_lr in (None, lr):  # none given, or the same run as s3
            continue
        spec = run_spec(args, name, optimizer, run_lr, steps, si_lr=si_lr if optimizer == "sgd_si" else None)
        summary["runs"][name] = launch(spec, Path(args.workdir), args.fresh)
    runs = summary["runs"]
    if "adamw_2x" in runs:
        summary["s3_n_vs_adamw_2n"] = {
            name: {
                "lr": runs[name]["lr"],
                "steps": runs[name]["steps"],
                "final_val_loss": runs[name]["final_val_loss"],
                "minus_adamw_2x": runs[name]["final_val_loss"] - runs["adamw_2x"]["final_val_loss"],
            }
            for name in ("adamw", "s3", "s3_10x", "s3_tuned", "adamw_2x")
            if name in runs
        }
    summary["total_wall_s"] = round(time.time() - started, 1)
    summary["runs_wall_s"] = round(sum(r["wall_s"] for r in runs.values()), 1)  # as if none were reused

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, Path(args.png))
    print_table(summary)
    print(f"[study] summary: {args.json}, plot: {args.png}, {summary['total_wall_s'] / 60:.1f} min")


def drop_curve(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("curve", "evals")}


def print_table(summary: dict) -> None:
    print(
        f"{'run':<11} {'optimizer':<8} {'lr':>9} {'steps':>6} {'val loss':>9} {'val ppl':>8} "
        f"{'spikes':>6} {'diverged':>8} {'wall':>7}"
    )
    for r in summary["runs"].values():
        lr = f"{r['si_lr']:g}" if r["optimizer"] == "sgd_si" else f"{r['lr']:g}"
        ppl = f"{r['final_val_ppl']:.1f}" if r["final_val_ppl"] else "-"
        print(
            f"{r['name']:<11} {r['optimizer']:<8} {lr:>9} {r['steps']:>6} {r['final_val_loss']:>9.4f} {ppl:>8} "
            f"{r['spikes']:>6} {r['diverged']!s:>8} {r['wall_s'] / 60:>6.1f}m"
        )


RUNS = ("adamw", "adamw_10x", "s3", "s3_10x", "sgd_si", "adamw_2x", "s3_tuned")
# The defaults of the full study (lrs swept at 100 steps: docs/optimizers.md) and of --quick
# (no sweeps: fixed lrs, only a check that everything runs).
FULL = {
    "steps": 300,
    "hidden": 384,
    "layers": 6,
    "heads": 6,
    "sweep_steps": 100,
    "sweep": "2.5e-4,5e-4,1e-3,2e-3,4e-3",
    "s3_sweep": "5e-4,1e-3,2e-3,3e-3,5e-3",
    "si_sweep": "8e-4,3e-3,1e-2,3e-2,0.1,0.3,1,3",
    "json": "docs/optimizer_study.json",
    "png": "docs/optimizer_study.png",
}
QUICK = {
    "steps": 60,
    "hidden": 128,
    "layers": 3,
    "heads": 4,
    "lr": 1e-3,
    "s3_lr": 2e-3,
    "si_lr": 1.0,
    "json": "runs/optimizer_study/quick.json",
    "png": "runs/optimizer_study/quick.png",
}

if __name__ == "__main__":
    main()
