"""Worker processes for shard groups: `data.prepare_workers` processes, none left behind.

Checking images and writing tars is mostly Python holding the GIL (tar headers, JSON, image
headers), so threads barely scale and processes do. The pool is a `ProcessPoolExecutor` (a worker
that dies fails its group with BrokenProcessPool instead of hanging it) whose processes come from a
`forkserver`: the flow's process already runs threads (Prefect's event loop and API client), and
forking a process with running threads can copy a lock mid-use into the child; spawn is safe too,
but pays a whole interpreter start and the imports per worker, where the fork server pays them
once (preloaded with the shard writer and, with a model, the length check's tokenizer code) and
forks each worker from it in milliseconds.

No orphans: workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent
alone handles it, then stops them), `stop` terminates and reaps them when the parent's block fails
or is interrupted (Prefect's cancel raises in the flow's main thread), and each worker exits as soon
as the process that started it is gone, however it ended (SIGKILL included): a thread waits on
`multiprocessing.parent_process().sentinel`. The fork server cannot do that for them: it lives on
while any worker holds its pipe, and exits once the last one is gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

from vlm_core.config import DataConfig, ModelConfig

PRELOAD = ["vlm_core.data.shards"]
PRELOAD_WITH_MODEL = ["vlm_core.data.length", "vlm_core.model.load"]


def start_method() -> str:
    """forkserver where the platform has it (Linux, macOS), else spawn (Windows)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _main_module() -> list[str]:
    """The main module when it was run by name (`python -m prefect.engine`, Prefect's flow-run process):
    every worker runs it again, as multiprocessing does outside fork, and preloaded it costs nothing
    there. A main script run by path is run again in each worker with its imports."""
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    return [name] if name and not name.endswith("__main__") else []


def _init_worker(environ: dict[str, str], cwd: str) -> None:
    # The fork server keeps the environment and folder it started with; a worker takes the pool
    # owner's current ones (storage credentials and endpoints set since, a changed folder).
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's sentinel becomes readable when the process that asked for us exits, however it
    # ends (the fork server, our OS parent, outlives it while any worker holds its pipe).
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True, name="exit-with-parent").start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


@contextmanager
def process_pool(data: DataConfig, workers: int | None = None, model: ModelConfig | None = None
                 ) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` (default data.prepare_workers) processes for `shards.write_group_job`, or None
    when one worker or data.prepare_pool=threads asks for no processes. Leaving the block normally
    waits for the submitted groups; leaving it with an exception (KeyboardInterrupt, Prefect's
    cancel, a failed group) terminates the workers at once. The fork server starts on entry, so
    entering before other work (planning) hides its imports."""
    workers = data.prepare_workers if workers is None else workers
    if workers <= 1 or data.prepare_pool != "processes":
        yield None
        return
    ctx = multiprocessing.get_context(start_method())
    if ctx.get_start_method() == "forkserver":  # no effect once this process's fork server runs
        ctx.set_forkserver_preload(PRELOAD + (PRELOAD_WITH_MODEL if model else []) + _main_module())
        multiprocessing.forkserver.ensure_running()  # starts it now: it imports while the caller plans
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(dict(os.environ), os.getcwd()))
    try:
        yield pool
    except BaseException:
        stop(pool)
        raise
    pool.shutdown(wait=True)


def stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate the workers and reap them (Python 3.14 has this as
    `terminate_workers()`; before it, the executor's process table is the only handle on them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
