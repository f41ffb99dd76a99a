"""A real Slurm cluster on this machine, for tests: Debian's slurmctld, two slurmd and munged.

Everything lives in a private directory (config, state, spool, logs, munge key and socket) and
is reached through the SLURM_CONF variable of `SlurmCluster.env`; nothing under /etc is read or
written except one line in /etc/hosts naming the nodes (127.0.0.1), which is left in place. The
daemons run in the foreground as children of this process (no systemd) and `stop()` ends exactly
those PIDs. Debian builds Slurm with multiple-slurmd support, so `slurmd -N n1` and `slurmd -N n2`
on two ports are two nodes, each with all of this machine's CPUs.

    reason = ensure_slurm()          # None, or why Slurm cannot be had (tests skip with it)
    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["--nodes=2", "script.sbatch"], env=...)
        cluster.wait_for(lambda: cluster.state(job) == "COMPLETED")
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")
HOSTS_MARK = "# pangu tests/training/slurm_cluster.py"


def ensure_slurm() -> str | None:
    """Installs Debian's Slurm and munge when missing; returns None, or why they cannot be had."""
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root (and names its nodes in /etc/hosts): not root"
    if all(shutil.which(command) for command in COMMANDS):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # wait for a concurrent apt/dpkg instead of failing
    for command in (
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            return f"Slurm is not installed and `{' '.join(command)}` timed out"
        if done.returncode != 0:
            return (
                f"Slurm is not installed and `{' '.join(command)}` failed "
                f"(exit {done.returncode}): {(done.stdout + done.stderr)[-1500:]}"
            )
    missing = [command for command in COMMANDS if not shutil.which(command)]
    return f"installed {' '.join(PACKAGES)} but {missing} are still missing" if missing else None


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (held open together so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """A controller and `nodes` slurmd daemons with a private configuration under `root`."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2")):
        self.root = Path(root)
        self.nodes = nodes
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{node}" for node in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._add_hosts()
        self._start_munge()
        self._write_config()
        self._daemons.append(("slurmctld", self._spawn(["slurmctld", "-D", "-i"], "slurmctld")))
        for node in self.nodes:
            self._daemons.append((f"slurmd {node}", self._spawn(["slurmd", "-D", "-N", node], f"slurmd-{node}")))
        self.wait_for(self._nodes_idle, timeout, "the nodes to come up idle")

    def stop(self) -> None:
        """Ends the jobs still there (through Slurm, so that their processes go too), then the
        daemons this object started (by PID)."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
            for signal_args in ([], ["--signal=KILL", "--full"]):  # cancel; then kill what lingers
                jobs = self._jobs()
                if not jobs:
                    break
                self.run(["scancel", *signal_args, *jobs], check=False)
                try:
                    self.wait_for(lambda: not self._jobs(), 45, "the cancelled jobs to end", interval=0.5)
                except SlurmError:
                    pass
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self._daemons):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._daemons.clear()

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen:
        # Own session: a Ctrl-C meant for pytest does not reach the daemons; stop() ends them.
        with open(self.root / "log" / f"{log_name}.out", "ab") as log:
            proc = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise SlurmError(f"{' '.join(command)} exited with {proc.returncode}: {self.logs(log_name)}")
        return proc

    def _add_hosts(self) -> None:
        """The node names must resolve (torchrun's rendezvous endpoint is the first node)."""
        missing = []
        for node in self.nodes:
            try:
                socket.gethostbyname(node)
            except OSError:
                missing.append(node)
        if missing:
            with open("/etc/hosts", "a", encoding="utf-8") as hosts:  # in place: may be a bind mount
                hosts.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemons.append(
            (
                "munged",
                self._spawn(
                    [
                        "munged",
                        "--foreground",
                        "--force",
                        f"--key-file={key}",
                        f"--socket={self.munge_socket}",
                        f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                        f"--seed-file={self.root / 'munge' / 'seed'}",
                        f"--log-file={self.root / 'log' / 'munged.log'}",
                    ],
                    "munged",
                ),
            )
        )
        self.wait_for(self.munge_socket.exists, 10, "munged's socket")

    def _write_config(self) -> None:
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", hardware.splitlines()[0]))
        node_hardware = " ".join(
            f"{key}={fields[key]}"
            for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
            if key in fields
        )
        controller_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        root = self.root
        lines = [
            "ClusterName=pangutest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={controller_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Credentials expire after 10 s instead of 120: a requeued job waits for that long.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'spool' / '%n' / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: processes are tracked by their parentage, tasks are not confined.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobRequeue=1",
            "ReturnToService=2",
            # Finished jobs leave slurmctld's memory after 5 s and the scheduler runs every 2 s:
            # otherwise a requeued job waits minutes. The job completion log keeps every end.
            "MinJobAge=5",
            "SchedulerParameters=sched_interval=2",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "KillWait=30",
            "InactiveLimit=0",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {node_hardware} State=UNKNOWN"
            )
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- using it -----------------------------------------------------------------------------

    def run(
        self,
        command: list[str],
        check: bool = True,
        env: dict | None = None,
        cwd: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command,
            env={**(env or self.env), "SLURM_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
        if check and done.returncode != 0:
            raise SlurmError(f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        done = self.run(["sbatch", "--parsable", *args], check=False, env=env, cwd=cwd)
        if done.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str] | None:
        """`scontrol show job` as a dict, or None once slurmctld forgot the job (MinJobAge)."""
        done = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if done.returncode != 0:
            return None
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def state(self, job_id: int) -> str | None:
        job = self.job(job_id)
        return job["JobState"] if job else None

    def completions(self, job_id: int) -> list[dict[str, str]]:
        """The job completion log's records of this job, one per run that ended (requeues too)."""
        if not self.jobcomp.exists():
            return []
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]
        return [record for record in records if record.get("JobId") == str(job_id)]

    def wait_for(
        self, condition: Callable[[], object], timeout: float, what: str = "a condition", interval: float = 0.2
    ):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    def _jobs(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def _nodes_idle(self) -> bool:
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def logs(self, *names: str, tail: int = 3000) -> str:
        """The tails of the daemons' logs (all of them without names), for failure messages."""
        paths = sorted((self.root / "log").glob("*"))
        if names:
            paths = [path for path in paths if any(path.name.startswith(name) for name in names)]
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}" for path in paths)
