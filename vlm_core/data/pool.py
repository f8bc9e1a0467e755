"""Worker processes for shard groups: `data.prepare_workers` processes, none left behind.

Checking images and writing tars is mostly Python holding the GIL (tar headers, JSON, image
headers), so threads barely scale and processes do. The pool is a `ProcessPoolExecutor` (a worker
that dies fails its group with BrokenProcessPool instead of hanging it) of `spawn`ed processes:
the flow's process already runs threads (Prefect's event loop and API client), and forking a
process with running threads can copy a lock mid-use into the child. `forkserver` was tried: it
pays the imports once instead of per worker, but its server outlives the pool (exiting only seconds
after the process that started it, longer with torch imported) and keeps the environment and folder
it started with. Spawned workers start on entry and import the shard writer (and, with a model,
the length check) while the caller plans; about 0.5 s without a model (benchmarks/README.md).
Like any spawned process, a worker runs the main module again: a script's imports count, a
`python -m` module's too (`prefect.engine` in a Prefect flow-run process).

No orphans: workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent
alone handles it, then stops them), `stop` terminates and reaps them when the parent's block fails
or is interrupted (Prefect's cancel raises in the flow's main thread), and each worker exits as soon
as its parent is gone, however it ended (SIGKILL included): a thread waits on
`multiprocessing.parent_process().sentinel`.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

from vlm_core.config import DataConfig, ModelConfig

PRELOAD = ["vlm_core.data.shards"]
PRELOAD_WITH_MODEL = ["vlm_core.data.length", "vlm_core.model.load"]


def _preload(names: list[str]) -> None:
    """The first job of each worker: import what the groups need before the first group arrives."""
    for name in names:
        importlib.import_module(name)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()  # its sentinel becomes readable when the parent exits
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True, name="exit-with-parent").start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


@contextmanager
def process_pool(data: DataConfig, workers: int | None = None, model: ModelConfig | None = None
                 ) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` (default data.prepare_workers) processes for `shards.write_group_job`, or None
    when one worker or data.prepare_pool=threads asks for no processes. The workers start on entry,
    so entering before other work (planning) hides their imports. Leaving the block, normally or by
    an exception (KeyboardInterrupt, Prefect's cancel, a failed group), terminates them at once:
    wait for the groups' results inside it."""
    workers = data.prepare_workers if workers is None else workers
    if workers <= 1 or data.prepare_pool != "processes":
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    for _ in range(workers):  # starts every worker now, importing while the caller plans
        pool.submit(_preload, PRELOAD + (PRELOAD_WITH_MODEL if model else []))
    try:
        yield pool
    finally:
        stop(pool)


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
    pool.shutdown(wait=True)  # the workers are gone: this only joins the executor's own thread
