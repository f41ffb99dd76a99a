"""Run under torchrun by tests/evaluation/test_evaluation.py: evaluates task sets through the pipeline
engine, one layout after another in the same job (each JSON argument is one `pangu evaluate`
command line; the layout comes from its --set parallel.tp/pp), so that the processes start once.

    torchrun --standalone --nproc-per-node W tests/probes/evaluation_probe.py '["--config", ...]' ...
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from pangu.cli import main

if __name__ == "__main__":
    for argument in sys.argv[1:]:
        if main(["evaluate", *json.loads(argument)]) != 0:
            sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown after gloo (see pangu.cli.entry)
