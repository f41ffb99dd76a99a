"""Training throughput of `pangu pretrain` against plain PyTorch loops that share none of its code.

pangu's side is the trainer's own step (DeepSpeed PipelineEngine + ZeRO-1 at world size 1, the
pangu model, the data pipeline's batches). The baselines are what a user would write instead:
the same network written here with torch modules only (`nn.Linear`, `nn.Embedding`,
`nn.LayerNorm`, `F.scaled_dot_product_attention`, `F.cross_entropy`), the same shapes, the same
batches, gradient accumulation and clipping, and
- "plain": the same optimizer (S3, as configured: foreach or fused),
- "plain compiled + AdamW": the loop under torch.compile with torch's fused AdamW.
Steps are interleaved in blocks (A B C A B C ...) so all see the same machine load; the medians
of per-step times give the ratios.

    python bench/throughput.py [--config configs/tiny.yaml] [--rounds 6] [--steps-per-round 5] \\
        [--compile] [--set k=v ...]

`--compile` also runs pangu with train.compile = true.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pangu.cli import configure_output

configure_output(-1)  # before megatron-core and DeepSpeed are imported: their notices stay out

from pangu.config import load_config  # noqa: E402
from pangu.data.dataset import make_batch  # noqa: E402
from pangu.data.prepare import prepare  # noqa: E402
from pangu.data.sampler import GlobalBatchSampler  # noqa: E402
from pangu.model.sizes import flops_per_token  # noqa: E402
from pangu.optim.registry import AdamWOptions  # noqa: E402
from pangu.optim.s3 import S3  # noqa: E402
from pangu.pretrain.trainer import Trainer, learning_rate  # noqa: E402


class Block(nn.Module):
    """A pre-LayerNorm transformer block; `query` replaces the attention query input (the top
    "query layer" of PanGu-alpha)."""

    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.up, self.down = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        n = self.ln1(x)
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.q(n if query is None else query))
        attention = F.scaled_dot_product_attention(q, split(self.k(n)), split(self.v(n)), is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(b, s, h))
        up = self.up(self.ln2(x))
        return x + self.down(up * torch.sigmoid(1.702 * up))


class PlainPanguAlpha(nn.Module):
    """PanGu-alpha's shapes and computation (embeddings, blocks, final LayerNorm, query layer,
    tied head), no dropout, written without pangu."""

    def __init__(self, vocab: int, seq: int, h: int, heads: int, ffn: int, layers: int):
        super().__init__()
        self.word, self.position, self.query = nn.Embedding(vocab, h), nn.Embedding(seq, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads, ffn) for _ in range(layers - 1))
        self.final_norm = nn.LayerNorm(h)
        self.top = Block(h, heads, ffn)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        x = self.top(self.final_norm(x), query=self.query(positions).expand_as(x))
        return x @ self.word.weight.t()


class PlainLoop:
    """A minimal hand-written training loop on pangu's batches."""

    def __init__(self, config, batches_of, compiled_adamw: bool, device=torch.device("cpu"), dtype=torch.float32):
        """`dtype` bfloat16: autocast, fp32 weights (what a user's mixed-precision loop does)."""
        m, optim = config.model, config.optim
        torch.manual_seed(config.train.seed)
        self.config, self.batches_of, self.device, self.dtype = config, batches_of, device, dtype
        self.model = (
            PlainPanguAlpha(m.padded_vocab_size, m.seq_length, m.hidden_size, m.num_heads, m.ffn_size, m.num_layers)
            .to(device)
            .train()
        )
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if compiled_adamw:  # with pangu's AdamW defaults (the config's optimizer is S3)
            adamw = AdamWOptions()
            self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=adamw.betas, eps=adamw.eps, fused=True)
            self.forward_loss = torch.compile(self._forward_loss)
        else:
            self.optimizer = S3(
                groups,
                lr=optim.lr,
                beta=optim.options.beta,
                p=optim.options.p,
                nesterov=optim.options.nesterov,
                eps=optim.options.eps,
                fused=optim.fused,
            )
            self.forward_loss = self._forward_loss
        self.step = 0

    def _forward_loss(self, ids, labels, mask, counted):
        logits = self.model(ids)[..., : self.config.model.vocab_size]
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (losses * mask.flatten()).sum() / counted

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
        batches = self.batches_of(self.step)
        counted = sum(float(b["loss_mask"].sum()) for b in batches)
        total = 0.0
        for b in batches:
            tensors = (torch.from_numpy(b[key]).to(self.device) for key in ("input_ids", "labels", "loss_mask"))
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.forward_loss(*tensors, counted)
            loss.backward()
            total += float(loss.detach())
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
    parser.add_argument("--compile", action="store_true", help="also run pangu with train.compile = true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as output_dir:
        overrides = [
            *args.overrides,
            f"train.output_dir={output_dir}",
            "train.save_interval=0",
            "train.steps=1000",
            "optim.warmup_steps=10",
            "model.dropout=0.0",
        ]
        config = load_config(args.config, overrides)
        prepare(config, progress=False)
        runs = {"pangu pretrain": Trainer(config)}
        if args.compile:
            runs["pangu train.compile"] = Trainer(load_config(args.config, [*overrides, "train.compile=true"]))
        pangu_run = runs["pangu pretrain"]
        # the baselines get the micro-batches of pangu's steps, built before timing starts
        steps = 2 + args.rounds * args.steps_per_round
        sampler = GlobalBatchSampler(len(pangu_run.train_data), config.train.global_batch_size, seed=config.train.seed)
        mb, meta = config.train.micro_batch_size, pangu_run.meta
        batches = []
        for _ in range(steps):
            samples = np.stack([pangu_run.train_data[int(i)] for i in sampler.next_global_batch()])
            batches.append(
                [
                    make_batch(samples[i : i + mb], pad_id=meta["pad_id"], eod_id=meta["eod_id"], eod_reset=False)
                    for i in range(0, len(samples), mb)
                ]
            )
        runs["plain PyTorch loop"] = PlainLoop(config, lambda k: batches[k % steps], compiled_adamw=False)
        runs["plain compiled + AdamW"] = PlainLoop(config, lambda k: batches[k % steps], compiled_adamw=True)
        for run in runs.values():  # warm-up: allocator, first-call costs, compilation
            for _ in range(2):
                run.train_step()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name] += [timed(run.train_step) for _ in range(args.steps_per_round)]

    tokens = config.train.global_batch_size * config.model.seq_length
    flops, peak = flops_per_token(config.model), pangu_run.peak_flops
    print(
        f"{config.train.global_batch_size} x {config.model.seq_length} tokens per step, {torch.get_num_threads()} "
        f"threads, {len(times['pangu pretrain'])} steps each, interleaved in blocks of {args.steps_per_round}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(
            f"{name:<24} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10,.0f} tok/s  "
            f"MFU {100 * tokens / seconds * flops / peak:5.1f}%  (of a measured {peak / 1e9:.0f} GFLOP/s)"
        )
    for name in [n for n in medians if n.startswith("pangu")]:
        for baseline in ("plain PyTorch loop", "plain compiled + AdamW"):
            ratio = medians[baseline] / medians[name]
            print(f"ratio {name} / {baseline} (tokens/s, median): {ratio:.3f}")


if __name__ == "__main__":
    main()
