"""The one engine worker of a Slicer session, shared by every logic object (module, effect, console).

It starts on the first run and is stopped when Slicer quits or the module is reloaded; a run in
progress then is cancelled and its segments restored first.
"""

from __future__ import annotations

import sys
import time

from .run import POLL_SECONDS, drain
from .worker import MessageKind, Worker

SHUTDOWN_WAIT_SECONDS = 5.0  # a run stopped by a shutdown: how long past the cancel's grace kill it may take to end

_shared_worker: Worker | None = None
_shared_target = None  # the server the shared worker talks to (None: this computer)
QUIT_REASON = "The OFLSAM2 worker was stopped because Slicer is quitting."
RELOAD_REASON = "The OFLSAM2 worker was stopped for a reload of the module."


def shared_worker(target=None) -> Worker:
    """The one worker (and so the one SAM2 model) of this Slicer session: a local process, or a
    session on the server ``target`` (an :class:`oflsam2.client.ServerTarget`). It starts on the
    first run and again on the next run if it died; another target replaces it once no run is
    active. After a Reload, logic objects of the old code (the effect's, the console's) get the
    reloaded module's worker: one worker per Slicer process."""
    current = sys.modules.get(__name__)
    if current is not None and current.shared_worker is not shared_worker:  # this module was replaced by a Reload
        return current.shared_worker(target)
    global _shared_worker, _shared_target
    if _shared_worker is not None and target != _shared_target and _shared_worker.active_run is None:
        _shared_worker.shutdown()
        _shared_worker = None
    if _shared_worker is None:
        if target is None:
            _shared_worker = Worker()
        else:
            from .server_transport import HttpTransport

            _shared_worker = Worker(transport_factory=lambda on_event: HttpTransport(on_event, target))
        _shared_target = target
    return _shared_worker


def started_shared_worker() -> Worker | None:
    """The session's worker if one was started (none is started here)."""
    return _shared_worker


def shutdown_shared_worker(reason: str = QUIT_REASON) -> None:
    """Stop the session's worker process (Slicer quits, the module is reloaded). A run in
    progress is cancelled and finished here, its segments restored, before the worker stops:
    nothing may be left for a timer that a Reload is about to drop."""
    global _shared_worker
    worker, _shared_worker = _shared_worker, None
    if worker is None:
        return
    run = worker.active_run
    if run is not None and not run.finished:
        run.cancel(reason)
        deadline = time.monotonic() + worker.grace_seconds + SHUTDOWN_WAIT_SECONDS  # the grace kill comes first
        while not drain(run) and time.monotonic() < deadline:
            run.job.finished.wait(POLL_SECONDS)
        if not run.finished:  # the worker never answered, even to its kill: put the segments back now
            run.handle((MessageKind.CANCELLED,))
    worker.shutdown(reason=reason)

