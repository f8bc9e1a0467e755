"""Register the pipeline's deployments on a Prefect server (PREFECT_API_URL), from this folder.

    vlmft deploy [--config deployments/finetune.yaml] [--pool vlm-training] [key.path=value ...]

* `finetune`: the end-to-end pipeline, for runs from the UI; its form is pre-filled from the config.
* `retrain-nightly`: the same config on a cron schedule; trains only when the data changed.
* `merge`: merge (and upload) the adapter of an existing run.

All run on a process work pool whose concurrency limit is 1, so one training run at a time uses the
machine. The worker runs flows from this repository (pulled as a local folder), with the working
directory set to its root, so relative paths in the config resolve there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.schedules import Cron
from prefect.utilities.asyncutils import run_coro_as_sync

from vlm_core.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "vlm-training"


def ensure_pool(pool: str) -> None:
    """A process work pool with concurrency limit 1 (created if missing)."""
    async def create():
        from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            try:
                await client.read_work_pool(pool)
                await client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=1))
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=1))

    run_coro_as_sync(create())


def deploy_all(cfg: FinetuneConfig, pool: str = DEFAULT_POOL, cron: str = "0 3 * * *",
               env: dict[str, str] | None = None) -> dict[str, str]:
    """Create or update the three deployments; returns {name: deployment id}."""
    ensure_pool(pool)
    params = {"cfg": cfg.model_dump(mode="json")}
    job = {"env": {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}, "working_dir": str(ROOT)}
    ids = {}
    for name, entry, schedules in (
        ("finetune", "flows/finetune.py:finetune", None),
        ("retrain-nightly", "flows/finetune.py:retrain", [Cron(cron, timezone="UTC")]),
        ("merge", "flows/merge.py:merge", None),
    ):
        ids[name] = str(flow.from_source(source=str(ROOT), entrypoint=entry).deploy(
            name=name, work_pool_name=pool, parameters=params, schedules=schedules, job_variables=job,
            tags=["vlm-finetune"], print_next_steps=False,
            ignore_warnings=True,  # Prefect's "use .serve for a process pool" advice, once per deployment
        ))
    return ids


def start_worker(pool: str = DEFAULT_POOL, log: Path | None = None) -> subprocess.Popen:
    """A process worker for the pool, in its own session (stop it with stop_process)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
                             "--type", "process"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
