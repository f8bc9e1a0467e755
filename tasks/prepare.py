"""Prefect tasks of the prepare step: thin wrappers over vlm_core.data.shards.

Plans and group results are small (record text, shard names, counts), never images, so they can go
between tasks on any task runner (threads, Dask) and to worker processes. A group task given the
flow's process pool (vlm_core.data.pool) hands its group to a worker process and waits for it;
without one it writes the group where the task runs.
"""

from __future__ import annotations

from concurrent.futures import Executor

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_unless_user_error
from vlm_core.config import FinetuneConfig
from vlm_core.data.length import model_fingerprint
from vlm_core.data.manifest import Manifest
from vlm_core.data.readers import DatasetSpec
from vlm_core.data.shards import (
    Group,
    GroupResult,
    Plan,
    begin,
    finalize,
    plan_shards,
    write_group_in,
    write_group_job,
)
from vlm_core.demo import ensure_demo_data


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_task(cfg: FinetuneConfig) -> Plan:
    if folder := ensure_demo_data(cfg.data):
        get_run_logger().info("data.meta=%s did not exist: wrote the demo data set to %s (data.write_demo_if_missing)",
                              cfg.data.meta, folder)
    return plan_shards(cfg.data, model_fingerprint(cfg.model))


@task(name="begin-shards", cache_policy=NO_CACHE)
def begin_task(cfg: FinetuneConfig) -> None:
    begin(cfg.data)


@task(name="write-shard-group", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error, task_run_name="write-{group.split}-{group.index}")
def write_group_task(group: Group, datasets: list[DatasetSpec], cfg: FinetuneConfig,
                     pool: Executor | None = None) -> GroupResult:
    if pool is not None:
        return write_group_in(pool, group, datasets, cfg.data, cfg.model)
    return write_group_job(group, datasets, cfg.data, cfg.model)  # in this thread, one tokenizer per process


@task(name="finalize-shards", cache_policy=NO_CACHE)
def finalize_task(plan: Plan, results: list[GroupResult], cfg: FinetuneConfig) -> Manifest:
    return finalize(plan, results, cfg.data)
