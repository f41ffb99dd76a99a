"""Training throughput of `pangu pretrain` against a plain PyTorch loop that shares none of its code.

pangu's side is the trainer's own step with each engine (`--engines`: the DeepSpeed engine, the
torch engine; at world size 1), the pangu model, the data pipeline's batches. The baseline is what a user would write instead
(`PlainLoop`): the same network written here with torch modules only (`nn.Linear`,
`nn.Embedding`, `nn.LayerNorm`, `F.scaled_dot_product_attention`, `F.cross_entropy`), the same
shapes, the same samples, gradient accumulation, clipping and learning-rate schedule, and the
optimizer the config names with the same settings (S3 by default; fused as `optim.fused` says).
Like is compared with like: the eager loop with pangu eager, and, with `--compile`, the loop
under torch.compile with pangu under `train.compile = true`. Steps are interleaved in blocks
(A B C A B C ...) so all see the same machine load; the medians of per-step times give the ratios.

    python bench/throughput.py [--config configs/tiny.yaml] [--rounds 6] [--steps-per-round 5] \\
        [--compile] [--set k=v ...]

scripts/gpu_check.py uses `PlainLoop` as its baseline on a GPU (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pangu.optim.s3 import S3
from pangu.optim.schedules import lr_factor


class Block(nn.Module):
    """A pre-LayerNorm transformer block; `query` replaces the attention query input (the top
    "query layer" of PanGu-alpha). `mask` [b, s, s] (True: may attend) replaces causal attention."""

    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.up, self.down = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, query: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        n = self.ln1(x)
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(n if query is None else query)), split(self.k(n)), split(self.v(n))
        if mask is None:
            attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attention = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        x = x + self.o(attention.transpose(1, 2).reshape(b, s, h))
        up = self.up(self.ln2(x))
        return x + self.down(up * torch.sigmoid(1.702 * up))


class PlainPanguAlpha(nn.Module):
    """PanGu-alpha's shapes and computation (embeddings, blocks, final LayerNorm, query layer,
    tied head), no dropout, written without pangu. `recompute` ("full") recomputes each block in
    backward instead of keeping its activations, as parallel.recompute = full does."""

    def __init__(self, vocab: int, seq: int, h: int, heads: int, ffn: int, layers: int, recompute: str = "none"):
        super().__init__()
        if recompute not in ("none", "full"):
            raise ValueError(f"recompute = {recompute!r}: the plain loop knows none and full")
        self.recompute = recompute == "full"
        self.word, self.position, self.query = nn.Embedding(vocab, h), nn.Embedding(seq, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads, ffn) for _ in range(layers - 1))
        self.final_norm = nn.LayerNorm(h)
        self.top = Block(h, heads, ffn)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.word(ids) + self.position(positions)
        for block in [*self.blocks, self.top]:
            query = self.query(positions) if block is self.top else None
            if block is self.top:
                x = self.final_norm(x)
            if self.recompute and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, query, use_reentrant=False)
            else:
                x = block(x, mask, query)
        return x @ self.word.weight.t()


def documents(ids: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, mask) of EOD reset: positions restart after each separator; a token attends to
    the earlier tokens of its own document only."""
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eod_id
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    document = torch.cumsum(starts, dim=1)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
    return positions, (document[:, :, None] == document[:, None, :]) & causal


