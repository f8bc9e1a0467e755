"""The run report's loss curve: a real PNG of the requested size showing both curves."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from vlm_core.report import CURVE_STYLE, loss_curve_png, read_curves


def _pixels_near(img: np.ndarray, hex_colour: str, tol: int = 30) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_loss_curve_png_shows_both_curves(tmp_path):
    rows = [{"step": s, "loss": 2.5 - 0.005 * s} for s in range(1, 301)]
    rows += [{"step": s, "eval_loss": 2.4 - 0.004 * s} for s in range(0, 301, 50)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert len(curves["loss"]) == 300 and len(curves["eval_loss"]) == 7

    png = loss_curve_png(curves, title="demo run")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (640, 360)
    pixels = np.asarray(image.convert("RGB"))
    assert _pixels_near(pixels, CURVE_STYLE["loss"][1]) > 200  # the training loss line
    assert _pixels_near(pixels, CURVE_STYLE["eval_loss"][1]) > 50  # the eval loss line and markers

    assert Image.open(io.BytesIO(loss_curve_png(curves, size=(800, 450)))).size == (800, 450)


def test_loss_curve_png_without_metrics_is_still_an_image(tmp_path):
    png = loss_curve_png(read_curves(tmp_path / "missing.jsonl"))
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape == (360, 640, 3)
    assert _pixels_near(pixels, CURVE_STYLE["loss"][1]) == _pixels_near(pixels, CURVE_STYLE["eval_loss"][1]) == 0


def test_importing_the_report_module_does_not_import_matplotlib():
    code = "import sys, vlm_core.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
