"""Client of the persistent engine worker process (``python -m oflsam2.worker``).

Slicer's main thread holds the Python GIL while it idles in the Qt event loop (PythonQt thread
support is off), so a worker *thread* would only advance during timer ticks. The engine therefore
runs in a process of its own, started once with Slicer's Python (``sys.executable``, which Slicer
sets to ``PythonSlicer``) and kept for the session: the model and the features of the last
volumes stay loaded between runs. A crash, a kill or the system's out-of-memory killer ends only
that process; the run fails with a clear error and the next run starts a new one.

The main thread submits requests and drains each job's queue (from a Qt timer, or between short
timed waits in blocking mode). A reader thread turns the worker's JSON-line events into messages
(:class:`MessageKind`); result planes arrive as ``.npy`` files in a private temp folder and are
loaded on the main thread, with ``allow_pickle=False``. Nothing here imports ``slicer`` or ``qt``.

Messages on ``Job.results`` / ``Job.messages()``:

- ``(PROGRESS, stage, done, total, text)``
- ``(SLICE, label, axis, index, mask_uint8)`` -- a final 2-D mask, 0/1
- ``(DONE, summary)`` -- ``summary`` is a dict (``method``, ``axis``, ``info`` for a segment run)
- ``(ERROR, exc, traceback_text)`` -- :class:`GpuOutOfMemory` marks a recoverable OOM,
  :class:`WorkerDied` a worker that ended without answering
- ``(CANCELLED,)``

The transport (pipes to a local process, a thread for tests with fake engines, or HTTP(S) to an
``oflsam2 serve`` server: :class:`~.server_transport.HttpTransport`) sits behind :class:`Transport`.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import enum
import io
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from oflsam2 import errors as engine_errors
from oflsam2.errors import OFLSAM2Error
from oflsam2.worker import PROTOCOL_VERSION, Server, is_out_of_memory

from .process_tree import process_tree

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 5.0  # after a cancel message, the worker is killed if the job has not ended
SHUTDOWN_SECONDS = 5.0
START_TIMEOUT_SECONDS = 120.0  # from the start to the worker's hello (it imports only numpy by then)
STDERR_LINES_KEPT = 30  # the worker's last stderr lines, quoted when it dies
# CTKAppLauncher (PythonSlicer) when its child ended by a signal or crashed: this line on stderr,
# then exit code 1 (ctkAppLauncherPrivate::applicationFinished, QProcess::CrashExit).
LAUNCHER_ABNORMAL_EXIT = re.compile(r"^error: \[.*\] exit abnormally - Report the problem\.$")
LAUNCHER_ABNORMAL_EXIT_CODE = 1


class MessageKind(str, enum.Enum):
    """First item of every job message (a ``str`` enum: equal to the plain names)."""

    PROGRESS = "progress"
    SLICE = "slice"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


TERMINAL_KINDS = (MessageKind.DONE, MessageKind.ERROR, MessageKind.CANCELLED)


class GpuOutOfMemory(OFLSAM2Error):
    """The GPU ran out of memory; the worker freed its caches and can run again."""

    def __init__(self, device_hint: str = ""):
        super().__init__(
            "The GPU ran out of memory"
            + (f" ({device_hint})" if device_hint else "")
            + ". The model and its caches were released. Run again on the CPU (Device: cpu), "
            "with a smaller image size (Advanced > Image size, e.g. 512), or with fewer segments at once."
        )


class WorkerDied(RuntimeError):
    """The worker process ended (crash, kill, out of memory) before the job finished."""


class WorkerError(Exception):
    """An error raised in the worker whose type does not exist on this side."""


class WorkerStartError(OFLSAM2Error):
    """The worker could not be started, or a request's arrays could not be handed to it."""


WORKER_FIX = ("It must run with Slicer's own Python (PythonSlicer, which Slicer sets as sys.executable) and "
              "find the extension's packages (numpy, torch, sam2): restart Slicer so that the module installs "
              "them, or reinstall the extension.")