class PlainLoop:
    """A minimal hand-written training loop: global batches of packed samples [B, seq + 1] in,
    micro-batches, the loss summed over the tokens counted in the whole global batch, clipping, the
    optimizer the config names (S3 or AdamW, its settings), the config's learning-rate schedule."""

    def __init__(
        self,
        config,
        samples_of: Callable[[int], np.ndarray],
        *,
        pad_id: int,
        eod_id: int,
        compile: bool = False,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
    ):
        """`dtype` bfloat16: autocast, fp32 weights (what a user's mixed-precision loop does);
        `compile`: the forward and loss under torch.compile."""
        m, optim = config.model, config.optim
        torch.manual_seed(config.train.seed)
        self.config, self.samples_of, self.device, self.dtype = config, samples_of, device, dtype
        self.pad_id, self.eod_id = pad_id, eod_id
        vocab = m.padded_vocab_size
        self.model = PlainPanguAlpha(
            vocab, m.seq_length, m.hidden_size, m.num_heads, m.ffn_size, m.num_layers, recompute
        )
        self.model.to(device).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        o = optim.options
        fused = device.type == "cuda" if optim.fused == "auto" else optim.fused
        if optim.name == "s3":
            self.optimizer = S3(groups, lr=optim.lr, beta=o.beta, p=o.p, nesterov=o.nesterov, eps=o.eps, fused=fused)
        elif optim.name == "adamw":
            self.optimizer = torch.optim.AdamW(
                groups, lr=optim.lr, betas=o.betas, eps=o.eps, fused=fused, foreach=not fused
            )
        else:
            raise ValueError(f"optim.name = {optim.name!r}: the plain loop knows s3 and adamw")
        self.forward_loss = torch.compile(self._forward_loss) if compile else self._forward_loss
        self.step = 0

    def _forward_loss(self, samples: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        ids, labels = samples[:, :-1], samples[:, 1:]
        if self.config.data.eod_reset:
            positions, mask = documents(ids, self.eod_id)
        else:
            positions, mask = torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None
        logits = self.model(ids, positions, mask)[..., : self.config.model.vocab_size]
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (losses * (ids != self.pad_id).flatten()).sum() / counted

    def train_step(self) -> float:
        optim, train = self.config.optim, self.config.train
        factor = lr_factor(
            self.step,
            total_steps=train.steps,
            warmup_steps=optim.warmup_steps,
            decay=optim.decay,
            min_ratio=optim.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = optim.lr * factor
        samples = torch.from_numpy(self.samples_of(self.step)).to(self.device)
        counted = (samples[:, :-1] != self.pad_id).sum().clamp(min=1)
        total = torch.zeros((), device=self.device)
        for micro_batch in samples.split(train.micro_batch_size):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self.forward_loss(micro_batch, counted)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(total)


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
    parser.add_argument("--engines", default="deepspeed,torch", help="pangu's engines to time (parallel.engine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pangu.cli import configure_output

    configure_output(-1)  # before megatron-core and DeepSpeed are imported: their notices stay out
    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.data.sampler import GlobalBatchSampler
    from pangu.model.sizes import flops_per_token
    from pangu.pretrain.trainer import Trainer

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
        engines = args.engines.split(",")
        trainers = {
            f"pangu {engine} engine": Trainer(
                load_config(
                    args.config, [*overrides, f"train.output_dir={output_dir}/{engine}", f"parallel.engine={engine}"]
                )
            )
            for engine in engines
        }
        pangu_run = next(iter(trainers.values()))
        # the baseline gets the samples of pangu's steps, read before timing starts
        steps = 2 + args.rounds * args.steps_per_round
        sampler = GlobalBatchSampler(len(pangu_run.train_data), config.train.global_batch_size, seed=config.train.seed)
        batches = [np.stack([pangu_run.train_data[int(i)] for i in sampler.next_global_batch()]) for _ in range(steps)]
        ids = {"pad_id": pangu_run.meta["pad_id"], "eod_id": pangu_run.meta["eod_id"]}
        runs = {**trainers, "plain PyTorch loop": PlainLoop(config, lambda k: batches[k % steps], **ids)}
        if args.compile:
            for engine in engines:
                compiled = [f"train.output_dir={output_dir}/{engine}-compiled", f"parallel.engine={engine}"]
                runs[f"pangu {engine} engine compiled"] = Trainer(
                    load_config(args.config, [*overrides, *compiled, "train.compile=true"])
                )
            runs["plain loop compiled"] = PlainLoop(config, lambda k: batches[k % steps], compile=True, **ids)
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
        f"threads, {args.rounds * args.steps_per_round} steps each, interleaved in blocks of {args.steps_per_round}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(
            f"{name:<24} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10,.0f} tok/s  "
            f"MFU {100 * tokens / seconds * flops / peak:5.1f}%  (of a measured {peak / 1e9:.0f} GFLOP/s)"
        )
    for pangu_name in [name for name in medians if name.startswith("pangu")]:
        plain_name = "plain loop compiled" if pangu_name.endswith("compiled") else "plain PyTorch loop"
        ratio = medians[plain_name] / medians[pangu_name]
        print(f"ratio {pangu_name} / {plain_name} (tokens/s, median): {ratio:.3f}")


if __name__ == "__main__":
    main()
