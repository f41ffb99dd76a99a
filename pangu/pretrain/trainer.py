"""The training loop: `pangu pretrain`.

Per step: set the learning rate from the schedule, take global batch k from the sampler, give
this rank its micro-batches, let the engine (pangu/parallel/engine.py) run them (the pipeline
schedule, gradient accumulation, data-parallel reduction, clipping, the sharded optimizer step),
then log, validate and checkpoint. The run resumes by itself from the latest checkpoint in `train.output_dir`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import statistics
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pangu.checkpoint import format as checkpoint_format
from pangu.checkpoint.belonging import TrainedWith, UsedWith
from pangu.checkpoint.saver import Checkpointer
from pangu.checkpoint.store import CheckpointError, CorruptCheckpointError
from pangu.config import Config, SpikeGuardConfig
from pangu.data.dataset import make_batch, read_samples
from pangu.data.prepare import index_cache_dir, load_prepared, load_tokenizer
from pangu.data.sampler import GlobalBatchSampler, micro_batches
from pangu.evaluation.harness import evaluate_tasks
from pangu.evaluation.tasks import load_task
from pangu.model.sizes import flops_per_token, parameter_count
from pangu.optim import registry
from pangu.optim.schedules import lr_factor
from pangu.parallel import peers
from pangu.parallel.engine import Engine, MicroBatch, build_engine, check_schedule_runs, micro_batches_per_step
from pangu.parallel.sdc import SdcCheck
from pangu.parallel.stop import Stopped, StopRequest
from pangu.parallel.topology import Topology, device, init_distributed
from pangu.pretrain import run_directory
from pangu.pretrain.metrics import MetricsLogger, peak_memory_bytes, total_peak_flops
from pangu.schema import ConfigError, PanguError

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # how often a long validation says how far it is


class Batches:
    """Turns global batches of sample indices into this rank's micro-batches for the engine.

    A rank reads only the samples it feeds: its data-parallel share, and only on the first stage
    (token ids) and the last (labels); middle stages read nothing. The step's loss divides by the
    tokens counted in the whole global batch, which the last stage's ranks sum over their
    data-parallel group (one integer each, over gloo). `prefetch` reads the next step's share in a
    background thread while the current step runs."""

    def __init__(self, dataset, config: Config, topology: Topology, meta: dict, engine: Engine):
        self.dataset = dataset
        self.config = config
        self.topology = topology
        self.pad_id, self.eod_id = meta["pad_id"], meta["eod_id"]
        self.micro_batches = micro_batches_per_step(config, topology)
        # the global index of each micro-batch this rank runs, in order (DropoutSeeds names them so)
        self.order = [j * topology.dp + topology.dp_rank for j in range(self.micro_batches)]
        self.feeds = engine.reads_inputs or engine.reads_labels
        self.counts_tokens = engine.reads_labels
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pangu-batches")
        self._ahead: tuple[np.ndarray, Future] | None = None

    def prefetch(self, global_batch: np.ndarray) -> None:
        """Starts reading this rank's share of `global_batch` in the background."""
        if self.feeds:
            self._ahead = (global_batch, self._reader.submit(self._read, global_batch))

    def for_step(self, global_batch: np.ndarray) -> tuple[list[MicroBatch | None], int]:
        """(this rank's micro-batches in the order the engine eats them (None on middle stages,
        which the engine feeds from the previous stage), the tokens counted in the whole global
        batch (on the last stage; 0 elsewhere): the step's loss divides by them)."""
        if not self.feeds:
            return [None] * self.micro_batches, 0
        if self._ahead is not None and np.array_equal(self._ahead[0], global_batch):
            batches = self._ahead[1].result()
        else:
            batches = self._read(global_batch)
        self._ahead = None
        tokens = 0
        if self.counts_tokens:
            counted = torch.tensor([sum(int(batch["loss_mask"].sum()) for batch in batches)], dtype=torch.int64)
            with peers.watched("the count of a batch's tokens", self.topology.data_parallel_host_group):
                dist.all_reduce(counted, group=self.topology.data_parallel_host_group)
            tokens = int(counted.item())
        return [MicroBatch.from_batch(batch) for batch in batches], tokens

    def _read(self, global_batch: np.ndarray) -> list[dict]:
        out = []
        for local in micro_batches(
            global_batch,
            dp_size=self.topology.dp,
            dp_rank=self.topology.dp_rank,
            micro_batch_size=self.config.train.micro_batch_size,
        ):
            samples = read_samples(self.dataset, local, self.config.model.vocab_size)
            out.append(
                make_batch(samples, pad_id=self.pad_id, eod_id=self.eod_id, eod_reset=self.config.data.eod_reset)
            )
        return out


