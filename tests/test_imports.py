"""The dependency rule: vlm_core never imports Prefect (it runs inside the training subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, json, pkgutil, sys, time
t = time.perf_counter()
import vlm_core
names = [m.name for m in pkgutil.walk_packages(vlm_core.__path__, "vlm_core.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "prefect": sorted(m for m in sys.modules if m.split(".")[0] == "prefect"),
                  "seconds": time.perf_counter() - t}))
"""


@pytest.mark.integration
def test_vlm_core_imports_without_prefect():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "vlm_core.config" in result["modules"] and "vlm_core.model.loss" in result["modules"]
    assert len(result["modules"]) >= 7
    assert result["prefect"] == []


def test_no_prefect_import_statement_in_vlm_core():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "vlm_core").rglob("*.py")
        if any(line.lstrip().startswith(("import prefect", "from prefect")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
