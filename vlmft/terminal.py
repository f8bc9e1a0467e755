"""What a `vlmft` command run from a terminal needs around Prefect.

* No telemetry, and a longer start-up limit for the temporary Prefect server (20 s by default,
  exceeded on a loaded machine): defaults set before Prefect reads its settings, so a user's own
  environment still wins.
* Ctrl-C: without PREFECT_API_URL, Prefect starts a temporary server on first use, in our process
  group. A terminal's Ctrl-C reaches every process of the foreground group, so the server shut down
  while this process was still reporting the interrupted run to it, and retried that for minutes.
  So the server is started here, with SIGINT blocked while it is spawned: a child inherits the
  blocked signal, the server never sees Ctrl-C, and Prefect stops it (SIGTERM) when vlmft exits.
* User errors without tracebacks: Prefect's engine logs every failed task and flow run with the
  exception's traceback, 2 to 12 of them before our one `vlmft:` line. A filter on Prefect's console
  handlers prints those records without the traceback when the exception is a user error
  (tasks.errors); the run's log in Prefect (the UI, `prefect flow-run logs`) keeps it in full, since
  its handler formats the record before the console handler sees it. Bugs keep their tracebacks.
"""

from __future__ import annotations

import copy
import logging
import os
import signal

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def set_prefect_defaults() -> None:
    """Our defaults for Prefect settings the environment does not set; call before importing Prefect."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def start_temporary_server() -> None:
    """Start Prefect's temporary server now, out of reach of Ctrl-C, when no PREFECT_API_URL is set
    (Prefect's clients then find it running and use it)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a Ctrl-C meanwhile is delivered here


class WithoutUserErrorTraceback(logging.Filter):
    """A handler filter: a record whose exception is one of `errors` is emitted again as a copy without
    the exception (message kept), and the original is dropped; other records pass unchanged. The copy
    leaves the record as other handlers see it intact."""

    def __init__(self, handler: logging.Handler, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.handler, self.errors = handler, errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if not isinstance(exc, self.errors):
            return True
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text = None, None
        self.handler.handle(bare)
        return False


def hide_user_error_tracebacks(errors: tuple[type[BaseException], ...]) -> None:
    """Put the filter on Prefect's console handlers (set up here first if Prefect has not yet: its
    set-up replaces the handlers only the first time)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, WithoutUserErrorTraceback) for f in handler.filters):
                handler.addFilter(WithoutUserErrorTraceback(handler, errors))
