"""Several nodes from one process: DeepSpeed's hostfile runner over SSH, and stopping it everywhere.

A Prefect deployment is one flow run on one worker, so the worker's node (a cluster's head or login
node) must start, watch and stop the whole job. `train.launcher=deepspeed` with `train.hostfile`
does it with DeepSpeed's own runner (`python -m deepspeed.launcher.runner --hostfile ...`), which
starts `deepspeed.launcher.launch` on every node through pdsh (ssh) and streams each node's output
back with a `host: ` prefix. What that runner does not do, done here:

* The hostfile is checked before anything starts, with errors naming the line (DeepSpeed's own
  parser names neither line nor fix), and written into the run folder for the runner (the config
  may hold it as a list of lines, e.g. from the deployment's run form).
* The environment of the remote ranks: pdsh runs a bare ssh command, and DeepSpeed forwards only a
  few variables (PYTHON*, ...) plus the `KEY=VALUE` lines of a `.deepspeed_env` file, which
  `DS_ENV_FILE` points at the run folder's copy. It carries the thread settings, the storage
  credentials (AWS_*) and the run config itself (base64), because without a shared folder the
  other nodes cannot read the head node's `run.json`.
* Stopping: ssh does not forward signals, and the runner answers SIGTERM by running
  `pkill -f "python -u -m deepspeed.launcher.launch"` on every host, which ends every DeepSpeed job
  there, not only this one. So the runner is SIGKILLed, and every node is cleaned over ssh by a
  marker unique to this launch (`--vlmft_launch=ID` on the training command line, so on the runner,
  pdsh, the remote shell, the node launcher and every rank): SIGTERM, a grace period, then SIGKILL
  of the marked processes and of the sessions they run in (their DataLoader workers included).

SSH settings: `train.ssh_port`, and otherwise the worker user's ~/.ssh/config or `PDSH_SSH_ARGS_APPEND`
(pdsh adds it to every ssh it runs; the checks and the clean-up here add it too).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections import OrderedDict
from pathlib import Path

from vlm_core.config import ConfigError, FinetuneConfig

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")  # DeepSpeed's hostfile line, nothing after the slots
MARKER_ARG = "--vlmft_launch"
CONFIG_ENV = "VLMFT_RUN_CONFIG"  # the run config (base64 JSON) for nodes that cannot read the head's run.json
FORWARDED_ENV = ("AWS_",)  # storage credentials and endpoint, for the ranks' own checkpoint uploads


def hostfile_lines(cfg: FinetuneConfig) -> list[str]:
    """train.hostfile as lines: the file's (a path on this node) or the configured list."""
    h = cfg.train.hostfile
    if h is None:
        return []
    if isinstance(h, list):
        return list(h)
    path = Path(h).expanduser()
    if not path.is_file():
        raise ConfigError(f"train.hostfile={h}: no such file on this node; give the path of DeepSpeed's hostfile "
                          "(one `HOST slots=N` line per node) or its lines as a list")
    return path.read_text().splitlines()


def parse_hostfile(lines: list[str], source: str = "train.hostfile") -> OrderedDict[str, int]:
    """{host: slots} in file order, as DeepSpeed reads it; an error names the line and the fix."""
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ConfigError(f"{source} line {number}: {raw.strip()!r} is not `HOST slots=N` (DeepSpeed's hostfile "
                              "format, e.g. `node1 slots=8`)")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise ConfigError(f"{source} line {number}: {host} has slots={slots}; give at least 1 process per node")
        if host in hosts:
            raise ConfigError(f"{source} line {number}: {host} is listed twice; list each node once")
        hosts[host] = slots
    if not hosts:
        raise ConfigError(f"{source}: no `HOST slots=N` line; list the nodes, one per line")
    return hosts


def active_hosts(cfg: FinetuneConfig) -> OrderedDict[str, int]:
    """{host: processes} that the runner starts: the hostfile less train.include / train.exclude."""
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    t = cfg.train
    pool = parse_hostfile(hostfile_lines(cfg))
    if t.include and t.exclude:
        raise ConfigError("train.include and train.exclude are both set; DeepSpeed takes one of them")
    try:
        active = parse_inclusion_exclusion(pool, t.include, t.exclude)
    except (ValueError, IndexError) as exc:
        key = "train.include" if t.include else "train.exclude"
        raise ConfigError(f"{key}={t.include or t.exclude}: {exc}; use hosts (and HOST:SLOT,SLOT) of train.hostfile "
                          f"({', '.join(pool)}) joined by @") from None
    active = OrderedDict((h, len(s)) for h, s in active.items() if s)
    if not active:
        raise ConfigError(f"train.include / train.exclude leave no host of train.hostfile ({', '.join(pool)})")
    return active


def is_multinode(cfg: FinetuneConfig) -> bool:
    return cfg.train.launcher == "deepspeed" and cfg.train.hostfile is not None


def check_hostfile(cfg: FinetuneConfig) -> None:
    """A hostfile launch as DeepSpeed will see it; no SSH yet (see check_ssh)."""
    t = cfg.train
    if t.launcher != "deepspeed":
        raise ConfigError(f"train.hostfile is set but train.launcher={t.launcher}; the hostfile is for "
                          "train.launcher=deepspeed (DeepSpeed's runner starts every node over SSH)")
    if t.nnodes != 1 or t.nproc_per_node != 1:
        raise ConfigError("train.hostfile decides the nodes and processes per node (slots=N); leave train.nnodes and "
                          "train.nproc_per_node at 1")
    hosts = active_hosts(cfg)
    loopback = {"localhost", "127.0.0.1", "::1"}
    if len(hosts) > 1 and t.master_addr in loopback and not set(hosts) <= loopback:
        raise ConfigError(f"train.master_addr={t.master_addr} is this node's loopback address, which the other nodes "
                          f"cannot reach; set it to the address of {next(iter(hosts))} (the first host: rank 0)")


