"""Scorers: per-token losses of token rows, and greedy generation, from a model or an engine.

- `ModelScorer`: a `PanguAlpha` in this process (what `pangu.load` gives). Rows are batched by
  length and padded to the longest of the batch; generation uses the KV cache.
- `EngineScorer`: the training engine (pangu.parallel.engine), under any (dp, tp, pp) layout. Every
  micro-batch is padded to the fixed shape of training, [train.micro_batch_size,
  model.seq_length] (the engines fix the shapes of what stages send each other), with document
  ids exactly when training passes them (data.eod_reset). The engine returns per-token losses
  (vocab-parallel cross entropy, so the last stage never gathers the vocabulary) on the last
  stage, and its per-row losses are gathered on rank 0 (over the gloo host group: no copy per
  rank, nothing on the GPUs); the other ranks get None. Micro-batches are dealt round-robin to the
  data-parallel ranks. Generation asks the engine for full-vocabulary logits (full recomputation
  per token) and needs pp = 1.

Both build a row's inputs with `pangu.data.dataset.make_batch`, as training does, so positions
and masks (with or without EOD reset) are those the model was trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pangu.data.dataset import check_token_ids, make_batch
from pangu.evaluation.inference import cached_logits, current_document, generate, token_losses
from pangu.parallel import peers
from pangu.parallel.engine import Engine, MicroBatch
from pangu.parallel.stop import StopRequest

StopFn = Callable[[list[int]], bool]
MICRO_BATCHES_PER_CALL = 64  # per data-parallel rank and eval_batch call: bounds the kept outputs
_FIX = "the tokenizer is not the one the model was trained with"  # rows are the tokenizer's ids


class Scorer:
    """What the harness needs (results may be None on ranks other than 0): `seq_length`,
    `token_losses(rows)` -> for each row of token ids,
    the losses of tokens 1..len-1 (each predicted from the ones before it), and
    `generate(prompts, max_new_tokens, stop)` -> greedy continuations."""

    seq_length: int

    def token_losses(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: StopFn) -> list[list[int]]:
        raise NotImplementedError


class ModelScorer(Scorer):
    def __init__(self, model, *, pad_id: int, eod_id: int, eod_reset: bool = False, batch_size: int = 8):
        self.model = model
        self.seq_length = model.config.seq_length
        self.pad_id, self.eod_id, self.eod_reset = pad_id, eod_id, eod_reset
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    def token_losses(self, rows):
        was_training = self.model.training
        self.model.eval()
        out: list[np.ndarray | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for first in tqdm(
            range(0, len(order), self.batch_size), desc="scoring", unit="batch", leave=False, disable=None
        ):
            chunk = order[first : first + self.batch_size]
            width = max(len(rows[i]) for i in chunk)
            samples = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            for k, i in enumerate(chunk):
                samples[k, : len(rows[i])] = rows[i]
            check_token_ids(
                samples, self.model.config.vocab_size, lambda r, c, chunk=chunk: f"token {c} of row {chunk[r]}", _FIX
            )
            batch = make_batch(samples, pad_id=self.pad_id, eod_id=self.eod_id, eod_reset=self.eod_reset)
            losses = token_losses(self.model, batch).cpu().numpy()
            for k, i in enumerate(chunk):
                out[i] = losses[k, : len(rows[i]) - 1].copy()
        self.model.train(was_training)
        return out

    def generate(self, prompts, max_new_tokens, stop):
        was_training = self.model.training
        self.model.eval()
        results = []
        for prompt in tqdm(prompts, desc="generating", unit="prompt", leave=False, disable=None):
            if self.eod_reset:
                prompt = current_document(prompt, self.eod_id)
            results.append(
                generate(
                    cached_logits(self.model),
                    prompt,
                    seq_length=self.seq_length,
                    max_new_tokens=max_new_tokens,
                    stop_ids=(self.eod_id,),
                    stop=stop,
                    device=self.device,
                )
            )
        self.model.train(was_training)
        return results


class EngineScorer(Scorer):
    """Scores through the training engine (see the module docstring). Every rank of the job must
    call the same methods with the same rows; rank 0 gets the full results, the other ranks None. When
    the process has a StopRequest (training, `pangu evaluate` on the engine), the ranks agree before
    each engine call whether a signal asked to stop (then Stopped, on every rank at once)."""

    def __init__(self, engine: Engine, config, topology, *, pad_id: int, eod_id: int):
        self.engine, self.config, self.topology = engine, config, topology
        self.seq_length = config.model.seq_length
        self.micro_batch_size = config.train.micro_batch_size
        self.eod_reset = config.data.eod_reset
        self.pad_id, self.eod_id = pad_id, eod_id

    def _micro_batch(self, rows, indices: list[int]) -> MicroBatch:
        samples = np.full((self.micro_batch_size, self.seq_length + 1), self.pad_id, dtype=np.int64)
        for k, i in enumerate(indices):
            if len(rows[i]) > self.seq_length + 1:
                raise ValueError(f"row {i} has {len(rows[i])} tokens; at most seq_length + 1 = {self.seq_length + 1}")
            samples[k, : len(rows[i])] = rows[i]
        check_token_ids(samples, self.config.model.vocab_size, lambda r, c: f"token {c} of row {indices[r]}", _FIX)
        return MicroBatch.from_batch(
            make_batch(samples, pad_id=self.pad_id, eod_id=self.eod_id, eod_reset=self.eod_reset)
        )

    def token_losses(self, rows):
        topo, mb = self.topology, self.micro_batch_size
        groups = [list(range(s, min(s + mb, len(rows)))) for s in range(0, len(rows), mb)]
        per_call = MICRO_BATCHES_PER_CALL * topo.dp
        groups += [[] for _ in range(-len(groups) % topo.dp)]  # every dp rank runs as many micro-batches
        mine: dict[int, np.ndarray] = {}
        calls = range(0, len(groups), per_call)
        stop = StopRequest.current()
        for n, first in enumerate(
            tqdm(calls, desc="scoring", unit="call", leave=False, disable=None if dist.get_rank() == 0 else True)
        ):
            if stop is not None:
                stop.check(topo.host_group, f"task scoring (call {n + 1} of {len(calls)})")
            call = groups[first : first + per_call]
            local = call[topo.dp_rank :: topo.dp]
            outputs = self.engine.token_losses([self._micro_batch(rows, indices) for indices in local])
            if outputs is not None:
                for indices, losses in zip(local, outputs):
                    losses = losses.numpy()
                    for k, i in enumerate(indices):
                        mine[i] = losses[k, : len(rows[i]) - 1].copy()
        return _gather_rows(mine, len(rows), self.topology)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, stop):
        if self.topology.pp != 1:
            raise ValueError(
                f"generation needs parallel.pp = 1 (this run has {self.topology.layout}); "
                f"evaluate generation tasks with pp = 1 (any tp) or in one process"
            )

        def logits_of(ids: list[int]) -> torch.Tensor:
            """The whole row again each time (the engine keeps no KV cache)."""
            batch = make_batch(np.array([ids + [self.pad_id]]), pad_id=self.pad_id, eod_id=self.eod_id, eod_reset=False)
            return self.engine.logits(MicroBatch.from_batch(batch).inputs)[0, -1].float().cpu()

        mine: dict[int, np.ndarray] = {}
        request = StopRequest.current()
        for first in range(0, len(prompts), self.topology.dp):  # a round: one prompt per data-parallel rank
            if request is not None:
                request.check(self.topology.host_group, f"generation (prompt {first + 1} of {len(prompts)})")
            i = first + self.topology.dp_rank
            if i >= len(prompts):
                continue
            prompt = current_document(prompts[i], self.eod_id) if self.eod_reset else list(prompts[i])
            out = generate(
                logits_of,
                prompt,
                seq_length=self.seq_length,
                max_new_tokens=max_new_tokens,
                stop_ids=(self.eod_id,),
                stop=stop,
            )
            mine[i] = np.array(out, dtype=np.int64)
        if self.topology.tp_rank != 0:
            mine = {}
        rows = _gather_rows(mine, len(prompts), self.topology)
        return None if rows is None else [row.tolist() for row in rows]


def _gather_rows(mine: dict[int, np.ndarray], count: int, topology) -> list[np.ndarray] | None:
    """Every rank's {row index: values} merged on rank 0 over the host (gloo) group; None on the
    other ranks, which have nothing to do with the results."""
    rank = dist.get_rank()
    gathered: list[dict | None] | None = [None] * dist.get_world_size() if rank == 0 else None
    with peers.watched("gathering the scores on rank 0", topology.host_group):
        dist.gather_object(mine, gathered, dst=0, group=topology.host_group)
    if rank != 0:
        return None
    merged: dict[int, np.ndarray] = {}
    for part in gathered:
        merged.update(part or {})
    missing = [i for i in range(count) if i not in merged]
    if missing:
        raise RuntimeError(f"no rank returned rows {missing[:5]}")
    return [merged[i] for i in range(count)]