# ---------------------------------------------------------------------------------------------
# Requests


def _owned(array: np.ndarray) -> np.ndarray:
    """The array itself if it owns its memory, else a copy: never keep a view of a Slicer volume
    that the main thread may modify before the request is sent."""
    array = np.asarray(array)
    return array if array.flags.owndata and array.flags.c_contiguous else np.array(array, copy=True, order="C")


def _save(folder: Path, name: str, array: np.ndarray) -> str:
    np.save(folder / name, np.ascontiguousarray(array), allow_pickle=False)
    return name


@dataclass
class SegmentRequest:
    """One ``Engine.segment`` call. Arrays are (z, y, x); the request takes ownership of them."""

    settings: object  # oflsam2.api.ModelSettings
    image: np.ndarray
    supports: list  # [oflsam2.api.LabelSupport]
    method: str = "ofl"
    axis: int = 0
    preset: str = "auto"
    options: object = None  # oflsam2.api.MethodOptions
    references: list = field(default_factory=list)  # [oflsam2.api.Reference]
    previous_job: int | None = None  # update the result of this earlier job of the same worker process

    def __post_init__(self):
        self.image = _owned(self.image)
        for support in self.supports:
            support.mask = _owned(support.mask)
        for reference in self.references:
            reference.image = _owned(reference.image)
            reference.labels = _owned(reference.labels)

    def to_message(self, folder: Path) -> dict:
        """The request line; the arrays are written into ``folder``."""
        from oflsam2.api import MethodOptions

        options = self.options if self.options is not None else MethodOptions()
        return {
            "type": "segment",
            "folder": str(folder),
            "settings": dataclasses.asdict(self.settings),
            "options": dataclasses.asdict(options),
            "method": self.method,
            "axis": int(self.axis),
            "preset": self.preset,
            "image": _save(folder, "image.npy", self.image),
            "supports": [
                {"label": int(s.label), "name": s.name, "slices": [int(i) for i in s.slices],
                 "mask": _save(folder, f"support-{n}.npy", s.mask)}
                for n, s in enumerate(self.supports)
            ],
            "references": [
                {"name": r.name, "image": _save(folder, f"reference-{n}-image.npy", r.image),
                 "labels": _save(folder, f"reference-{n}-labels.npy", r.labels)}
                for n, r in enumerate(self.references)
            ],
            **({"previous_job": int(self.previous_job)} if self.previous_job is not None else {}),
        }


@dataclass
class DownloadRequest:
    """Fetch a checkpoint of the manifest into the user cache (SHA256-verified by ``oflsam2.checkpoints``)."""

    model: str

    def to_message(self, folder: Path) -> dict:
        return {"type": "download", "model": self.model}


# ---------------------------------------------------------------------------------------------
# Transports


