"""Jobs on the server: their event logs, read by long polling, and the device queue that runs
them one at a time on the shared model.

A job's events are the worker protocol's (``progress``, ``slice``, ``done``, ``cancelled``,
``error``) plus ``queued`` (``position``: jobs ahead of it on the device), each numbered from 1
(``seq``); a client asks for the events after the last one it has and so never loses or repeats
one, also across a reconnection. Events a client has read are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..events import CancelToken

TERMINAL_EVENTS = ("done", "cancelled", "error")
MAX_EVENTS_PER_READ = 256


class EventLog:
    """Events appended by the device thread, read by the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._events: collections.deque = collections.deque()
        self._next = 1
        self._changed = asyncio.Event()
        self.finished = False

    def append(self, event: dict) -> None:
        with self._lock:
            self._events.append({**event, "seq": self._next})
            self._next += 1
            self.finished = self.finished or event.get("event") in TERMINAL_EVENTS
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def read(self, after: int, wait: float) -> list[dict]:
        """The events numbered above ``after``, waiting up to ``wait`` seconds for a first one."""
        deadline = self._loop.time() + wait
        while True:
            with self._lock:
                while self._events and self._events[0]["seq"] <= after:  # the client has them
                    self._events.popleft()
                found = [e for _, e in zip(range(MAX_EVENTS_PER_READ), self._events)]
                changed = self._changed
            remaining = deadline - self._loop.time()
            if found or remaining <= 0:
                return found
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


@dataclass(eq=False)
class ServerJob:
    id: int
    session: object  # sessions.Session
    request: dict
    log: EventLog
    token: CancelToken = field(default_factory=CancelToken)
    state: str = "queued"  # queued | running | finished


class QueueFull(Exception):
    pass


class DeviceQueue:
    """One thread per device runs the queued jobs one at a time (``run(job)`` appends the job's
    outcome to its log); jobs waiting are told their position whenever it changes."""

    def __init__(self, run: Callable[[ServerJob], None], max_queued: int, name: str = "oflsam2-device"):
        self._run = run
        self._max_queued = max_queued
        self._waiting: collections.deque = collections.deque()
        self._running: ServerJob | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: ServerJob) -> int:
        """Queue ``job``; returns the number of jobs ahead of it."""
        with self._condition:
            if self._stopping:
                raise QueueFull("The server is stopping; try again once it is back.")
            if len(self._waiting) >= self._max_queued:
                raise QueueFull(f"The server's queue is full ({self._max_queued} jobs wait for its device); try again "
                                "in a few minutes, or ask its administrator to raise --max-queued-jobs.")
            self._waiting.append(job)
            self._announce()
            self._condition.notify_all()
            return self._ahead(len(self._waiting) - 1)

    def cancel(self, job: ServerJob) -> None:
        """Stop ``job``: a waiting job ends at once, a running one at its next check."""
        with self._condition:
            job.token.cancel()
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = "finished"
                job.log.append({"event": "cancelled", "job": job.id})
                self._announce()

    def busy_with(self, session) -> bool:
        with self._condition:
            return any(j.session is session for j in self._waiting) or (
                self._running is not None and self._running.session is session)

    def stop(self, timeout: float) -> None:
        """Cancel every job and wait up to ``timeout`` seconds for the running one to end."""
        with self._condition:
            self._stopping = True
            for job in list(self._waiting):
                self.cancel(job)
            if self._running is not None:
                self._running.token.cancel()
            self._condition.notify_all()
        self._thread.join(timeout)

    def _ahead(self, index: int) -> int:
        return index + (1 if self._running is not None else 0)

    def _announce(self) -> None:
        for index, job in enumerate(self._waiting):
            job.log.append({"event": "queued", "job": job.id, "position": self._ahead(index)})

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
                job.state = "running"
                self._announce()
            try:
                self._run(job)
            finally:
                with self._condition:
                    job.state = "finished"
                    self._running = None
                    self._announce()
