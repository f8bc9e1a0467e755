"""A loss / eval-loss curve as a PNG, drawn with matplotlib from the run's metrics.jsonl, and the
run's losses as a user reads them: each named for what it is, at 4 significant digits.

matplotlib is imported inside `loss_curve_png` (Agg, no pyplot and no global state, so it is safe
from any thread) to keep `import vlm_core` fast for code that never draws a chart.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# name in metrics.jsonl -> (legend label, colour); the colours are the ones the run report names
CURVE_STYLE: dict[str, tuple[str, str]] = {
    "loss": ("training loss", "#285adc"),  # blue
    "eval_loss": ("eval loss", "#dc3c28"),  # red
}


def significant(value: float | None, digits: int = 4) -> float | None:
    """`value` rounded to `digits` significant digits (4.458812... -> 4.459; 2e-05 stays 2e-05)."""
    return None if value is None else float(f"{value:.{digits}g}")


def loss_summary(trained: dict) -> dict[str, float | None]:
    """The losses of a training summary (vlm_core.train's run_summary.json), named for what they are.

    The Trainer's `train_loss` is the mean over the steps this session ran, not the last loss: it is
    named so (a resumed session's mean starts at the resume), and the last logged loss is given too."""
    losses, evals = trained.get("losses") or {}, trained.get("eval_losses") or {}
    mean = "mean train loss since the resume" if trained.get("resumed_from") else "mean train loss over the run"
    return {
        "last logged train loss": significant(losses[max(losses, key=int)]) if losses else None,
        mean: significant(trained.get("train_loss")),
        "first eval loss": significant(evals[min(evals, key=int)]) if evals else None,
        "final eval loss": significant(trained.get("final_eval_loss")),
    }


def read_curves(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text().splitlines():
            row = json.loads(line)
            for key in curves:
                if key in row:
                    curves[key].append((int(row["step"]), float(row[key])))
    return curves


def loss_curve_png(
    curves: dict[str, list[tuple[int, float]]],
    size: tuple[int, int] = (640, 360),
    *,
    title: str | None = None,
) -> bytes:
    """PNG bytes of exactly `size` pixels: each curve (loss, eval_loss) against the step.

    An empty curve is left out of the chart and the legend; with no points at all the axes are drawn
    with a "no metrics logged" note, so a report always has an image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        if not curve:
            continue
        label, colour = CURVE_STYLE.get(name, (name, None))
        steps, values = zip(*curve, strict=True)
        ax.plot(steps, values, color=colour, label=label, linewidth=1.5,
                marker="o" if len(curve) < 50 else None, markersize=3)
    if any(curves.values()):
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no metrics logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
