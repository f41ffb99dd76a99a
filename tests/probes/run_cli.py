"""`python tests/probes/run_cli.py MODULE[,MODULE...] PANGU-ARGS...`: imports the modules (say, one
that registers a test optimizer), then runs the `pangu` command; also under torchrun."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests.` modules

for module in sys.argv[1].split(","):
    importlib.import_module(module)

from pangu.cli import entry  # noqa: E402  (after the plugins registered themselves)

entry(sys.argv[2:])