class Transport:
    """A connection to one worker: request lines out, event lines in.

    ``on_event(transport, event)`` is called on a reader thread for every event, then once with
    ``event=None`` when the connection ends (the worker exited or was killed).
    """

    def __init__(self, on_event: Callable[["Transport", dict | None], None]):
        self._on_event = on_event
        self._send_lock = threading.Lock()
        self._input = None  # text stream to the worker
        self._reader = None
        self.connection_ended = False  # the worker's events stream closed: it cannot serve any more
        self.said_hello = False  # the worker started and sent its hello
        self.start_timed_out = False  # killed for not saying hello in time
        self.start_timer: threading.Timer | None = None
        self.command: list | None = None  # how the worker was started, quoted when it cannot start
        self.root: Path | None = None  # the folder the worker accepts request folders in (None: the transport's own rule)
        self.interpreter_pid: int | None = None  # the pid the worker reported in its hello (behind any launcher)
        self.kill_reason = ""  # why this side ended the worker, when it did

    def send(self, message: dict) -> None:
        line = json.dumps(message) + "\n"
        with self._send_lock:
            if self._input is None:
                raise BrokenPipeError("the worker connection is closed")
            self._input.write(line)
            self._input.flush()

    def close_input(self) -> None:
        """End of requests: the worker stops after cancelling its current job."""
        with self._send_lock:
            if self._input is not None:
                try:
                    self._input.close()
                except OSError:
                    pass
                self._input = None

    def _start_reader(self, output) -> None:
        self._reader = threading.Thread(target=self._read, args=(output,), name="OFLSAM2WorkerReader", daemon=True)
        self._reader.start()

    def _read(self, output) -> None:
        try:
            for line in output:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if not isinstance(event, dict):  # a library printing to stdout before the worker took it over
                    log.warning("OFLSAM2 worker: ignoring a line that is not an event: %r", line[:200])
                    continue
                try:
                    self._on_event(self, event)
                except Exception:  # one bad event must not end the connection to a live worker
                    log.exception("OFLSAM2 worker: ignoring an event that could not be handled: %r", line[:200])
        except (OSError, ValueError):
            pass
        finally:
            self.connection_ended = True
            self._on_event(self, None)

    # To be provided by each transport
    alive: bool
    pid: int | None

    def adopt(self, pid: int) -> None:
        """The worker reported its own pid (``hello``): the interpreter behind any launcher."""
        self.interpreter_pid = pid

    def kill(self, reason: str = "") -> None:
        """End the worker and everything it started; ``reason`` is quoted if a job was still running."""
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what the transport holds once the worker has ended."""

    def wait(self, timeout: float) -> bool:
        """Wait until the worker has ended; True if it did."""
        raise NotImplementedError

    def exit_description(self) -> str:
        return ""

    def failure_reason(self) -> str | None:
        """The whole message for the runs a lost connection ends, when the transport knows it
        better than the worker's own wording (a server that stopped answering)."""
        return None


def default_python() -> str:
    """The interpreter that runs the worker: ``sys.executable``, which Slicer sets to its
    ``PythonSlicer`` launcher (the same environment and packages as Slicer's own Python)."""
    return sys.executable


def engine_folder() -> str:
    """The folder that holds the ``oflsam2`` package (the module folder in Slicer)."""
    import oflsam2

    return os.path.dirname(os.path.dirname(os.path.abspath(oflsam2.__file__)))


class ProcessTransport(Transport):
    """``<python> -m oflsam2.worker [--root ROOT]`` with pipes; stderr is kept for the error message.

    In Slicer ``<python>`` is the ``PythonSlicer`` launcher, whose child is the interpreter
    (see :mod:`.process_tree`): ``kill`` ends the launcher, the interpreter and whatever they started.
    """

    def __init__(self, on_event, python: str | None = None, extra_env: dict | None = None, root: Path | None = None):
        super().__init__(on_event)
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_folder(), env.get("PYTHONPATH", "")) if p)
        env.update(extra_env or {})
        self._tree = process_tree()
        self.command = [python or default_python(), "-m", "oflsam2.worker", *(["--root", str(root)] if root else [])]
        self.root = Path(root) if root else None
        try:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                cwd=engine_folder(), **self._tree.popen_options(),
            )
        except OSError as exc:
            raise WorkerStartError(f"The OFLSAM2 worker could not start with the interpreter {self.command[0]!r}: "
                                   f"{exc.strerror or exc}. {WORKER_FIX}") from exc
        self._tree.started(self._process)
        self.pid = self._process.pid
        self._input = io.TextIOWrapper(self._process.stdin, encoding="utf-8", newline="\n", write_through=True)
        self.stderr_tail: collections.deque = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_reader = threading.Thread(target=self._read_stderr, name="OFLSAM2WorkerStderr", daemon=True)
        self._stderr_reader.start()
        self._start_reader(io.TextIOWrapper(self._process.stdout, encoding="utf-8", newline="\n"))

    @property
    def alive(self) -> bool:
        return self._process.poll() is None and not self.connection_ended

    def adopt(self, pid: int) -> None:
        super().adopt(pid)
        self._tree.adopt(pid)

    def kill(self, reason: str = "") -> None:
        self.kill_reason = self.kill_reason or reason
        self._tree.kill()  # also when the launcher has ended: the interpreter may live on
        if self._process.poll() is None:
            self._process.kill()

    def release(self) -> None:
        self._tree.close()

    def wait(self, timeout: float) -> bool:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._stderr_reader.join(1.0)
        if self._reader is not None:
            self._reader.join(1.0)
        return True

    def exit_description(self) -> str:
        try:
            code = self._process.wait(2.0)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        self._stderr_reader.join(1.0)
        tail = list(self.stderr_tail)
        if self.kill_reason:
            how = f"it was stopped: {self.kill_reason}"
        elif code == LAUNCHER_ABNORMAL_EXIT_CODE and tail and LAUNCHER_ABNORMAL_EXIT.match(tail[-1]):
            # What PythonSlicer tells when its python-real died of a signal: the signal itself never reaches us.
            tail.pop()
            how = ("the Python interpreter behind Slicer's launcher (PythonSlicer) ended abnormally: it was killed, "
                   "for instance by the system when memory ran out, or it crashed")
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"it was killed ({name})"
            if -code == getattr(signal, "SIGKILL", 9):
                how += ", for instance by the system when memory ran out"
        else:
            how = f"it exited with code {code}"
        tail = "\n".join(tail)
        return how + (f". Its last output:\n{tail}" if tail else "")

    def _read_stderr(self) -> None:
        for raw in self._process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(line)
            log.debug("OFLSAM2 worker: %s", line)


