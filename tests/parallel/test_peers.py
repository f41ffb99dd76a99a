"""Waiting for other ranks (pangu/parallel/peers.py): a rank at the rendezvous says whom it waits
for, ends at once on SIGTERM or Ctrl-C, and names the absent when it gives up; prepare's ranks wait
for each other the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pangu.parallel.topology import free_port
from tests.helpers import subprocess_env

pytestmark = [pytest.mark.slow]


class Rank:
    """`python -c CODE` as rank RANK of WORLD (environment as torchrun sets it), stderr read as it comes."""

    def __init__(self, code: str, rank: int, world: int, port: int, *args: str):
        env = dict(
            subprocess_env(),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.process.kill()
                pytest.fail(f"no line with {text!r} within {timeout} s: {self.lines[-20:]}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> int:
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"still running {timeout} s later: {self.lines[-20:]}")
        self._reader.join(5)
        return status


PRETRAIN = "import sys\nfrom pangu.cli import main\nsys.exit(main(['pretrain', '--config', 'tiny', *sys.argv[1:]]))"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_rank_waiting_for_absent_ranks_says_so_and_stops_at_once(tmp_path, signum):
    port = free_port()
    rank = Rank(PRETRAIN, 0, 3, port, "--set", f"train.output_dir={tmp_path / 'run'}")
    rank.wait_for_line(f"rank 0: waiting for 2 of 3 ranks at 127.0.0.1:{port} (absent: ranks 1, 2)")
    signalled = time.monotonic()
    rank.process.send_signal(signum)
    assert rank.finish(timeout=20) == 130
    assert time.monotonic() - signalled < 10
    name = signal.Signals(signum).name
    assert (
        rank.lines[-1] == f"pangu pretrain: interrupted ({name} at the rendezvous at 127.0.0.1:{port}, before any work)"
    )
    assert not (tmp_path / "run").exists()


def test_a_rank_that_gives_up_names_the_absent(tmp_path):
    """Rank 1 without rank 0 waits for the job's store; rank 0 without the others waits for them;
    after parallel.timeout_minutes each ends with one line, exit status 1."""
    port = free_port()
    short = ["--set", "parallel.timeout_minutes=0.05", "--set", f"train.output_dir={tmp_path / 'run'}"]
    alone = Rank(PRETRAIN, 1, 2, port, *short)
    assert alone.finish(timeout=90) == 1
    assert alone.lines[-1] == (
        f"pangu pretrain: error: rank 1 gave up waiting for the job's store at 127.0.0.1:{port} (held by rank 0) "
        "after parallel.timeout_minutes = 0.05: is every rank running, and can it reach this one? Look at the other "
        "ranks' logs, then start the job again"
    )
    first = Rank(PRETRAIN, 0, 3, port, *short)
    assert first.finish(timeout=90) == 1
    assert first.lines[-1].startswith(
        f"pangu pretrain: error: rank 0 gave up waiting for 2 of 3 ranks at 127.0.0.1:{port} (absent: ranks 1, 2) "
        "after parallel.timeout_minutes = 0.05"
    )
    assert not any("Traceback" in line for line in alone.lines + first.lines)


# prepare's ranks (pangu/commands/prepare.py: GlooGroup): rank 1 never comes to the first exchange
PREPARE_RANK = """
import os, signal, sys, time
from pangu.cli import configure_output
from pangu.commands.prepare import GlooGroup
from pangu.schema import PanguError
configure_output(1)  # -v: the waiting lines
signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
group = GlooGroup(float(sys.argv[1]))
if group.rank == 1:
    time.sleep(120)
try:
    group.gather("rank 0's pieces")
except PanguError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(err.exit_status)
except KeyboardInterrupt as err:
    print(f"interrupted: {err}", file=sys.stderr)
    sys.exit(130)
"""


def test_prepares_ranks_wait_for_each_other_stoppably_and_name_the_absent():
    port = free_port()
    waiting, absent = Rank(PREPARE_RANK, 0, 2, port, "0.05"), Rank(PREPARE_RANK, 1, 2, port, "0.05")
    try:
        assert waiting.finish(timeout=90) == 1
        assert waiting.lines[-1].startswith(
            "error: rank 0 gave up waiting for rank 1 at step 1 of prepare's exchanges after data.timeout_minutes = "
            "0.05"
        ), waiting.lines[-10:]
    finally:
        absent.process.kill()
    port = free_port()
    waiting, absent = Rank(PREPARE_RANK, 0, 2, port, "10"), Rank(PREPARE_RANK, 1, 2, port, "10")
    try:
        waiting.wait_for_line("rank 0: waiting for rank 1 at step 1 of prepare's exchanges")
        signalled = time.monotonic()
        os.kill(waiting.process.pid, signal.SIGTERM)
        assert waiting.finish(timeout=20) == 130 and time.monotonic() - signalled < 5
        assert waiting.lines[-1] == "interrupted: SIGTERM", waiting.lines[-10:]
    finally:
        absent.process.kill()
