"""`make serve`: a local Prefect server (SQLite under runs/prefect) and a process worker, on 127.0.0.1.

Both start in sessions of their own; Ctrl-C (or SIGTERM) stops the worker first, then the server,
each by its PID (a Prefect 3.9 worker needs a second SIGINT to exit promptly).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deployments.deploy import DEFAULT_POOL, ROOT, ensure_pool

PREFECT = str(Path(sys.executable).parent / "prefect")


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # else the UI's requests go astray
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/server.db"}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(api: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{api} not healthy after {timeout} s")


def stop(proc: subprocess.Popen, second_sigint_after: float | None = None, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(second_sigint_after or grace)
        return
    except subprocess.TimeoutExpired:
        if second_sigint_after:
            os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(port: int = 4200, pool: str = DEFAULT_POOL) -> None:
    home = ROOT / "runs" / "prefect"
    api = f"http://127.0.0.1:{port}/api"
    server = start_server(home, port, home.parent / "prefect-server.log")
    worker = None
    try:
        wait_healthy(api, server)
        os.environ["PREFECT_API_URL"] = api  # for the worker process
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):  # settings are read at import: set them here too
            ensure_pool(pool)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], env={**os.environ},
                                  start_new_session=True)
        print(f"Prefect UI: http://127.0.0.1:{port}   API: {api}   worker on pool {pool!r}. Ctrl-C stops both.")
        print(f"Register deployments with: PREFECT_API_URL={api} make deploy")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while server.poll() is None and worker.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if worker:
            stop(worker, second_sigint_after=2)
        stop(server)


if __name__ == "__main__":
    main()
