"""Flow: annotations + images → validated WebDataset shards + manifest (see vlm_core.data.shards).

    vlmft prepare --config configs/demo.yaml
    python -m vlmft prepare --config configs/demo.yaml

Groups of samples fan out as tasks, at most `data.prepare_workers` at a time. On the default thread
task runner each task hands its group to one of `data.prepare_workers` worker processes
(vlm_core.data.pool; `data.prepare_pool=threads` writes in the task's thread instead): the work is
mostly Python, which threads do not run in parallel. The pool lives in a `with` block, so a failed
group, Ctrl-C or Prefect's cancel (raised in the flow's main thread) terminates its workers, and a
killed flow process takes them with it. On a task runner with processes of its own (prefect-dask's
DaskTaskRunner via `prepare_data.with_options(task_runner=...)`) each task writes its group where it
runs. A rerun with unchanged inputs ends after planning. Notes on the
inputs that are not errors (the manifest's `warnings`) are logged as warnings on every run and
returned under "warnings".

Writing holds the shard folder's lock (vlm_core.lock), so a second preparation of the same
data.shards fails at once instead of interleaving its shards and manifest with ours. The "up to
date" path ends without the lock: it writes nothing, and a writer removes the manifest before it
changes any shard, so a plan made while another preparation writes finds no manifest and goes on
to the lock. Locking it too would make every `vlmft run` on shared shards fail while another run
merely plans.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from tasks.prepare import begin_task, finalize_task, plan_task, write_group_task
from vlm_core.config import FinetuneConfig
from vlm_core.data.manifest import Manifest
from vlm_core.data.pool import process_pool
from vlm_core.lock import FolderLock
from vlm_core.preflight import preflight


def summary(cfg: FinetuneConfig, manifest: Manifest, up_to_date: bool) -> dict:
    """What the flow returns: small and JSON-friendly."""
    return {
        "shards": cfg.data.shards,
        "fingerprint": manifest.fingerprint,
        "train_samples": manifest.train.samples,
        "eval_samples": manifest.eval.samples,
        "train_shards": len(manifest.train.shards),
        "rejected": sum(manifest.rejected_by_reason.values()),
        "up_to_date": up_to_date,
        "warnings": list(manifest.warnings),
    }


def report_artifacts(manifest: Manifest) -> None:
    create_table_artifact(
        [{"dataset": name, **c.model_dump()} for name, c in manifest.datasets.items()],
        key="prepare-datasets",
        description="Samples per input data set: records, used, written to train / eval, rejected.",
    )
    create_table_artifact(
        [{"reason": r, "samples": n} for r, n in manifest.rejected_by_reason.items()] or [{"reason": "none", "samples": 0}],
        key="prepare-rejects",
        description="Rejected samples per reason; each one is listed with file and line in rejected.jsonl.",
    )


@flow(name="prepare-data")
def prepare_data(cfg: FinetuneConfig) -> dict:
    """Validate the data named by cfg.data.meta and write shards + manifest to cfg.data.shards."""
    log = get_run_logger()
    preflight(cfg, "prepare")  # settings, buckets, folders and the model, before any shard is written
    plan = plan_task(cfg)
    if plan.up_to_date:
        log.info("shards in %s are up to date (fingerprint %s): nothing to do", cfg.data.shards, plan.fingerprint[:12])
        for note in plan.manifest.warnings:
            log.warning(note)
        return summary(cfg, plan.manifest, up_to_date=True)
    for note in plan.warnings:
        log.warning(note)

    threads = isinstance(FlowRunContext.get().task_runner, ThreadPoolTaskRunner)
    workers = process_pool(cfg.data, model=cfg.model) if threads else nullcontext()
    with FolderLock(cfg.data.shards, "shard preparation") as lock, workers as pool:  # one writer per shard folder
        if lock.took_over:
            log.warning(lock.took_over)
        log.info("writing %d samples in %d groups to %s", plan.total_units, len(plan.groups), cfg.data.shards)
        begin_task(cfg)
        progress = create_progress_artifact(0.0, key="prepare-progress", description="Shard groups written")
        bar = tqdm(total=plan.total_units, unit="sample", desc="shards", disable=not sys.stderr.isatty())
        results, pending, running = [], list(plan.groups), []
        while pending or running:  # at most data.prepare_workers groups in flight
            while pending and len(running) < cfg.data.prepare_workers:
                running.append(write_group_task.submit(pending.pop(0), plan.datasets, cfg, pool))
            fut = next(as_completed(running))
            running.remove(fut)
            res = fut.result()
            results.append(res)
            bar.update(sum(res.written.values()) + len(res.rejects))
            update_progress_artifact(progress, 100.0 * len(results) / len(plan.groups))
        bar.close()
        manifest = finalize_task(plan, results, cfg)
    report_artifacts(manifest)
    out = summary(cfg, manifest, up_to_date=False)
    log.info("wrote %(train_samples)d train / %(eval_samples)d eval samples, %(rejected)d rejected", out)
    return out

