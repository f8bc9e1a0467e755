"""Prefect task: launch distributed training as a subprocess group, report progress, upload checkpoints.

Called directly from the flow (not `.submit()`), so a cancellation reaches the thread that reads the
training output and the whole process group is killed (tasks.process). With storage.url set, new
complete checkpoints go up while training runs; a retried or restarted run resumes from the newest
complete checkpoint (local, else fetched from storage) and never starts from zero.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from tasks.process import run_group
from tasks.storage import load_storage_credentials
from vlm_core.checkpoints import (
    CheckpointUploader,
    fetch_latest_checkpoint,
    latest_complete,
    upload_new_checkpoints,
)
from vlm_core.config import FinetuneConfig, to_json
from vlm_core.launch import check_run, command, thread_env
from vlm_core.train import PROGRESS, config_sha


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_task(cfg: FinetuneConfig) -> dict:
    log = get_run_logger()
    out = Path(cfg.train.output_dir)
    done_file = out / "run_summary.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if done.get("config_sha") == config_sha(cfg):
        log.info("%s already holds a finished run with this configuration: not training again", out)
        if cfg.storage.url and cfg.storage.upload_checkpoints:  # a failed upload of that run is retried here
            load_storage_credentials(cfg)
            upload_new_checkpoints(out, cfg.storage.url, cfg.name)
        return done
    check_run(cfg)  # fails in a second, before any process starts
    out.mkdir(parents=True, exist_ok=True)
    if cfg.storage.url:
        load_storage_credentials(cfg)
        if cfg.train.resume_from == "auto" and latest_complete(out) is None:
            fetched = fetch_latest_checkpoint(cfg.storage.url, cfg.name, out)
            if fetched:
                log.info("resuming from %s, fetched from storage", fetched)
    run_json = out / "run.json"
    run_json.write_text(to_json(cfg))
    cmd = command(cfg, run_json)
    env = {**os.environ, **thread_env(cfg)}
    progress = create_progress_artifact(0.0, key="training-progress", description="Optimizer steps done")
    state: dict = {"summary": None}

    def on_line(line: str) -> None:
        if not line.startswith(PROGRESS):
            if "Error" in line or "Traceback" in line:
                log.warning(line)
            return
        event = json.loads(line[len(PROGRESS) + 1 :])
        if event["kind"] == "start":
            log.info("training on %d rank(s), effective batch %d, max steps %d%s", event["world_size"],
                     event["effective_batch"], event["max_steps"],
                     f", resumed from {event['resumed_from']}" if event["resumed_from"] else "")
        elif event["kind"] == "log":
            if event.get("max_steps"):
                update_progress_artifact(progress, 100.0 * event["step"] / event["max_steps"])
            shown = {k: round(v, 4) for k, v in event.items() if k in ("loss", "eval_loss", "learning_rate")}
            if shown:
                log.info("step %d: %s", event["step"], shown)
        elif event["kind"] == "checkpoint":
            log.info("checkpoint %s", event["path"])
        elif event["kind"] == "done":
            state["summary"] = event

    uploader = None
    if cfg.storage.url and cfg.storage.upload_checkpoints:
        uploader = CheckpointUploader(out, cfg.storage.url, cfg.name).start()
    try:
        log.info("launching: %s", " ".join(cmd))
        run_group(cmd, env, out / "train.log", on_line=on_line,
                  on_start=lambda p: (out / "train.pid").write_text(str(p.pid)))
    finally:
        if uploader:
            sent = uploader.stop()  # final pass: the last checkpoint goes up too
            log.info("uploaded %d checkpoint(s) to storage", len(sent))
    summary = state["summary"] or {}
    summary.pop("kind", None)
    return summary
