"""A run's checkpoints as the trainer sees them: resume from the newest intact one, start from
another run's weights, save on the training thread or in the background (train.async_save).

Background save: the save captures the small state at once (trainer state, optimizer scalars,
loss scale) and returns; a daemon thread copies the rank's fp32 buffers (master weights and
optimizer state) into host buffers (pinned on a GPU, reused from save to save) and
writes them. The forward and backward passes of the next step run meanwhile; only its optimizer
step, the one place these partitions change, waits for the copy to be done. The background
threads of all ranks agree on a gloo group of their own and rank 0 publishes once every rank has
written. At most one save is in flight: the next save, a rollback, preemption and the end of the
run wait for it (`wait`), and a failed background save raises there, on every rank alike. A
process that dies mid-write leaves only a temporary directory: the previous checkpoint stays in
use.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from pangu.checkpoint import format as fmt
from pangu.checkpoint.training import (
    Prefetch,
    checkpoint_candidates,
    checkpoint_group,
    load_checkpoint,
    resume,
    save_request,
    write_checkpoint,
)
from pangu.config import Config
from pangu.parallel.engine import Engine
from pangu.parallel.topology import Topology


class Checkpointer:
    def __init__(self, run_dir: str | Path, config: Config, topology: Topology):
        self.run_dir = Path(run_dir)
        self.config = config
        self.topology = topology
        self.async_save = config.train.async_save
        self.group = checkpoint_group()
        # the last save: blocked_s (the save call), step_wait_s (the next optimizer step waiting for
        # the copy), copy_s and write_s (the background thread's copy, and copy + write)
        self.last: dict = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host: list[dict[str, torch.Tensor]] | None = None
        self._copied: threading.Event | None = None
        self._hooked: list = []  # engines whose optimizer step waits for the copy
        self._prefetch: Prefetch | None = None

    def candidates(self) -> list[Path]:
        """Structurally intact checkpoints of the run, newest first (rank 0 looks: O(files))."""
        return checkpoint_candidates(self.run_dir)

    def prefetch(self, path: Path) -> None:
        """Starts reading this rank's share of checkpoint `path` in the background (while the
        engine is built); the next `restore` uses it."""
        self._prefetch = Prefetch(path, self.topology)

    def restore(self, engine: Engine, candidates: list[Path] | None = None) -> tuple[Path, dict] | None:
        """(checkpoint, trainer state) of the newest checkpoint that loads, or None for a fresh run."""
        self.wait()
        candidates = self.candidates() if candidates is None else candidates
        prefetch, self._prefetch = self._prefetch, None
        return resume(candidates, engine, self.topology, self.config, prefetch) if candidates else None

    def weights_source(self, source: str | Path) -> Path:
        """The checkpoint train.init_from names, checked (its structure, and a model of this run's
        shapes) before anything is built for it."""
        path = fmt.resolve(source)
        fmt.check_model_matches(fmt.check_structure(path), self.config.model, path)
        return path

    def load_weights(self, source: str | Path, engine: Engine) -> Path:
        """Only the weights of any checkpoint (train.init_from), read where this rank owns them."""
        path = self.weights_source(source)
        load_checkpoint(path, engine, self.topology, self.config, weights_only=True)
        return path

    def save(self, step: int, engine: Engine, trainer_state: dict, tokenizer: bytes | None) -> Path:
        """Checkpoint `step`: written before returning, or (async_save) in the background. Returns
        the checkpoint's directory (published on return, or when the background write is done).
        `tokenizer`: the model file the run trains with, which the checkpoint carries."""
        self.wait()
        start = time.perf_counter()
        if not self.async_save:
            request = save_request(self.run_dir, step, engine, self.topology, self.config, trainer_state, tokenizer)
            path = write_checkpoint(request, self.group)
            self.last = {"blocked_s": time.perf_counter() - start, "async": False}
            return path
        engine.create_optimizer_state()
        live = engine.checkpoint_buffers()
        request = save_request(
            self.run_dir,
            step,
            engine,
            self.topology,
            self.config,
            trainer_state,
            tokenizer,
            snapshot=self._host_buffers(live, engine),
        )
        self._copied = threading.Event()
        self.last = {"blocked_s": time.perf_counter() - start, "async": True, "step_wait_s": 0.0}
        self._thread = threading.Thread(
            target=self._copy_and_write, args=(live, request), name="pangu-checkpoint", daemon=True
        )
        self._thread.start()
        return request.final

    def _copy_and_write(self, live: list[dict[str, torch.Tensor]], request) -> None:
        start = time.perf_counter()
        try:
            try:
                for host, part in zip(self._host, live):
                    for key, tensor in part.items():
                        host[key].copy_(tensor)
            finally:
                self._copied.set()
            self.last["copy_s"] = time.perf_counter() - start
            write_checkpoint(request, self.group)
        except BaseException as err:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = err
        self.last["write_s"] = time.perf_counter() - start

    def _before_step(self) -> None:
        """Holds an optimizer step until the background copy of the state it changes is done."""
        if self._copied is not None and not self._copied.is_set():
            start = time.perf_counter()
            self._copied.wait()
            self.last["step_wait_s"] = self.last.get("step_wait_s", 0.0) + time.perf_counter() - start

    def wait(self) -> None:
        """Waits for the save in flight; raises its error (CheckpointError on every rank alike)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _host_buffers(self, live: list[dict[str, torch.Tensor]], engine) -> list[dict[str, torch.Tensor]]:
        """Host buffers shaped like this rank's fp32 partitions (allocated once, reused)."""
        shapes = [{k: (t.shape, t.dtype) for k, t in part.items()} for part in live]
        if self._host is None or [{k: (t.shape, t.dtype) for k, t in p.items()} for p in self._host] != shapes:
            pinned = torch.cuda.is_available()
            self._host = [
                {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for k, t in part.items()} for part in live
            ]
        if engine not in self._hooked:
            engine.before_optimizer_step(self._before_step)
            self._hooked.append(engine)
        return self._host
