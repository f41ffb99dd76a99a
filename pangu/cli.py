"""The `pangu` command: prepare | pretrain | evaluate | generate | convert | plot | plan | checkpoint.
Each verb lives in pangu/commands/; this module builds the parser and turns the errors a user can
cause into one line on stderr (exit status 2; an interruption 130, the environment refusing a
file operation, or the job's ranks failing to meet, 1). With -v the traceback follows, for a bug report."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from pangu.commands import COMMANDS
from pangu.files import write_atomic
from pangu.schema import PanguError

# What third-party code prints or warns at every run that says nothing to a pangu user; shown
# with -v. (DeepSpeed's own stdout prints are routed to the debug log by pangu.parallel.)
NOISY_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # megatron-core on a machine without them
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # DeepSpeed's ZeRO on torch 2.13
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu", description=__doc__.splitlines()[0])
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=0,
        help="also show debug lines, and the warnings of pangu's dependencies",
    )
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        help="show only warnings and errors (no progress)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, not when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one of pangu's lines (the source line Python would print says nothing to a user)."""
    logging.getLogger("pangu").warning("warning: %s", message)


def configure_output(verbosity: int) -> None:
    """pangu's lines on stderr ("[pangu] ..."), at INFO (-q: WARNING, -v: DEBUG); results alone on
    stdout; the dependencies' noise filtered unless -v."""
    logger = logging.getLogger("pangu")
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[pangu] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    warnings.showwarning = _show_warning if verbosity < 1 else _PYTHON_SHOWWARNING
    if verbosity < 1:
        for message in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        # DeepSpeed's logger (created when deepspeed is imported, writing to stdout): errors only
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


def _interrupted(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbosity)
    # SIGTERM (Slurm's preemption, `kill`) and SIGUSR1 end a command as Ctrl-C does; training
    # replaces these handlers with its own, which checkpoint before stopping
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupted)
    log = logging.getLogger("pangu")
    joined_before = _process_group() is not None
    _LEFT_PROCESS_GROUP.clear()
    try:
        return COMMANDS[args.command].run(args)
    except PanguError as err:
        log.debug("the traceback, for a bug report:", exc_info=True)
        line = f"pangu {args.command}: error: {err}"
        print(line, file=sys.stderr)
        return _exit_status(err, line)
    except KeyboardInterrupt as err:  # a second Ctrl-C, or one in a command without a graceful stop
        log.debug("the traceback, for a bug report:", exc_info=True)
        print(f"pangu {args.command}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno is None:  # not the environment refusing a file operation: a bug, with its traceback
            raise
        log.debug("the traceback, for a bug report:", exc_info=True)
        where = f" ({err.filename})" if err.filename else ""
        print(f"pangu {args.command}: error: {err.strerror}{where}", file=sys.stderr)
        return 1
    finally:
        # the process group the command joined ends with it: a process that exits with gloo
        # groups open can abort in their threads' teardown ("terminate called without an active
        # exception", exit status 1) after all its work is done
        dist = _process_group()
        if dist is not None and not joined_before:
            dist.destroy_process_group()
            _LEFT_PROCESS_GROUP.append(True)


_LEFT_PROCESS_GROUP: list[bool] = []  # the last command joined a process group and left it


def entry(argv: list[str] | None = None) -> None:
    """The `pangu` command: `main`, then the process ends with its exit status. A process whose
    command used torch.distributed ends without the interpreter's teardown (`os._exit`, after
    flushing what it wrote): gloo's worker threads can still hold tensors then, and destroying them
    while the interpreter finalises aborts the process ("terminate called without an active
    exception", pytorch/pytorch#190489), turning a command that finished into a failed worker that
    torchrun restarts."""
    code = main(argv)
    if _LEFT_PROCESS_GROUP:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


USER_ERROR_HOLD_S = 60.0  # how long a launched worker waits for its launcher to end the job


def _exit_status(err: PanguError, line: str) -> int:
    """err.exit_status. But torchrun restarts a worker group whenever a worker fails, and a user's
    error (status 2: a bad value, a damaged file) fails the same way every time: where the launcher
    asks for it (PANGU_USER_ERROR_DIR, set by launch/torchrun.sh and launch/slurm.sbatch), the worker
    leaves its line there and holds until the launcher, which watches the directory, ends the job
    (so no worker of it ever fails, and no peer loses the store it still needs); a worker not ended
    within USER_ERROR_HOLD_S exits with the status."""
    errors = os.environ.get("PANGU_USER_ERROR_DIR")
    if err.exit_status != 2 or not errors or "TORCHELASTIC_RUN_ID" not in os.environ:
        return err.exit_status
    try:
        Path(errors).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(errors) / f"rank{int(os.environ.get('RANK', '0')):05d}", (line + "\n").encode())
    except OSError:
        return err.exit_status
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):  # training's graceful handlers would only set a flag
        signal.signal(getattr(signal, name), _interrupted)
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(USER_ERROR_HOLD_S)
    return err.exit_status


def _process_group():
    """torch.distributed if this process has joined a process group (torch is not imported here)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


if __name__ == "__main__":
    sys.exit(main())