class ThreadTransport(Transport):
    """The same worker loop and protocol on a thread of this process, with ``engine_factory``.

    For tests whose fake engines (events, gates) cannot cross a process boundary; Slicer uses
    :class:`ProcessTransport`. ``kill`` can only close the requests stream here.
    """

    def __init__(self, on_event, engine_factory, root: Path | None = None):
        super().__init__(on_event)
        requests_read, requests_write = os.pipe()
        events_read, events_write = os.pipe()
        self.pid = None
        self.root = Path(root) if root else None
        self._input = open(requests_write, "w", encoding="utf-8", newline="\n")
        server_in = open(requests_read, "rb")
        server_out = open(events_write, "w", encoding="utf-8", newline="\n")

        def serve():
            try:
                Server(server_out, engine_factory, root=root).serve(server_in)
            finally:  # however the loop ends (even SystemExit), the client sees the end of events
                server_out.close()

        self._thread = threading.Thread(target=serve, name="OFLSAM2WorkerThread", daemon=True)
        self._thread.start()
        self._start_reader(open(events_read, "r", encoding="utf-8", newline="\n"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.connection_ended

    def kill(self, reason: str = "") -> None:
        self.kill_reason = self.kill_reason or reason
        self.close_input()

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def exit_description(self) -> str:
        return "its thread ended"


# ---------------------------------------------------------------------------------------------
# Jobs and the worker


class Job:
    """A handle on one submitted request: its message queue, cancel flag and completion."""

    def __init__(self, worker: "Worker", job_id: int, request, folder: Path, transport: Transport):
        self.id = job_id
        self.transport = transport  # the worker connection that runs it
        self.request = request
        self.folder = folder
        self.results: queue.Queue = queue.Queue()
        self.finished = threading.Event()  # set after the final message was queued
        self._worker = worker
        self._cancel = threading.Event()
        self._kill_timer: threading.Timer | None = None

    def put(self, *message) -> None:
        self.results.put(message)

    def cancel(self) -> None:
        """Ask the worker to stop this job; kill the worker if it has not within the grace period."""
        if self._cancel.is_set() or self.finished.is_set():
            self._cancel.set()
            return
        self._cancel.set()
        self._worker._send_cancel(self)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def messages(self):
        """Messages queued so far, without waiting (main thread: planes are loaded here)."""
        while True:
            try:
                message = self.results.get_nowait()
            except queue.Empty:
                return
            if message[0] == MessageKind.SLICE:
                path = message[4]
                try:
                    message = (*message[:4], np.load(path, allow_pickle=False))
                except (OSError, ValueError) as exc:  # the run fails (and restores) instead of the timer
                    if self.cancel_requested:  # a cancelled run writes no plane: its outcome comes next
                        continue
                    message = (MessageKind.ERROR, WorkerError(f"A result plane from the worker could not be read: {exc}"), "")
                finally:
                    _remove(path)
            elif message[0] in TERMINAL_KINDS:
                shutil.rmtree(self.folder, ignore_errors=True)
            yield message


def _remove(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# Evaluated at import: typing's Optional, since Slicer < 5.10 (Python 3.9) must import this file.
TransportFactory = Callable[[Callable[[Transport, Optional[dict]], None]], Transport]


class Worker:
    """The session's connection to the engine worker; starts (and restarts) it on demand.

    - default: a separate process, ``python -m oflsam2.worker`` (``python``: the interpreter,
      default :func:`default_python`);
    - ``engine_factory``: the same worker loop on a thread of this process, building engines
      with ``engine_factory(settings)`` (tests with fake engines);
    - ``transport_factory``: any other :class:`Transport` (e.g. a remote worker).

    The requests' arrays go through a private temp folder (mode 0700), the *root* the first two
    kinds of worker are started with: they refuse any request folder outside it.

    ``active_run`` is the run this worker serves (one at a time per session: they share the
    model and may write to the same segmentation).
    """

    def __init__(self, engine_factory=None, *, python: str | None = None, transport_factory: TransportFactory | None = None,
                 grace_seconds: float = CANCEL_GRACE_SECONDS, start_timeout: float = START_TIMEOUT_SECONDS):
        if transport_factory is None:
            if engine_factory is not None:
                transport_factory = lambda on_event, root: ThreadTransport(on_event, engine_factory, root)  # noqa: E731
            else:
                transport_factory = lambda on_event, root: ProcessTransport(on_event, python, root=root)  # noqa: E731
            self._transport_gets_root = True
        else:
            self._transport_gets_root = False
        self._transport_factory = transport_factory
        self.grace_seconds = grace_seconds
        self.start_timeout = start_timeout
        self.active_run = None
        self.transport: Transport | None = None
        self.started_at: float | None = None
        self.startup_seconds: float | None = None  # from start to the worker's hello
        self.protocol: int | None = None
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._root: Path | None = None

    # -----------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.transport is not None and self.transport.alive

    @property
    def pid(self) -> int | None:
        """The process this side started (in Slicer: the PythonSlicer launcher)."""
        return self.transport.pid if self.transport is not None else None

    @property
    def interpreter_pid(self) -> int | None:
        """The worker's own process, as it reported it (in Slicer: python-real, the launcher's child)."""
        return self.transport.interpreter_pid if self.transport is not None else None

    def start(self) -> None:
        """Start the worker now if it is not running (``submit`` does it on demand)."""
        with self._lock:
            self._ensure_running()

    def submit(self, request) -> Job:
        with self._lock:
            self._ensure_running()
            job_id = next(self._ids)
            folder = self._root / f"job-{job_id}"
            folder.mkdir(mode=0o700)
            transport = self.transport
            job = Job(self, job_id, request, folder, transport)
            try:
                message = request.to_message(folder)
            except OSError as exc:  # e.g. the temp disk is full: no partial arrays stay behind
                shutil.rmtree(folder, ignore_errors=True)
                free = shutil.disk_usage(self._root).free >> 20
                raise WorkerStartError(
                    f"Could not write the run's arrays into the temp folder {str(self._root)!r} ({free} MiB free): "
                    f"{exc}. Free space there, or set TMPDIR to a folder on a disk with room and restart Slicer."
                ) from exc
            message["job"] = job_id
            self._jobs[job_id] = job
        try:
            transport.send(message)
        except OSError:  # the worker died just now: the reader reports it to this job
            pass
        except Exception:  # a request that cannot be sent (not JSON): the job never existed
            with self._lock:
                self._jobs.pop(job_id, None)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS, reason: str = "the worker was shut down") -> None:
        """Stop the worker (its current job is cancelled) and remove the temp folder; the next
        ``submit`` starts a new one. Kills it if it has not ended after ``timeout`` seconds, and
        anything it started that outlived it; a job still running is told ``reason``."""
        with self._lock:
            transport, self.transport = self.transport, None
            root, self._root = self._root, None
        if transport is not None:
            transport.kill_reason = transport.kill_reason or reason
            if transport.start_timer is not None:
                transport.start_timer.cancel()
            try:
                transport.send({"type": "shutdown"})
            except OSError:
                pass
            transport.close_input()
            if not transport.wait(timeout):
                transport.kill(f"{reason}, and it did not stop within {timeout:.0f} s")
                transport.wait(timeout)
            transport.kill()  # what it started and left behind
            transport.release()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def kill(self, reason: str = "it was killed on request") -> None:
        """End the worker and everything it started at once; its jobs are told ``reason``."""
        transport = self.transport
        if transport is not None:
            transport.kill(reason)

    # -----------------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        """The root, then a worker that serves it."""
        self._ensure_root()
        try:
            self._ensure_started()
        except BaseException:
            try:  # nothing was written into a new root yet
                self._root.rmdir()
            except OSError:
                pass
            raise

    def _ensure_started(self) -> None:
        if self.transport is not None and self.transport.alive:
            if self.transport.root in (None, self._root):
                return
            self.transport.close_input()  # it serves a root that is gone: it ends by itself, a new one serves the new root
        elif self.transport is not None:  # ended, or only its launcher did: nothing of it may stay behind
            old = self.transport
            if old.start_timer is not None:
                old.start_timer.cancel()
            old.close_input()
            old.kill("a new worker replaced it")
            old.release()
        self.protocol = self.startup_seconds = None
        self.started_at = time.perf_counter()
        if self._transport_gets_root:
            self.transport = self._transport_factory(self._on_event, self._root)
        else:
            self.transport = self._transport_factory(self._on_event)
        timer = threading.Timer(self.start_timeout, self._kill_if_silent, args=(self.transport,))
        timer.daemon = True
        self.transport.start_timer = timer
        timer.start()

    def _ensure_root(self) -> None:
        """The private temp folder, made again (under the same name, which the running worker
        serves, if it is still free) if something removed it while the worker lived."""
        if self._root is not None and not self._root.is_dir():
            try:
                self._root.mkdir(mode=0o700)
            except OSError:  # taken by something else meanwhile: a new root, and so a new worker
                self._root = None
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="oflsam2-worker-"))  # mode 0700: this user only
            # Removed also when this Worker is dropped or Python exits without shutdown().
            weakref.finalize(self, shutil.rmtree, str(self._root), True)

    def _kill_if_silent(self, transport: Transport) -> None:
        if not transport.said_hello and not transport.connection_ended:
            log.warning("OFLSAM2: the worker did not start within %.0f s; killing it", self.start_timeout)
            transport.start_timed_out = True
            transport.kill(f"it did not start within {self.start_timeout:.0f} s")

    def _send_cancel(self, job: Job) -> None:
        transport = job.transport
        try:
            transport.send({"type": "cancel", "job": job.id})
        except OSError:
            return
        timer = threading.Timer(self.grace_seconds, self._kill_if_running, args=(job, transport))
        timer.daemon = True
        job._kill_timer = timer
        timer.start()

    def _kill_if_running(self, job: Job, transport: Transport) -> None:
        if not job.finished.is_set():
            log.warning("OFLSAM2: the worker did not stop within %.0f s of the cancel; killing it", self.grace_seconds)
            transport.kill(f"it did not stop within {self.grace_seconds:.0f} s of the cancel")

    def _on_event(self, transport: Transport, event: dict | None) -> None:
        """Reader thread: route one worker event to its job."""
        if event is None:
            self._connection_ended(transport)
            return
        kind = event.get("event")
        if kind == "hello":
            transport.said_hello = True
            if transport.start_timer is not None:
                transport.start_timer.cancel()
            self.protocol = event.get("protocol")
            if self.started_at is not None:
                self.startup_seconds = time.perf_counter() - self.started_at
            if self.protocol != PROTOCOL_VERSION:
                log.error("OFLSAM2 worker speaks protocol %s, this module %s", self.protocol, PROTOCOL_VERSION)
                transport.kill(f"it speaks protocol {self.protocol}, this module {PROTOCOL_VERSION}")
            elif isinstance(event.get("pid"), int):
                transport.adopt(event["pid"])
            return
        job = self._jobs.get(event.get("job"))
        if job is None or job.transport is not transport:
            return
        if kind == "progress":
            job.put(MessageKind.PROGRESS, event["stage"], int(event["done"]), int(event["total"]), event.get("text", ""))
        elif kind == "slice":
            path = job.folder / os.path.basename(event["file"])
            job.put(MessageKind.SLICE, int(event["label"]), int(event["axis"]), int(event["index"]), path)
        elif kind == "done":
            self._finish(job, MessageKind.DONE, event.get("summary", {}))
        elif kind == "cancelled":
            self._finish(job, MessageKind.CANCELLED)
        elif kind == "error":
            self._finish(job, MessageKind.ERROR, rebuild_error(event), event.get("traceback", ""))

    def _finish(self, job: Job, *message) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)
        if job._kill_timer is not None:
            job._kill_timer.cancel()
        job.put(*message)
        job.finished.set()

    def _connection_ended(self, transport: Transport) -> None:
        """The worker is gone: every job it had not finished ends now."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.transport is transport]
        if not jobs:
            return
        if transport.failure_reason():
            reason = transport.failure_reason()
        elif self.protocol is not None and self.protocol != PROTOCOL_VERSION:
            reason = (f"The OFLSAM2 worker speaks protocol {self.protocol}, this module {PROTOCOL_VERSION}: "
                      "the module files are from different versions. Reinstall the extension and restart Slicer.")
        elif not transport.said_hello:
            command = " ".join(transport.command) if transport.command else "the worker"
            how = (f"it did not start within {self.start_timeout:.0f} s" if transport.start_timed_out
                   else transport.exit_description())
            reason = f"The OFLSAM2 worker could not start ({command}): {how}.\n{WORKER_FIX}"
        else:
            how = transport.exit_description()
            reason = ("The OFLSAM2 worker process stopped without finishing the run"
                      + (f" ({how})" if how and "\n" not in how else "")
                      + ". The next run starts a new worker." + (f"\n{how}" if "\n" in how else ""))
        for job in jobs:
            if job.cancel_requested:
                self._finish(job, MessageKind.CANCELLED)
            else:
                self._finish(job, MessageKind.ERROR, WorkerDied(reason), "")


def rebuild_error(event: dict) -> BaseException:
    """The worker's exception on this side, from its type name and message (never unpickled):
    ``oflsam2.errors`` types and built-in exceptions keep their type, others become
    :class:`WorkerError`; an out-of-memory error becomes :class:`GpuOutOfMemory`."""
    name, module, message = event.get("error_type", "Exception"), event.get("error_module", ""), event.get("message", "")
    if event.get("out_of_memory"):
        error = GpuOutOfMemory(event.get("device_hint", ""))
        error.__cause__ = WorkerError(f"{name}: {message}")
        return error
    cls = None
    if module == engine_errors.__name__:
        cls = getattr(engine_errors, name, None)
    elif module == "builtins":
        cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return WorkerError(f"{name}: {message}" if message else name)


__all__ = [
    "CANCEL_GRACE_SECONDS", "DownloadRequest", "GpuOutOfMemory", "Job", "MessageKind", "ProcessTransport",
    "SegmentRequest", "ThreadTransport", "Transport", "Worker", "WorkerDied", "WorkerError", "WorkerStartError",
    "default_python",
    "is_out_of_memory", "rebuild_error",
]
