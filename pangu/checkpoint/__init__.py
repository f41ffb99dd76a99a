"""pangu's checkpoints (docs/checkpoints.md): the format (format.py), the piece store under it
(store.py), training checkpoints every rank saves and loads its own share of (training.py, with
DeepSpeed's optimizer internals behind deepspeed_state.py), a run's checkpoints as the trainer uses
them, background saves included (saver.py), weights-only checkpoints for one process
(weights.py), and the offline verify / info / upgrade tools (verify.py)."""
