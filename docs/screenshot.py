"""Re-take docs/deployment-run-form.png: the `finetune` deployment's run form in the Prefect UI.

    apt-get install -y chromium && .venv/bin/python docs/screenshot.py

Starts a throw-away Prefect server on 127.0.0.1, registers the deployments, and has headless
Chromium render the run form (every config field with its description, choices as dropdowns).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.deploy import deploy_all  # noqa: E402
from deployments.serve import start_server, stop, wait_healthy  # noqa: E402
from vlm_core.config import load_config  # noqa: E402


def main(port: int = 4317) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = Path(tempfile.mkdtemp(prefix="vlm-shot-"))
    api = f"http://127.0.0.1:{port}/api"
    server = start_server(tmp / "home", port, tmp / "server.log")
    try:
        wait_healthy(api, server)
        with temporary_settings({PREFECT_API_URL: api}):
            ids = deploy_all(load_config(ROOT / "deployments" / "finetune.yaml"))
        url = f"http://127.0.0.1:{port}/deployments/deployment/{ids['finetune']}/run"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp / 'chrome'}", "--hide-scrollbars", "--window-size=1400,2200",
                        "--virtual-time-budget=20000", f"--screenshot={ROOT / 'docs' / 'deployment-run-form.png'}", url],
                       check=True, capture_output=True, timeout=180)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
