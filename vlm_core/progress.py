"""Progress events: the one line format the training process writes and the Prefect task reads.

The training subprocess (several ranks, under torchrun or the deepspeed launcher) can only talk to
the task that launched it through its output stream, which also carries library logs and warnings.
So rank 0 writes each event as one line, `VLMFT_PROGRESS {json}`, and the reader picks those lines
out and ignores the rest. A rank that fails (any rank) writes its exception as one line,
`VLMFT_ERROR rank=N: Type: message`, before its traceback, so the task can name the first rank
that failed and why instead of the launcher's summary. Writers and readers both live here so the
formats have one home.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

PREFIX = "VLMFT_PROGRESS"
ERROR_PREFIX = "VLMFT_ERROR"
EventKind = Literal["phase", "start", "step", "log", "checkpoint", "done"]


@dataclass
class ProgressEvent:
    """One event: `phase` (what the run does before and between optimizer steps: loading the model,
    evaluating ...), `start` (world size, steps, resume point), `step` (progress every few seconds: step,
    max_steps, samples/s, tokens/s, ETA, latest loss), `log` (a Trainer log record: step, loss, eval_loss,
    learning rate, data counters), `checkpoint` (step, path) or `done` (the run summary)."""

    kind: EventKind
    fields: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{PREFIX} {json.dumps({'kind': self.kind, **self.fields})}"


def emit(kind: EventKind, **fields: Any) -> None:
    """Print an event on rank 0 (other ranks stay quiet: one event per step, not one per rank)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(ProgressEvent(kind, fields).line(), flush=True)


def parse(line: str) -> ProgressEvent | None:
    """The event on an output line, or None for any other line."""
    if not line.startswith(PREFIX + " "):
        return None
    data = json.loads(line[len(PREFIX) + 1 :])
    return ProgressEvent(data.pop("kind"), data)


def error_line(exc: BaseException) -> str:
    """This rank's uncaught exception as one line (whitespace folded, at most ~1000 characters).

    An exception raised in a DataLoader worker reaches the rank re-raised by torch with the worker's whole
    traceback as its message; the line keeps the worker's own exception message, which names the problem
    (a traceback of ~1000 characters would push it past the cut)."""
    text = str(exc)
    if text.startswith("Caught ") and " in DataLoader worker process " in text:
        lines = text.rstrip().splitlines()
        last_frame = max((i for i, line in enumerate(lines) if line.startswith("  ")), default=0)
        own = "\n".join(lines[last_frame + 1 :]) or lines[-1]
        text = own.split(": ", 1)[1] if own.startswith(f"{type(exc).__name__}: ") else own
        text += f" ({lines[0].split('.')[0].removeprefix('Caught ')})"
    message = " ".join(text.split())
    message = message if len(message) <= 1000 else message[:1000] + "..."
    return f"{ERROR_PREFIX} rank={int(os.environ.get('RANK', 0))}: {type(exc).__name__}: {message}"


def parse_error(line: str) -> tuple[int, str] | None:
    """(rank, "Type: message") from an error line (the launcher may prefix it), or None for any other line."""
    _, found, rest = line.partition(ERROR_PREFIX + " rank=")
    rank, sep, what = rest.partition(": ")
    if not found or not sep or not rank.isdigit():
        return None
    return int(rank), what
