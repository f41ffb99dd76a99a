"""Training throughput of `pangu pretrain` against a minimal plain-PyTorch loop, in one process.

Both train the same network (the same PanGu-α layers), on the same data, with the same optimizer
(S3), gradient clipping and gradient accumulation. pangu's side is the trainer's own step
(DeepSpeed PipelineEngine + ZeRO-1 at world size 1); the baseline is a bare loop. Steps are
interleaved in blocks (A B A B ...) so both see the same machine load; the medians of per-step
times give the ratio.

    python bench/throughput.py [--config configs/tiny.yaml] [--rounds 6] [--steps-per-round 5] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from pangu.config import load_config
from pangu.data.dataset import make_batch
from pangu.data.prepare import prepare
from pangu.data.sampler import GlobalBatchSampler
from pangu.model import layout
from pangu.model.init import initialize_parameters
from pangu.model.pangu_alpha import PanguAlpha
from pangu.model.sizes import flops_per_token
from pangu.optim.param_groups import param_groups
from pangu.optim.s3 import S3
from pangu.pretrain.trainer import Trainer, learning_rate


class PlainLoop:
    """The baseline: what a minimal hand-written training loop for the same model does."""

    def __init__(self, config, dataset, meta):
        self.config, self.dataset, self.meta = config, dataset, meta
        self.model = PanguAlpha(config.model)
        initialize_parameters(self.model.named_parameters(), config.model, config.train.seed)
        self.model.train()
        optim = config.optim
        self.optimizer = S3(
            param_groups(
                self.model.named_parameters(),
                optim.weight_decay,
                no_decay=[p.name for p in layout.parameters(config.model) if not p.weight_decay],
            ),
            lr=optim.lr,
            beta=optim.beta,
            p=optim.p,
            nesterov=optim.nesterov,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.sampler = GlobalBatchSampler(len(dataset), config.train.global_batch_size, seed=config.train.seed)
        self.step = 0

    def train_step(self) -> float:
        train = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
        samples = np.stack([self.dataset[int(i)] for i in self.sampler.next_global_batch()])
        counted = int((samples[:, :-1] != self.meta["pad_id"]).sum())
        total = 0.0
        for start in range(0, len(samples), train.micro_batch_size):
            batch = make_batch(
                samples[start : start + train.micro_batch_size],
                pad_id=self.meta["pad_id"],
                eod_id=self.meta["eod_id"],
                eod_reset=False,
            )
            logits = self.model(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["position_ids"]))
            losses = F.cross_entropy(
                logits.float().flatten(0, 1), torch.from_numpy(batch["labels"]).flatten(), reduction="none"
            )
            loss = (losses * torch.from_numpy(batch["loss_mask"]).flatten()).sum() / counted
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total


def timed(step_fn) -> float:
    start = time.perf_counter()
    step_fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as output_dir:
        overrides = [
            *args.overrides,
            f"train.output_dir={output_dir}",
            "train.save_interval=0",
            "train.steps=1000",
            "optim.warmup_steps=10",
        ]
        config = load_config(args.config, overrides)
        prepare(config, progress=False)
        pangu_run = Trainer(config)
        plain = PlainLoop(config, pangu_run.train_data, pangu_run.meta)
        for _ in range(2):  # warm-up: allocator, first-call costs
            pangu_run.train_step()
            plain.train_step()
        pangu_times, plain_times = [], []
        for _ in range(args.rounds):
            pangu_times += [timed(pangu_run.train_step) for _ in range(args.steps_per_round)]
            plain_times += [timed(plain.train_step) for _ in range(args.steps_per_round)]

    tokens = config.train.global_batch_size * config.model.seq_length
    flops = flops_per_token(config.model)
    peak = pangu_run.peak_flops
    rows = [("pangu pretrain", statistics.median(pangu_times)), ("plain PyTorch loop", statistics.median(plain_times))]
    print(
        f"{config.train.global_batch_size} x {config.model.seq_length} tokens per step, "
        f"{len(pangu_times)} steps each, interleaved in blocks of {args.steps_per_round}"
    )
    for name, seconds in rows:
        print(
            f"{name:<20} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10,.0f} tok/s  "
            f"MFU {100 * tokens / seconds * flops / peak:5.1f}%  (of a measured {peak / 1e9:.0f} GFLOP/s)"
        )
    print(f"ratio pangu / plain (tokens/s, median): {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
