"""One client's runs on the engine: what the pipe worker (:mod:`oflsam2.worker`) and the server
(:mod:`oflsam2.server`) share.

An :class:`EngineSession` turns a ``segment`` request (the worker protocol's fields, see
:mod:`oflsam2.worker`) into an ``Engine.segment`` call and keeps what the client's next run may
need: its engine (so the model and the encoded slices of its volumes stay loaded), the result of
its latest segment job (an update starts from it) and, for ``ofl``, the head that job trained
(an update warm-starts it), in a private folder. How arrays arrive (``load``) and how result
planes leave (:class:`PlaneEvents`) is the caller's business: files in a shared folder for the
pipe worker, uploads and streamed events for the server.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ProtocolError

EngineFactory = Callable[[object], object]  # ModelSettings -> an Engine-like object with segment()
ArrayLoader = Callable[[str], np.ndarray]  # a request's array name -> the array (never a pickle)
Send = Callable[[dict], None]

LOST_RESULT = ("The engine no longer holds the result of that run (the worker or server was restarted, its session "
               "expired, or another run came after it); run a fresh segmentation instead of an update.")


def default_engine_factory(settings):
    from .api import Engine

    return Engine(settings)


class PlaneEvents:
    """:class:`oflsam2.events.RunEvents` that send each event at once; :meth:`deliver` says how a
    finished plane travels (a field or two added to its ``slice`` event)."""

    def __init__(self, send: Send, job, token):
        self._send = send
        self._job = job
        self._token = token
        self.sent: dict[int, set[int]] = {}

    def progress(self, stage, done, total, message=""):
        self._send({"event": "progress", "job": self._job, "stage": stage, "done": int(done), "total": int(total),
                    "text": message})

    def slice_done(self, label, axis, index, mask):
        plane = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
        event = {"event": "slice", "job": self._job, "label": int(label), "axis": int(axis), "index": int(index)}
        event.update(self.deliver(plane))
        self.sent.setdefault(int(label), set()).add(int(index))
        self._send(event)

    def is_cancelled(self):
        return self._token.is_cancelled()

    def deliver(self, plane: np.ndarray) -> dict:
        raise NotImplementedError


class EngineSession:
    """The engine and the kept state of one client (the pipe worker's client, a server session)."""

    def __init__(self, engine_factory: EngineFactory = default_engine_factory, state_parent: str | None = None):
        self._engine_factory = engine_factory
        self._state_parent = state_parent  # where the private state folder goes (default: the temp folder)
        self.engine = None
        self.engine_settings = None
        self._kept: tuple | None = None  # (job, SegmentResult, OFL-SAM2 adapter folder or None) of the latest segment job
        self._state: Path | None = None  # private folder: the OFL-SAM2 head an update warm-starts

    def segment(self, job, request: dict, load: ArrayLoader, events: PlaneEvents) -> dict:
        """Run one ``segment`` request; every plane the client lacks afterwards is sent through
        ``events``. Returns the ``done`` summary."""
        from .settings import LabelSupport, MethodOptions, ModelSettings, Reference

        settings = dataclass_from_dict(ModelSettings, request["settings"])
        options = dataclass_from_dict(MethodOptions, request["options"])
        image = load(request["image"])
        supports = [
            LabelSupport(int(s["label"]), s["name"], load(s["mask"]), [int(i) for i in s["slices"]])
            for s in request["supports"]
        ]
        references = [
            Reference(load(r["image"]), load(r["labels"]), name=r["name"])
            for r in request.get("references", [])
        ]
        update = {}
        if request.get("previous_job") is not None:
            from .errors import InputError

            if self._kept is None or self._kept[0] != request["previous_job"]:
                raise InputError(LOST_RESULT)
            update["previous"] = self._kept[1]
        elif request.get("previous") is not None:  # a result the client holds (the CLI's --previous)
            update["previous"] = previous_result(request["previous"], load)
        ofl = request["method"] == "ofl"
        kept_head = self._kept[2] if request.get("previous_job") is not None else None
        if ofl and kept_head:  # warm-start the head the previous run trained, not a new one
            options = dataclasses.replace(options, adapter=kept_head)
        if ofl and options.save_adapter is None:  # keep this run's head for the next update
            options = dataclasses.replace(options, save_adapter=str(self._state_folder() / "adapter"))
        engine = self.engine_for(settings)
        result = engine.segment(image, supports, method=request["method"], axis=int(request["axis"]),
                                preset=request["preset"], options=options, references=references, events=events,
                                **update)
        self._kept = (job, result, options.save_adapter if ofl else None)
        # Every plane the method did not stream (e.g. the ones it finished together at the end),
        # so that the client's copy ends complete.
        for support in supports:
            masks = result.masks.get(support.label)
            if masks is None:
                continue
            annotated = set(support.slices)
            planes = range(masks.shape[result.axis])
            if update:  # the rest keeps the previous result, which the client already has
                planes = result.info.get("recomputed", {}).get(support.label, [])
            for index in planes:
                if index not in annotated and index not in events.sent.get(support.label, ()):
                    events.slice_done(support.label, result.axis, index, np.take(masks, index, axis=result.axis))
        return {"method": result.method, "axis": result.axis, "info": result.info}

    def engine_for(self, settings):
        """The engine of ``settings``: kept while the settings stay the same, so a second run on
        the same volume reuses the model and its encoded slices."""
        if self.engine is None or settings != self.engine_settings:
            self.release_engine()
            self.engine = self._engine_factory(settings)
            self.engine_settings = settings
        return self.engine

    def release_engine(self) -> None:
        """Drop the engine and its feature caches (after an out-of-memory error, or when idle)."""
        self.engine = None
        self.engine_settings = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Forget everything: the engine, the kept result and the private folder."""
        self.release_engine()
        self._kept = None
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
            self._state = None

    def error_event(self, job, exc: BaseException, with_traceback: bool = True) -> dict:
        """The ``error`` event of a failed job; an out-of-memory error also releases the engine
        (the client may run again on the CPU or at a smaller image size). A refused request
        (``with_traceback=False``) has no traceback worth sending."""
        out_of_memory = is_out_of_memory(exc)
        hint = ""
        if out_of_memory:
            hint = _device_hint(self.engine_settings)
            self.release_engine()
        return {
            "event": "error", "job": job, "error_type": type(exc).__name__, "error_module": type(exc).__module__,
            "message": str(exc), "traceback": traceback.format_exc() if with_traceback else "",
            "out_of_memory": out_of_memory, "device_hint": hint,
        }

    def _state_folder(self) -> Path:
        if self._state is None:
            if self._state_parent is None:  # the worker process's, named so that one killed is cleaned up
                from .worker_state import new_state_folder

                self._state = new_state_folder()
            else:
                self._state = Path(tempfile.mkdtemp(prefix="state-", dir=self._state_parent))
        return self._state


def previous_result(previous: dict, load: ArrayLoader):
    """The :class:`~oflsam2.settings.SegmentResult` a request's ``previous`` describes: ``masks``
    ({label: array name}), ``axis``, ``method`` and ``info`` (JSON: label and slice keys as text)."""
    from .errors import InputError
    from .settings import SegmentResult

    if not isinstance(previous, dict) or not isinstance(previous.get("masks"), dict) or not previous["masks"]:
        raise InputError("The previous result of an update must name one mask per label.")
    masks = {int(label): load(name).astype(bool) for label, name in previous["masks"].items()}
    info = previous.get("info") or {}
    if not isinstance(info, dict):
        raise InputError("The previous result's info must be a JSON object.")
    return SegmentResult(masks, int(previous["axis"]), str(previous["method"]), int_keys(info))


def int_keys(value):
    """JSON's text keys back to the integers they were (labels, slice indices), at every depth."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [int_keys(v) for v in value]
    return value


def dataclass_from_dict(cls, values: dict):
    """``cls(**values)`` for a settings dataclass sent as JSON (lists back to tuples)."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} must be sent as a JSON object; got {type(values).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ProtocolError(f"{cls.__name__} has no field(s) {unknown}: the worker and the module are different versions.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (and its CUDA alias) and "out of memory" runtime errors."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def json_default(value):
    """What ``json.dumps`` cannot write itself: numpy scalars and arrays, sets."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _device_hint(settings) -> str:
    device = getattr(settings, "device", "")
    size = getattr(settings, "image_size", "")
    return f"device {device}, image size {size}" if device else ""
