"""A real single-host Slurm cluster for tests: munged, slurmctld and slurmd on this machine, all state in a
temporary folder, the client commands pointed at it with SLURM_CONF.

Debian's slurm-wlm 22.05 and munge (installed by `make system-deps`); the daemons run as root, as
slurmd must to start job steps. Process tracking by /proc parentage (proctrack/linuxproc) and no task
plugin, so no cgroups are needed: the cluster runs inside a container.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from helpers.servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why no cluster can run here (None when one can)."""
    absent = [d for d in (*DAEMONS, "munge", "sbatch") if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"needs Slurm and munge (apt-get install slurm-wlm munge; make system-deps): {', '.join(absent)} not found"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One node (this host) with `cpus` CPUs in partition `debug`; `env` points the Slurm commands at it."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text("\n".join([
            "ClusterName=vlmft-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides",  # the node below, whatever the hardware says
            "KillWait=5",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen([_exe(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self, timeout: float = 30) -> SlurmCluster:
        self._write_config()
        m = self.root / "munge"
        self._start("munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={m / 'munge.key'}",
                    f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}")
        self._wait(lambda: self.socket.exists(), "munged", timeout)
        self._start("slurmctld", "-D", "-i")
        self._start("slurmd", "-D")
        self._wait(self._node_idle, "slurmctld + slurmd", timeout)
        return self

    def _node_idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return res.returncode == 0 and res.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))
                self.stop()
                raise RuntimeError(f"{what} did not start (exited: {dead}); logs:\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job still there (a failed test's), wait until they have ended, then stop the daemons by
        PID: slurmd first, munged last."""
        if "slurmctld" in self.procs:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True)
            deadline = time.time() + 30
            while time.time() < deadline:
                res = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
