"""Where cohort work runs: in this process (``local``) or on Ray actors (``ray``).

A *task* is a picklable callable ``task(engine, events) -> value`` (a ``functools.partial`` of a
module-level function); every task of one run shares one model, so an executor owns one
:class:`~oflsam2.api.Engine` per worker, built once. ``run(tasks, on_done)`` calls
``on_done(TaskOutcome)`` in the caller's thread as each task finishes, in finishing order.

A task that raises ``Exception`` finishes with ``error`` set (the run goes on) unless
``catch_errors=False``, where :class:`LocalExecutor` lets it propagate; ``Cancelled``,
``KeyboardInterrupt`` and any exception raised by ``on_done`` stop the run. Only
:class:`RayExecutor` retries: a task whose actor process died is run again on another actor
(at most :data:`MAX_RETRIES` times) and the dead actor is replaced.

This module never imports Ray unless a :class:`RayExecutor` is made. While one lives, Ray's own
notices (a dead actor's, printed by its error listener) go to stderr, never to the command's
stdout (``--json``); and Ctrl+C and SIGTERM keep the command's handlers (Ray's would exit 1, or
abort with a C++ dump on SIGTERM, instead of 130 / 143 with the finished cases kept).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import Cancelled, InputError, OFLSAM2Error

EXECUTORS = ("local", "ray")
MAX_RETRIES = 2
RAY_INSTALL_HINT = "Install the Ray extra: pip install 'oflsam2[ray]' (or, in a source checkout, pip install '.[ray]')."


@dataclass
class TaskOutcome:
    index: int  # position in the task list
    value: object = None  # what the task returned (None when it failed)
    error: str | None = None  # "<message>" of the exception the task raised
    error_kind: str | None = None  # that exception's class name
    attempts: int = 1  # 1 + retries after a worker died
    worker: int = 0  # process id that ran the (last) attempt
    seconds: float = 0.0  # wall time of the last attempt, in the worker


MODEL_LOADS = 0  # models loaded by build_engine in this process (the benchmark reports it)


def build_engine(settings, max_cached_volumes: int):
    """An Engine whose model is loaded now; counts the load in :data:`MODEL_LOADS`."""
    from .api import Engine
    from .backend import load_sam2

    global MODEL_LOADS
    model = load_sam2(settings)
    MODEL_LOADS += 1
    return Engine(settings, max_cached_volumes=max_cached_volumes, model=model)


def run_task(task, engine, events, catch_errors: bool = True) -> TaskOutcome:
    """Run one task, turning an ordinary exception into the outcome's ``error``."""
    started = time.perf_counter()
    value, error, kind = None, None, None
    try:
        value = task(engine, events)
    except Cancelled:
        raise
    except Exception as exc:  # a bad case must not end the cohort; its message goes to the table
        if not catch_errors:
            raise
        kind = type(exc).__name__
        error = str(exc) if isinstance(exc, OFLSAM2Error) else f"{kind}: {exc}"
    return TaskOutcome(-1, value, error, kind, worker=os.getpid(), seconds=time.perf_counter() - started)


class LocalExecutor:
    """Every task in this process, in order, on one Engine built on the first task."""

    name = "local"

    def __init__(self, engine_factory: Callable[[], object]):
        self._engine_factory = engine_factory
        self._engine = None

    def run(
        self,
        tasks: Sequence,
        on_done: Callable[[TaskOutcome], None],
        events_for: Callable[[int], object] | None = None,
        catch_errors: bool = True,
    ) -> None:
        """``events_for(index)`` gives the events of a task (progress of the case being run)."""
        for index, task in enumerate(tasks):
            if self._engine is None:
                self._engine = self._engine_factory()
            outcome = run_task(task, self._engine, events_for(index) if events_for else None, catch_errors)
            outcome.index = index
            on_done(outcome)

    def model_loads(self) -> list[int]:
        return [MODEL_LOADS]

    def close(self) -> None:
        self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_executor(kind: str, settings, *, max_cached_volumes: int, address: str | None = None, workers: int | None = None):
    """The executor ``kind`` (``local`` or ``ray``) for a run on model ``settings``."""
    if kind == "local":
        if address is not None or workers is not None:
            raise InputError("--address and --workers apply to --executor ray only.")
        return LocalExecutor(lambda: build_engine(settings, max_cached_volumes))
    if kind == "ray":
        return RayExecutor(settings, max_cached_volumes=max_cached_volumes, address=address, workers=workers)
    raise InputError(f"Unknown executor {kind!r}; choose one of: {', '.join(EXECUTORS)}.")