def ssh_command(cfg: FinetuneConfig, host: str, remote: str) -> list[str]:
    """`ssh` to `host` as pdsh does it (PDSH_SSH_ARGS_APPEND, train.ssh_port), never prompting."""
    port = ["-p", str(cfg.train.ssh_port)] if cfg.train.ssh_port else []
    extra = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *extra, *port, host, remote]


def check_ssh(cfg: FinetuneConfig) -> None:
    """Every host answers over ssh without a password, and pdsh is installed; the error says what to fix."""
    import shutil

    for tool, package in (("pdsh", "pdsh"), ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            raise ConfigError(f"train.hostfile: `{tool}` is not installed on this node; install it "
                              f"(apt-get install {package}, or `make system-deps` as root)")
    for host in active_hosts(cfg):
        res = subprocess.run(ssh_command(cfg, host, "true"), capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            why = " ".join(res.stderr.split())[-300:]
            raise ConfigError(f"train.hostfile: cannot ssh to {host}{f' port {cfg.train.ssh_port}' if cfg.train.ssh_port else ''} "
                              f"without a password ({why}); set up key login from this node (ssh-copy-id), "
                              "train.ssh_port, or ~/.ssh/config")


def new_launch_id() -> str:
    return uuid.uuid4().hex[:16]


def env_file_lines(cfg_json: str, env: dict[str, str]) -> list[str]:
    """The `.deepspeed_env` lines: `env` (the ranks' thread settings ...), the storage credentials from
    this process's environment, and the run config."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    lines = [f"{k}={v}" for k, v in {**forwarded, **env}.items() if "\n" not in v]
    return [*lines, f"{CONFIG_ENV}={base64.b64encode(cfg_json.encode()).decode()}"]


def write_launch_files(cfg: FinetuneConfig, run_dir: Path, cfg_json: str, env: dict[str, str]) -> tuple[Path, Path]:
    """`hostfile` and `.deepspeed_env` (owner-only: it may hold credentials) in the run folder."""
    hostfile = run_dir / "hostfile"
    hostfile.write_text("".join(f"{h} slots={n}\n" for h, n in parse_hostfile(hostfile_lines(cfg)).items()))
    env_file = run_dir / ".deepspeed_env"
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)
    env_file.write_text("\n".join(env_file_lines(cfg_json, env)) + "\n")
    return hostfile, env_file


def runner_command(cfg: FinetuneConfig, config_path: Path, hostfile: Path, launch_id: str,
                   python: str = sys.executable) -> list[str]:
    """DeepSpeed's runner over the hostfile. Its own ssh check (the first host only, ignoring
    PDSH_SSH_ARGS_APPEND) is replaced by check_ssh."""
    t = cfg.train
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", f"--master_addr={t.master_addr}",
           f"--master_port={t.master_port}", "--no_ssh_check", "--launcher=pdsh"]
    if t.ssh_port:
        cmd.append(f"--ssh_port={t.ssh_port}")
    if t.include:
        cmd.append(f"--include={t.include}")
    if t.exclude:
        cmd.append(f"--exclude={t.exclude}")
    return [*cmd, "--module", "vlm_core.train", "--config", str(config_path), f"{MARKER_ARG}={launch_id}"]


def stop_script(launch_id: str, grace_s: int = 10) -> str:
    """A shell script that ends this launch's processes on one node. The pattern's `[-]` keeps it from
    matching the script's own command line (or the ssh that carries it)."""
    pat = shlex.quote(f"[-]{MARKER_ARG[1:]}={launch_id}")
    return (f"pkill -TERM -f {pat}; i=0; while [ $i -lt {grace_s * 2} ] && pgrep -f {pat} >/dev/null; "
            f"do sleep 0.5; i=$((i+1)); done; "
            f"for s in $(pgrep -f {pat} | xargs -r ps -o sid= -p); do [ \"$s\" -gt 1 ] && pkill -KILL -s \"$s\"; done; "
            f"pkill -KILL -f {pat}; true")


def stop_everywhere(cfg: FinetuneConfig, launch_id: str, grace_s: int = 10) -> list[str]:
    """End this launch's processes on every node, all nodes at once; returns the hosts that could not be
    reached (their processes may still run)."""
    procs = {h: subprocess.Popen(ssh_command(cfg, h, stop_script(launch_id, grace_s)), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) for h in active_hosts(cfg)}
    failed = []
    for host, p in procs.items():
        try:
            if p.wait(timeout=grace_s + 30) == 255:  # ssh's own failure
                failed.append(host)
        except subprocess.TimeoutExpired:
            p.kill()
            failed.append(host)
    return failed


def split_host(line: str) -> tuple[str | None, str]:
    """(host, rest) of a pdsh output line `host: rest`; (None, line) for any other line."""
    host, sep, rest = line.partition(": ")
    if sep and host and " " not in host and not host.startswith("pdsh@"):
        return host, rest
    return None, line


def inline_hostfile(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with train.hostfile as its lines (read from the file on this node), for nodes that cannot read it."""
    if cfg.train.hostfile is None or isinstance(cfg.train.hostfile, list):
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"hostfile": hostfile_lines(cfg)})})
