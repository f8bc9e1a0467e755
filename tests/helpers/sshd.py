"""A real sshd on a loopback port, so a hostfile launch reaches "other nodes" that are names of this machine.

Keys (host and user) are generated in the test's folder, the daemon runs with its own sshd_config in
the foreground and is stopped by its PID. `ssh_env()` is what pdsh (and the task's own ssh calls) need
to log in with the generated key: `PDSH_SSH_ARGS_APPEND`.

Without a shared folder every node has a disk of its own. Here both "nodes" are this machine, so
node 1 is given one: the daemon's ForceCommand runs node 1's launcher (pdsh's command line carries
`--node_rank=1`) in a mount namespace of its own where each folder listed in `binds` is replaced by
`node1_root/<folder>`. Everything else (the ssh checks, the clean-up) runs as asked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from helpers.servers import free_port

NODE1_WRAPPER = """#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
  *--node_rank=1\\ *)
    exec unshare -m sh -c 'while read -r d; do mkdir -p "{root}$d" "$d" && mount --bind "{root}$d" "$d" || exit 97; done < "{binds}"; exec sh -c "$SSH_ORIGINAL_COMMAND"' ;;
  "") exec sh ;;
  *) exec sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"""


def missing_tools() -> list[str]:
    """The system commands these tests need that are not installed (`make system-deps` installs them)."""
    return [t for t in ("sshd", "ssh", "ssh-keygen", "pdsh", "unshare") if shutil.which(t, path=os.environ.get("PATH", "")
                                                                                       + ":/usr/sbin:/sbin") is None]


class Sshd:
    """sshd on 127.0.0.1:port accepting this user with a generated key."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.key = folder / "id_ed25519"
        self.binds = folder / "binds"  # folders node 1 sees from its own disk, one per line
        self.node1_root = folder / "node1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sshd:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        for key in (f / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.key}.pub", f / "authorized_keys")
        self.binds.write_text("")
        wrapper = f / "node_wrapper.sh"
        wrapper.write_text(NODE1_WRAPPER.format(root=self.node1_root, binds=self.binds))
        wrapper.chmod(0o755)
        (f / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {f / 'host_key'}\nPidFile {f / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {f / 'authorized_keys'}\nStrictModes no\nPermitRootLogin yes\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"ForceCommand {wrapper}\nLogLevel ERROR\nMaxStartups 100\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder
        sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin") or "sshd"
        self.proc = subprocess.Popen([sshd, "-D", "-f", str(f / "sshd_config"), "-E", str(f / "sshd.log")],
                                     start_new_session=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            res = subprocess.run(["ssh", *self.ssh_args(), "-p", str(self.port), "127.0.0.1", "true"],
                                 capture_output=True, timeout=20)
            if res.returncode == 0:
                return self
            assert self.proc.poll() is None, (f / "sshd.log").read_text()
            time.sleep(0.2)
        raise RuntimeError(f"sshd did not accept logins: {res.stderr.decode()} {(f / 'sshd.log').read_text()}")

    def ssh_args(self) -> list[str]:
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes"]

    def ssh_env(self) -> dict[str, str]:
        return {"PDSH_SSH_ARGS_APPEND": " ".join(self.ssh_args())}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