def add_executor_options(parser) -> None:
    """``--executor``, ``--address``, ``--workers`` (shared by ``batch`` and ``experiment``)."""
    group = parser.add_argument_group("executor")
    group.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="run cases in this process (local, default) or on Ray actors (ray)"
    )
    group.add_argument("--address", help="Ray cluster to join, e.g. 10.0.0.5:6379 (default: start a local Ray instance)")
    group.add_argument("--workers", type=int, help="Ray actors: default one per GPU, else CPU cores // 2 (at least 1)")


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--executor ray needs Ray, which is not installed. {RAY_INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Tasks spread over Ray actors, each owning one Engine (model loaded once per actor).

    With CUDA in the cluster: one actor per GPU (``num_gpus=1``) unless ``workers`` says fewer.
    Without: ``workers`` CPU actors (default cores // 2, at least 1), each given an equal share
    of the cluster's CPUs as torch threads. ``address=None`` starts a local Ray instance (shut
    down by :meth:`close`); an address joins that cluster. A Ray already initialised in this
    process (tests) is used as it is and left running.
    """

    name = "ray"

    def __init__(self, settings, *, max_cached_volumes: int, address: str | None = None, workers: int | None = None):
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be at least 1; got {workers}.")
        self._ray = import_ray()
        self._settings = settings
        self._max_cached_volumes = max_cached_volumes
        self._started_ray = False
        self._stdout = None
        if address is not None:
            _check_reachable(address)
        if not self._ray.is_initialized():
            self._start_or_join(address, workers)
        self._plan(workers)
        self._actors: list = []
        self.pids: dict = {}  # actor -> its process id
        self.replaced = 0  # actors that died and were replaced
        # Called as on_dispatch(task index, attempt, actor process id) when a task is handed to an actor.
        self.on_dispatch: Callable[[int, int, int], None] | None = None
        self._stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's error listener prints on sys.stdout

    def _start_or_join(self, address: str | None, workers: int | None) -> None:
        import logging

        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address is None:
            cores = os.cpu_count() or 1
            options["num_cpus"] = max(cores, workers or 1)
        else:
            options["address"] = address
        with _signal_handlers_kept():
            try:
                self._ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise InputError(f"Could not start or join {where}: {exc}") from None
        self._started_ray = True

    def _plan(self, workers: int | None) -> None:
        resources = self._ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus and self._settings.device in ("auto", "cuda"):
            self.workers = min(workers or gpus, gpus)
            self._actor_options = {"num_gpus": 1, "num_cpus": 1}
            self.threads = max(1, cpus // self.workers)
        else:
            self.workers = workers or max(1, cpus // 2)
            share = max(1, cpus // self.workers)
            self._actor_options = {"num_cpus": share}
            self.threads = share

    def _new_actor(self):
        actor = _engine_actor_class(self._ray).options(**self._actor_options, max_restarts=0).remote(
            self._settings, self._max_cached_volumes, self.threads
        )
        self._actors.append(actor)
        return actor

    def _start_actors(self) -> None:
        for _ in range(self.workers):
            self._new_actor()
        try:
            pids = self._ray.get([a.pid.remote() for a in self._actors])
        except self._ray.exceptions.RayActorError as exc:
            raise OFLSAM2Error(f"A Ray worker could not start: {_first_line(exc)}") from None
        self.pids = dict(zip(self._actors, pids))

    def run(self, tasks: Sequence, on_done: Callable[[TaskOutcome], None], events_for=None, catch_errors: bool = True) -> None:
        """Dispatch every task; each actor holds one task at a time (the next goes to whoever is free).

        ``events_for`` is not used (progress inside an actor stays there); errors always come
        back as the outcome's ``error``, whatever ``catch_errors`` says.
        """
        ray = self._ray
        if not self._actors:
            self._start_actors()
        pending = list(range(len(tasks)))[::-1]  # popped from the end: first task first
        attempts = dict.fromkeys(range(len(tasks)), 0)
        running: dict = {}  # object ref -> (task index, actor)
        idle = list(self._actors)
        while pending or running:
            while pending and idle:
                index, actor = pending.pop(), idle.pop(0)
                attempts[index] += 1
                running[actor.run.remote(tasks[index])] = (index, actor)
                if self.on_dispatch is not None:
                    self.on_dispatch(index, attempts[index], self.pids.get(actor))
            finished, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(finished[0])
            try:
                outcome = ray.get(finished[0])
            except ray.exceptions.RayActorError as exc:
                replacement = self._replace(actor)
                idle.append(replacement)
                if attempts[index] <= MAX_RETRIES:
                    pending.append(index)  # next in line, on whichever actor is free
                    continue
                outcome = TaskOutcome(index, error=f"its worker died {attempts[index]} times (last: {_first_line(exc)})")
            else:
                idle.append(actor)
            outcome.index, outcome.attempts = index, attempts[index]
            on_done(outcome)

    def _replace(self, dead):
        self._actors.remove(dead)
        self.pids.pop(dead, None)
        self._ray.kill(dead, no_restart=True)
        actor = self._new_actor()
        self.pids[actor] = self._ray.get(actor.pid.remote())
        self.replaced += 1
        return actor

    def model_loads(self) -> list[int]:
        """Models loaded by each live actor (1 each: an actor loads its model once)."""
        return self._ray.get([a.model_loads.remote() for a in self._actors])

    def close(self) -> None:
        try:
            for actor in self._actors:
                self._ray.kill(actor, no_restart=True)
            self._actors, self.pids = [], {}
            if self._started_ray:
                self._ray.shutdown()
                self._started_ray = False
        finally:
            if self._stdout is not None:
                sys.stdout, self._stdout = self._stdout, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _signal_handlers_kept:
    """Put SIGINT's and SIGTERM's handlers back after the block: ``ray.init`` sets its own for
    SIGTERM (``sys.exit``) and its core worker a C++ one that aborts with a stack dump."""

    def __enter__(self):
        self._saved = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(number)
                if handler is not None:  # None: set outside Python, cannot be put back
                    self._saved[number] = handler
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._saved.items():
            signal.signal(number, handler)  # also replaces a C-level handler installed meanwhile


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a plain message: Ray itself waits a long time for an absent cluster."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address!r}: give HOST:PORT of a Ray head node, e.g. 10.0.0.5:6379.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(
            f"Cannot reach a Ray cluster at {address} ({exc.strerror or exc}). Start one with `ray start --head` "
            "on the head machine and pass the address it prints, or leave out --address to run on this machine."
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_ACTOR_CLASS = None


def _engine_actor_class(ray):
    """The Ray actor class, made on first use so that importing this module never needs Ray."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(EngineWorker)
    return _ACTOR_CLASS


class EngineWorker:
    """The body of one Ray actor: an Engine built at start, then one task per call."""

    def __init__(self, settings, max_cached_volumes: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self._engine = build_engine(settings, max_cached_volumes)

    def run(self, task) -> TaskOutcome:
        return run_task(task, self._engine, None)

    def pid(self) -> int:
        return os.getpid()

    def model_loads(self) -> int:
        return MODEL_LOADS
