"""Prefect tasks around object storage: credentials from a Secret block, and uploading a folder.

Credentials come from the environment, or once from a Prefect Secret block (storage.secret_block)
into this process's environment; their values are never logged, returned or put in artifacts.
"""

from __future__ import annotations

import json
import os

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import retry_unless_user_error
from vlm_core.config import ConfigError, FinetuneConfig
from vlm_core.storage import upload_folder


def load_storage_credentials(cfg: FinetuneConfig) -> None:
    """Put the Secret block's AWS_* values into os.environ, unless the environment already has them."""
    if not cfg.storage.secret_block or os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return
    from prefect.blocks.system import Secret

    try:
        values = Secret.load(cfg.storage.secret_block).get()
    except ValueError as exc:  # no such block on this Prefect server
        raise ConfigError(f"storage.secret_block={cfg.storage.secret_block}: {exc}; create it (Prefect UI: Blocks, "
                          "Secret, a JSON object of AWS_* keys) on the server PREFECT_API_URL names, or set "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment") from exc
    values = json.loads(values) if isinstance(values, str) else values
    for key, value in values.items():
        if key.startswith("AWS_"):
            os.environ.setdefault(key, str(value))


@task(name="upload-folder", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)  # storage out of reach: yes; a missing bucket: no
def upload_folder_task(cfg: FinetuneConfig, local: str, url: str) -> dict:
    load_storage_credentials(cfg)
    report = upload_folder(local, url)
    get_run_logger().info("uploaded %s to %s: %d files sent (%d bytes), %d unchanged", local, url,
                          report.files_sent, report.bytes_sent, report.files_skipped)
    return {"url": url, "files_sent": report.files_sent, "bytes_sent": report.bytes_sent}
