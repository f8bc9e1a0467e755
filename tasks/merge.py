"""Prefect tasks: merge a LoRA adapter into its base model, or consolidate a full fine-tune's (ZeRO-3)
checkpoint into a plain model folder (vlm_core.merge, vlm_core.consolidate); both verified before publishing."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.storage import load_storage_credentials
from vlm_core.config import FinetuneConfig
from vlm_core.consolidate import consolidate_checkpoint
from vlm_core.merge import merge_lora


@task(name="merge-lora", cache_policy=NO_CACHE)
def merge_task(cfg: FinetuneConfig, adapter: str, out: str) -> dict:
    load_storage_credentials(cfg)
    report = merge_lora(cfg.model, adapter, out, dtype=cfg.lora.merge_dtype, tolerance=cfg.lora.merge_tolerance,
                        data=cfg.data)
    log = get_run_logger()
    if report.skipped:
        log.info("%s already holds this merge (fingerprint %s): nothing to do", out, report.fingerprint[:12])
    else:
        log.info("merged %s into %s: max |Δlogit| %.3g (%.3g relative, tolerance %g)", adapter, out,
                 report.max_abs_diff, report.relative_diff, report.tolerance)
    return asdict(report)


@task(name="consolidate-checkpoint", cache_policy=NO_CACHE)
def consolidate_task(cfg: FinetuneConfig, checkpoint: str, out: str) -> dict:
    load_storage_credentials(cfg)
    report = consolidate_checkpoint(checkpoint, cfg.model, out, data=cfg.data)
    log = get_run_logger()
    if report.skipped:
        log.info("%s already holds this checkpoint (fingerprint %s): nothing to do", out, report.fingerprint[:12])
    else:
        log.info("consolidated %s (%s) into %s: max |Δlogit| after reload %.3g", checkpoint, report.source, out,
                 report.max_abs_diff)
    return asdict(report)