def learning_rate(config: Config, step: int) -> float:
    optim = config.optim
    return optim.lr * lr_factor(
        step,
        total_steps=config.train.steps,
        warmup_steps=optim.warmup_steps,
        decay=optim.decay,
        min_ratio=optim.min_lr_ratio,
    )


def set_learning_rate(engine: Engine, config: Config, step: int) -> float:
    """Sets every param group's lr to its base lr times the schedule; returns optim.lr's value."""
    lr = learning_rate(config, step)
    engine.set_lr_factor(lr / config.optim.lr)
    return lr


class Trainer:
    """Everything a run needs, set up (and resumed) on construction; `run()` trains."""

    def __init__(self, config: Config):
        self.config = config
        self.stop_request = StopRequest()  # before anything slow, so that an early signal is kept
        train = config.train
        self.topology = init_distributed(config.parallel)
        check_schedule_runs(config, self.topology)
        torch.manual_seed(train.seed)  # nothing in training draws from it (dropout: DropoutSeeds)
        self.train_data, self.meta = load_prepared(config.data.prepared_dir, "train", config.model.seq_length)
        self.index_cache = index_cache_dir(config.data.prepared_dir, config.parallel.timeout_minutes)  # built once
        valid_data, _ = load_prepared(config.data.prepared_dir, "valid", config.model.seq_length)
        one_pass = validation_batches(train, len(valid_data))
        if one_pass < train.eval_batches and self.topology.rank == 0:
            log.warning(
                "train.eval_batches = %d is more than one pass over the %d validation samples: validation takes %d "
                "global batches of %d",
                train.eval_batches,
                len(valid_data),
                one_pass,
                train.global_batch_size,
            )
        if self.meta["vocab_size"] != config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {config.model.vocab_size} does not match the tokenizer of "
                f"{config.data.prepared_dir} ({self.meta['vocab_size']} pieces): set "
                f"model.vocab_size = {self.meta['vocab_size']}"
            )
        if train.global_batch_size > len(self.train_data):
            raise ConfigError(
                f"train.global_batch_size = {train.global_batch_size} is more than the {len(self.train_data)} "
                f"training samples of {config.data.prepared_dir}: lower it, or prepare more data"
            )
        # task files are read now, so that a missing one fails before any training
        self.eval_tasks = [load_task(spec, prepared_dir=config.data.prepared_dir) for spec in train.eval_tasks]
        # the tokenizer the run trains with, as it starts: every checkpoint carries these bytes, whatever
        # the prepared directory holds when it is written
        self.tokenizer = load_tokenizer(config.data.prepared_dir)
        self.data = UsedWith.prepared(config.data.prepared_dir)
        if train.wandb.project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"train.wandb.project = {train.wandb.project!r} needs wandb: pip install 'pangu-lm[wandb]', "
                "or leave train.wandb.project empty"
            )
        self.output_dir = Path(train.output_dir)
        if self.output_dir.resolve().is_relative_to(Path(config.data.prepared_dir).resolve()):
            raise ConfigError(
                f"train.output_dir = {train.output_dir!r} is inside data.prepared_dir = {config.data.prepared_dir!r}, "
                "which `pangu prepare` replaces as a whole: choose a run directory outside it"
            )
        self._lock = self._on_rank_0(lambda: run_directory.claim(self.output_dir))
        self.checkpoints = Checkpointer(self.output_dir, config, self.topology)
        candidates = self._guard_resume(self._resumable)  # structure and what they belong to: O(files)
        if train.init_from and not candidates:
            self._on_rank_0(lambda: self._check_belongs([train.init_from], resume=False))
        if candidates:  # this rank's share is read while the engine is built
            self.checkpoints.prefetch(candidates[0])
        # train.init_from is checked now (its manifest, files and model), before the engine is built
        init_from = self.checkpoints.weights_source(train.init_from) if train.init_from and not candidates else None
        # a run that resumes (or starts from train.init_from) draws no initial weights
        self.engine = build_engine(config, self.topology, initialize=not (candidates or init_from))
        self.sampler = GlobalBatchSampler(
            len(self.train_data), train.global_batch_size, seed=train.seed, cache_dir=self.index_cache
        )
        self.step = 0
        self.resumed_from, self.resume_read = None, {}
        if candidates and not self._guard_resume(lambda: self._restore(candidates)):
            del self.engine  # it was built to receive the checkpoint: draw the initial weights now
            self.engine = build_engine(config, self.topology, initialize=True)
        elif init_from:
            self.checkpoints.load_weights(init_from, self.engine)
        if self.topology.rank == 0:  # the run is accepted: now its directory may change
            run_directory.accept(self.output_dir, config, self.step)
        self.spike_guard = SpikeGuard(train.spike_guard)
        self.engine.create_optimizer_state()  # optimizer state exists from here on: measurable
        self.sdc = None
        if train.sdc_check.enabled:
            bounded = registry.get(config.optim.name).bounded_update(config.optim)
            self.sdc = SdcCheck(train.sdc_check, self.engine, self.topology, bounded)
        self.memory = self.engine.memory_report()
        self.batches = Batches(self.train_data, config, self.topology, self.meta, self.engine)
        self.valid_batches = Batches(valid_data, config, self.topology, self.meta, self.engine)
        self.tokens_per_step = train.global_batch_size * config.model.seq_length
        self.model_flops = flops_per_token(config.model)
        self.peak_flops = total_peak_flops(train.peak_flops, device(), self.topology.host_group)

    def _on_rank_0(self, action):
        """`action()` on rank 0 (taking the output directory's lock, a check that reads files once for
        every rank); a PanguError it raises is raised on every rank. Returns its result (None on the
        other ranks)."""
        result, error = None, None
        if self.topology.rank == 0:
            try:
                result = action()
            except PanguError as err:
                error = err
        box = [error]
        with peers.watched("start-up (rank 0's checks)", self.topology.host_group):
            dist.broadcast_object_list(box, src=0, group=self.topology.host_group)
        if box[0] is not None:
            raise box[0]
        return result

    def _resumable(self) -> list[Path]:
        """The run's structurally intact checkpoints, newest first, once rank 0 has found that the
        newest belongs to this config and data (pangu/checkpoint/belonging.py)."""
        candidates = self.checkpoints.candidates()
        if candidates:
            self._on_rank_0(lambda: self._check_belongs(candidates, resume=True))
        return candidates

    def _check_belongs(self, checkpoints: list, resume: bool) -> None:
        """A checkpoint to resume (or, not `resume`, train.init_from) must compute the config's
        function and know the data's tokenizer; a resume must also be on the corpus it counts in.
        The first of `checkpoints` that can be read is checked (a damaged one is the loader's to
        pass over, with a warning naming the file)."""
        for checkpoint in checkpoints:
            try:
                trained = TrainedWith.read(checkpoint)
            except CorruptCheckpointError:
                continue
            trained.check_config(self.config.model)
            trained.check_tokenizer(self.data)
            if resume:
                trained.check_corpus(self.data)
            return

    def _guard_resume(self, action):
        """`action()`; when the run's checkpoints cannot be used (CheckpointError), stops with the
        reason, or with train.restart sets them aside and returns None (train from step 0)."""
        try:
            return action()
        except CheckpointError as err:
            if not self.config.train.restart:
                raise CheckpointError(
                    f"{err}. Nothing was changed: fix the cause and resume, or set train.restart=true to "
                    f"set {self.output_dir}'s checkpoints aside and train from step 0"
                ) from None
            reason = str(err)
        if self.topology.rank == 0:
            aside = checkpoint_format.set_aside(self.output_dir)
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.is_file():  # the new run writes it from step 0: the old curve goes with its checkpoints
                shutil.move(metrics, aside / metrics.name)
            log.warning(
                "train.restart: %s; the checkpoints (and metrics.jsonl) are moved to %s and training starts from "
                "step 0",
                reason,
                aside,
            )
        with peers.watched("setting the checkpoints aside (train.restart)", self.topology.host_group):
            dist.barrier(group=self.topology.host_group)
        return None

    def _restore(self, candidates: list[Path]) -> Path:
        """Continues from the newest of `candidates` that loads (falling back over corrupt ones):
        weights, optimizer, RNGs, step and data position."""
        path, state = self.checkpoints.restore(self.engine, candidates)
        self.resumed_from, self.resume_read = path, state["read"]
        self.step = state["step"]
        self.sampler = GlobalBatchSampler.from_state_dict(
            state["sampler"], len(self.train_data), self.config.train.global_batch_size, cache_dir=self.index_cache
        )
        return path

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns its metrics record."""
        lr = set_learning_rate(self.engine, self.config, self.step)
        start = time.perf_counter()
        micro_batches, tokens = self.batches.for_step(self.sampler.next_global_batch())
        self.batches.prefetch(self.sampler.peek_global_batch())
        self.engine.dropout_seeds.start_step(self.step, self.batches.order)
        result = self.engine.train_step(micro_batches, tokens)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens_per_sec = self.tokens_per_step / elapsed
        # A step whose gradients are not finite (or overflow in fp16) is skipped by DeepSpeed: the
        # weights and optimizer state stay as they were, while the step counter, the LR schedule
        # and the sampler move on (that batch is not retried).
        record = {
            "step": self.step,
            "loss": result.loss,
            "skipped": not result.applied,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * self.model_flops / self.peak_flops,
            "consumed_samples": self.sampler.consumed_samples,
            "peak_memory_bytes": peak_memory_bytes(),
        }
        record.update(registry.get(self.config.optim.name).metrics(self.engine.optimizer))
        return record

    def evaluate_tasks(self) -> dict[str, float]:
        """The train.eval_tasks scored through the training engine: {task/NAME/METRIC: value}."""
        if not self.eval_tasks:
            return {}
        results = evaluate_tasks(
            self.engine,
            self.eval_tasks,
            self.tokenizer,
            config=self.config,
            topology=self.topology,
            seed=self.config.train.seed,
            max_examples=self.config.train.eval_task_examples or None,
        )
        return {
            f"task/{name}/{metric}": result[metric]
            for task, (name, result) in zip(self.eval_tasks, results.items())
            for metric in task.headline
        }

    def save(self) -> Path:
        """Checkpoint this step (in the background with train.async_save: see checkpoint/saver.py)."""
        return self.checkpoints.save(
            self.step,
            self.engine,
            {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "tokenizer_fingerprint": self.data.tokenizer,
                "corpus_fingerprint": self.data.corpus,  # what the sampler's position counts in
            },
            self.tokenizer.model_bytes,
        )

    def run(self) -> dict:
        """Trains until train.steps, or checkpoints and stops after train.stop_at; returns the last record."""
        train = self.config.train
        stop = train.stop_at or train.steps
        logger = MetricsLogger(self.output_dir, train.steps, self.step, self.topology.rank == 0, self.config)
        memory = [None] * self.topology.world_size
        with peers.watched("start-up (gathering the memory report)", self.topology.host_group):
            dist.all_gather_object(memory, (self.memory, self.resume_read), group=self.topology.host_group)
        if self.resumed_from is not None:
            read = [r for _, r in memory]  # per rank: tensor bytes read, its own share, index bytes, seconds
            logger.event(
                self.step,
                "resumed",
                checkpoint=str(self.resumed_from),
                layout=self.topology.layout,
                read_seconds=round(max(r["seconds"] for r in read), 3),
                read_over_share=round(max(r["bytes"] / max(r["share_bytes"], 1) for r in read), 3),
            )
            logger.log_raw({"step": self.step, "event": "resume_read", "per_rank": read})
        logger.log_raw({"step": self.step, "event": "memory", "per_rank": [m for m, _ in memory]})
        if self.topology.rank == 0:
            log.info(
                "%.1fM parameters, %s, %d training samples, steps %d -> %d; rank 0 holds %s",
                parameter_count(self.config.model) / 1e6,
                self.topology.layout,
                len(self.train_data),
                self.step,
                stop,
                ", ".join(
                    f"{key.removesuffix('_bytes').replace('_', ' ')} {value / 2**20:.1f} MiB"
                    for key, value in self.memory.items()
                    if value  # no separate master weights where the parameters are fp32
                ),
            )
        record: dict = {}
        if self.stop_request.agreed(self.topology.host_group, "the stop agreement before the first step"):
            # a signal during start-up (which can take minutes: a large checkpoint to read): nothing
            # was trained since the last checkpoint, so there is nothing to save
            signal_name = self.stop_request.signal_name or "on another rank"
            logger.event(self.step, "preempted", signal=signal_name, before_first_step=True)
            if self.topology.rank == 0:
                log.warning(
                    "%s during start-up: the run stops before its first step, with nothing to save", signal_name
                )
            stop = self.step
        while self.step < stop:
            record = self.train_step()
            step = self.step
            if self.sdc is not None and self._check_sdc(record, logger):
                continue
            if self.spike_guard.observe(record["loss"]):
                logger.log(record)
                self._spike_rollback(logger)
                continue
            eval_due = (train.eval_interval and step % train.eval_interval == 0) or step == train.steps
            if eval_due:
                record.update(self.validate())
            if eval_due or step % train.log_interval == 0 or step == stop:
                logger.log(record)
            preempted = self.stop_request.agreed(self.topology.host_group, f"the stop agreement after step {step}")
            if (train.save_interval and step % train.save_interval == 0) or step == stop or preempted:
                path = self.save()
                logger.event(step, "checkpoint", path=str(path), **self.checkpoints.last)
            if preempted:
                logger.event(step, "preempted", signal=self.stop_request.signal_name or "on another rank")
                break
        else:
            if stop == train.stop_at < train.steps:
                logger.event(self.step, "stopped", reason=f"train.stop_at = {train.stop_at}")
        self.checkpoints.wait()  # a background save in flight is published before the run ends
        logger.finish()
        with peers.watched("the end of the run", self.topology.host_group):
            dist.barrier(group=self.topology.host_group)
        return record

    def validate(self) -> dict:
        """val_loss, val_ppl and the train.eval_tasks' results; when a signal asks every rank to stop
        meanwhile, what was not done is left out (and said), and the run goes on to checkpoint."""
        results: dict = {}
        try:
            loss = validation_loss(self.engine, self.valid_batches, self.config.train, self.stop_request)
            results.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
            results.update(self.evaluate_tasks())
        except Stopped as stopped:
            if self.topology.rank == 0:
                log.warning(
                    "%s: the validation of step %d is cut short (%s not logged); the step is checkpointed and the run "
                    "stops",
                    stopped,
                    self.step,
                    "its tasks are" if results else "it is",
                )
        return results

    def _roll_back(self, logger: MetricsLogger, skip_data: bool) -> tuple[str, list[int] | None]:
        """Reloads the last checkpoint and, with `skip_data`, skips the samples seen since it
        (recorded in the sampler state, so the skip survives later resumes); without, its batches
        are replayed. Returns the checkpoint's name and the skipped range."""
        self.checkpoints.wait()
        candidates = self.checkpoints.candidates()
        if not candidates:
            raise TrainingError(
                f"step {self.step} needs a rollback and there is no checkpoint to roll back to: stopping"
            )
        seen_until = self.sampler.consumed_samples
        last = self._restore(candidates)
        logger.restart_at(self.step)  # the steps since the checkpoint are redone: logged once, anew
        if not skip_data:
            return last.name, None
        skipped = [self.sampler.consumed_samples, seen_until]
        self.sampler.skip(*skipped)
        return last.name, skipped

    def _spike_rollback(self, logger: MetricsLogger) -> None:
        """train.spike_guard's rollback: to the last checkpoint, skipping the data seen since it."""
        guard = self.spike_guard
        if guard.rollbacks >= guard.config.max_rollbacks:
            raise TrainingError(
                f"the loss spiked at step {self.step} (above {guard.config.factor} x the running "
                f"median for {guard.config.consecutive} steps) after {guard.rollbacks} rollbacks "
                f"(train.spike_guard.max_rollbacks = {guard.config.max_rollbacks}): stopping"
            )
        spiked_at = self.step
        checkpoint, skipped = self._roll_back(logger, skip_data=True)
        guard.rolled_back()
        logger.event(
            self.step,
            "rollback",
            spike_step=spiked_at,
            checkpoint=checkpoint,
            skipped_samples=skipped,
            rollbacks=guard.rollbacks,
        )

    def _check_sdc(self, record: dict, logger: MetricsLogger) -> bool:
        """train.sdc_check after a step (docs/sdc.md): the update bound's verdict (its largest
        |update| / lr goes into the record as update_ratio) and, when due (every
        fingerprint_interval steps and before every scheduled checkpoint), the replicas'. A finding
        is logged and acted on as train.sdc_check.action says; True when the run rolled back."""
        train, step = self.config.train, self.step
        config, check = train.sdc_check, self.sdc
        interval = config.fingerprint_interval
        saves = (train.save_interval and step % train.save_interval == 0) or step == (train.stop_at or train.steps)
        found = check.after_step(fingerprint=interval > 0 and (step % interval == 0 or saves))
        if found.update_ratio is not None:
            record["update_ratio"] = found.update_ratio
        if not found:
            return False
        what = f"silent data corruption at step {step}: {found.describe()}"
        said = {"violations": found.violations, "disagreements": found.disagreements}
        if config.action == "skip":
            action = "stop" if found.disagreements else "held"
            logger.log_raw({"step": step, "event": "sdc", "action": action, **said})
            if action == "stop":
                logger.log(record)  # the step was taken
                raise TrainingError(
                    f"{what}. Replicas that disagree cannot be skipped: stopping (train.sdc_check.action = "
                    "'rollback' restores the last checkpoint instead)"
                )
            if self.topology.rank == 0:
                log.warning("%s; those coordinates were not applied and their m and s restart from zero", what)
            return False
        if check.rollbacks >= config.max_rollbacks:
            logger.log_raw({"step": step, "event": "sdc", "action": "stop", **said})
            logger.log(record)
            raise TrainingError(
                f"{what}, after {check.rollbacks} rollbacks (train.sdc_check.max_rollbacks = "
                f"{config.max_rollbacks}): stopping"
            )
        if self.topology.rank == 0:
            log.warning("%s; rolling back to the last checkpoint", what)
        logger.log(record)
        checkpoint, _ = self._roll_back(logger, skip_data=False)  # the data is not to blame: replayed
        check.rollbacks += 1
        # logged at the checkpoint's step, which the steps after it (and what they logged) now follow
        logger.log_raw(
            {"step": self.step, "event": "rollback", "sdc_step": step, "checkpoint": checkpoint}
            | {"rollbacks": check.rollbacks, **said}
        )
        return True


