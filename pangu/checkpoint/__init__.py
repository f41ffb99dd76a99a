"""pangu's checkpoints: the format (format.py), the tensor store under it (store.py), training
checkpoints saved and loaded by every rank (training.py, with DeepSpeed's optimizer internals
behind deepspeed_state.py), and weights-only checkpoints for one process (weights.py)."""
