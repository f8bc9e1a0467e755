"""A loss / eval-loss curve as a PNG, drawn with PIL from the run's metrics.jsonl.

Written by hand (~40 lines) rather than adding matplotlib to every install for one chart.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


def read_curves(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text().splitlines():
            row = json.loads(line)
            for key in curves:
                if key in row:
                    curves[key].append((int(row["step"]), float(row[key])))
    return curves


def loss_curve_png(curves: dict[str, list[tuple[int, float]]], size: tuple[int, int] = (640, 360)) -> bytes:
    w, h = size
    pad = 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for c in curves.values() for p in c]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-6 else (y0, y1)

        def xy(step: int, value: float) -> tuple[float, float]:
            return (pad + (step - x0) / max(x1 - x0, 1) * (w - 2 * pad), h - pad - (value - y0) / (y1 - y0) * (h - 2 * pad))

        draw.rectangle((pad, pad, w - pad, h - pad), outline=(180, 180, 180))
        for (name, curve), colour in zip(curves.items(), [(40, 90, 220), (220, 60, 40)], strict=False):
            if len(curve) > 1:
                draw.line([xy(s, v) for s, v in curve], fill=colour, width=2)
            for s, v in curve:
                draw.ellipse([xy(s, v)[0] - 2, xy(s, v)[1] - 2, xy(s, v)[0] + 2, xy(s, v)[1] + 2], fill=colour)
            draw.text((pad + 5 + 120 * list(curves).index(name), 10), name, fill=colour)
        draw.text((5, pad), f"{y1:.2f}", fill="black")
        draw.text((5, h - pad - 10), f"{y0:.2f}", fill="black")
        draw.text((w - pad - 30, h - pad + 5), f"step {x1}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