class TrainingError(PanguError, RuntimeError):
    """Training cannot go on (e.g. the loss keeps spiking after every allowed rollback)."""


class SpikeGuard:
    """Watches the loss: `observe` says when the run must roll back (see SpikeGuardConfig).
    Every rank sees the same loss (the engine broadcasts it), so all ranks decide alike."""

    def __init__(self, config: SpikeGuardConfig):
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)
        self.streak = 0
        self.rollbacks = 0

    def observe(self, loss: float) -> bool:
        if not self.config.enabled:
            return False
        full = len(self.history) == self.config.window
        if math.isfinite(loss) and not (full and loss > self.config.factor * statistics.median(self.history)):
            self.history.append(loss)
            self.streak = 0
            return False
        self.streak += 1  # a spike, or a non-finite loss
        return self.streak >= self.config.consecutive and full

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.streak = 0


def pretrain(config: Config) -> dict:
    """`pangu pretrain`: trains (resuming if a checkpoint exists); returns the last metrics record."""
    return Trainer(config).run()


def validation_batches(train, samples: int) -> int:
    """train.eval_batches, but at most one pass over a validation set of `samples` samples."""
    return min(train.eval_batches, -(-samples // train.global_batch_size))


def validation_loss(engine: Engine, batches: Batches, train, stop: StopRequest | None = None) -> float:
    """Mean token loss over the first `train.eval_batches` global batches of the validation set, at
    most one pass over it (the last batch wraps around to the set's start to fill up). With `stop`,
    the ranks agree before each batch whether to go on (Stopped when a signal asked to stop). Rank 0
    says how far it is every PROGRESS_EVERY_S."""
    size = train.global_batch_size
    count = validation_batches(train, len(batches.dataset))
    total = 0.0
    started = last = time.monotonic()
    for k in range(count):
        if stop is not None:
            stop.check(batches.topology.host_group, f"validation (batch {k + 1} of {count})")
        ids = (np.arange(k * size, (k + 1) * size) % len(batches.dataset)).astype(np.int64)
        total += engine.evaluate(*batches.for_step(ids))
        now = time.monotonic()
        if batches.topology.rank == 0 and now - last >= PROGRESS_EVERY_S and k + 1 < count:
            left = (now - started) / (k + 1) * (count - k - 1)
            log.info("validation: batch %d of %d, %.0f s left", k + 1, count, left)
            last = now
    return total / count
