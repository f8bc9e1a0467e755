"""Prefect task: make a published model the current model of its run name (vlm_core.promote).

A task of its own so that the one write that changes what is served shows in the flow run, is retried
on a transient storage error, and is the last thing the finetune flow writes.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_unless_user_error
from tasks.storage import load_storage_credentials
from vlm_core.config import FinetuneConfig
from vlm_core.promote import CurrentChanged, promote


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def promote_task(cfg: FinetuneConfig, model_url: str, metrics: dict, lineage: dict, reason: str,
                 compared_with: str | None) -> dict | str:
    """Write `{storage.url}/{name}/current.json` pointing at `model_url`; returns the pointer document, or
    the sentence saying why not when another run was promoted after `compared_with` was evaluated."""
    load_storage_credentials(cfg)
    try:
        doc = promote(cfg.storage.url, cfg.name, model_url, metrics, cfg.eval.metric, lineage, reason=reason,
                      compared_with=compared_with)
    except CurrentChanged as exc:
        get_run_logger().warning("%s", exc)
        return str(exc)
    get_run_logger().info("current model of %s is now %s (%s)", cfg.name, model_url, reason)
    return doc
