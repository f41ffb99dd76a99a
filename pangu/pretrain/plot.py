"""`pangu plot RUN_DIR`: loss and learning-rate curves from metrics.jsonl to RUN_DIR/curves.png."""

from __future__ import annotations

from pathlib import Path

from pangu.pretrain.metrics import read_metrics
from pangu.schema import ConfigError


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    steps = [r for r in read_metrics(metrics) if "loss" in r]
    if not steps:
        raise ConfigError(f"{metrics} has no logged training steps yet: plot once the run has logged a step")
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    val = [r for r in steps if "val_loss" in r]
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
