"""An Engine-like object that runs each ``segment`` call on an ``oflsam2 serve`` server.

The CLI's ``--server URL --token-file FILE`` hands it to :func:`oflsam2.pipeline.segment_files`
(and to ``batch``'s executor) in place of a local :class:`~oflsam2.api.Engine`: reading,
checking and writing stay on this computer; the arrays go to the server, the planes come back
as they are computed, and the result is the one a local run gives. An adapter folder to use is
sent as files; an adapter the run trains comes back into the folder asked for (tensors first,
the JSON that commits it last, each moved into place whole).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .client import ServerClient, ServerError, ServerTarget
from .engine_session import int_keys, json_default
from .errors import Cancelled, OFLSAM2Error
from .events import Events
from .settings import ModelSettings, SegmentResult
from .transfer import npy_bytes, unpack_plane

CANCEL_POLL_SECONDS = 2.0  # how often a quiet run checks events.is_cancelled()


class RemoteEngine:
    """``segment()`` as :meth:`oflsam2.api.Engine.segment` does it, on the server. One session per
    engine, opened on the first run and kept (a batch shares it), closed by :meth:`close`."""

    def __init__(self, target: ServerTarget, settings: ModelSettings, client: ServerClient | None = None):
        if settings.checkpoint:
            raise ServerError("A local checkpoint file cannot be used through a server: the server runs the models it "
                              "has downloaded. Leave out --checkpoint and name the model with --model.")
        self.settings = settings
        self.client = client or ServerClient(target)

    def segment(self, image, supports, *, method, axis, preset="auto", options=None, references=(), events=None,
                previous: SegmentResult | None = None, staged=None) -> SegmentResult:
        from .settings import MethodOptions

        options = options or MethodOptions()
        events = events or Events()
        image = np.asarray(image)
        client = self.client
        if client.session is None:
            client.open_session()
        request = {
            "type": "segment",
            "settings": dataclasses.asdict(self.settings),
            "options": {**dataclasses.asdict(options), "adapter": None, "save_adapter": None},
            "method": method, "axis": int(axis), "preset": preset,
            "image": client.upload(npy_bytes(image)),
            "supports": [{"label": int(s.label), "name": s.name, "slices": [int(i) for i in s.slices],
                          "mask": client.upload(npy_bytes(np.asarray(s.mask, dtype=bool)))} for s in supports],
            "references": [{"name": r.name, "image": client.upload(npy_bytes(np.asarray(r.image))),
                            "labels": client.upload(npy_bytes(np.asarray(r.labels)))} for r in references],
            "adapter_files": client.upload_adapter(options.adapter),
            "save_adapter": options.save_adapter is not None,
        }
        if previous is not None:
            import json

            request["previous"] = {
                "masks": {str(label): client.upload(npy_bytes(np.asarray(mask, dtype=bool)))
                          for label, mask in previous.masks.items()},
                "axis": int(previous.axis), "method": previous.method,
                "info": json.loads(json.dumps(previous.info, default=json_default)),
            }
        masks = _starting_masks(image.shape, supports, int(axis), previous)
        summary = self._follow(client, request, events, masks, image.shape)
        if options.save_adapter is not None:
            client.fetch_adapter(summary["job"], summary.get("adapter_files", []), options.save_adapter, staged)
        return SegmentResult(masks, int(summary["axis"]), summary["method"], int_keys(summary["info"]))

    def close(self) -> None:
        self.client.close_session()

    # ------------------------------------------------------------------------------------------

    def _follow(self, client: ServerClient, request: dict, events, masks: dict, shape) -> dict:
        job, ahead = client.submit(request)
        if ahead:
            events.progress("queued", 0, 1, _waiting(ahead))
        cancelling = False
        try:
            for event in client.follow(job, wait=CANCEL_POLL_SECONDS):
                kind = event.get("event")
                if kind == "queued":
                    events.progress("queued", 0, 1, _waiting(event["position"]))
                elif kind == "progress":
                    events.progress(event["stage"], event["done"], event["total"], event.get("text", ""))
                elif kind == "slice":
                    label, axis, index = int(event["label"]), int(event["axis"]), int(event["index"])
                    plane = unpack_plane(event["plane"], int(np.prod(shape)))
                    target = np.moveaxis(masks[label], axis, 0)
                    if plane.shape != target.shape[1:] or not 0 <= index < target.shape[0]:
                        raise ServerError(f"The server sent a plane that does not fit the volume (label {label}, slice {index}).")
                    target[index] = plane.astype(bool)
                    events.slice_done(label, axis, index, target[index])
                elif kind == "done":
                    return {**event["summary"], "job": job}
                elif kind == "cancelled":
                    raise Cancelled()
                elif kind == "error":
                    raise remote_error(event)
                if not cancelling and events.is_cancelled():
                    cancelling = True
                    client.cancel(job)
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM in the CLI: the server stops the job too
            try:
                client.cancel(job, timeout=3.0)
            except ServerError:
                pass
            raise
        raise ServerError("The server ended the job's events without its outcome; run it again.")


def remote_error(event: dict) -> OFLSAM2Error:
    """A job's ``error`` event as an exception the CLI reports: the engine's own error types keep
    their type and message, anything else says it happened on the server."""
    from . import errors

    name, message = event.get("error_type", "Exception"), event.get("message", "")
    if event.get("out_of_memory"):
        hint = f" ({event['device_hint']})" if event.get("device_hint") else ""
        return ServerError(f"The server's GPU ran out of memory{hint}; the job was stopped and the server goes on. Run "
                           "again with a smaller --image-size, or when the server is less busy.")
    cls = getattr(errors, name, None) if event.get("error_module") == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, OFLSAM2Error) and cls is not errors.Cancelled:
        return cls(message)
    return ServerError(f"The job failed on the server: {name}: {message}")


def _waiting(ahead: int) -> str:
    return f"{ahead} job(s) ahead of this one" if ahead else "starting"


def _starting_masks(shape, supports, axis: int, previous) -> dict:
    """What the result holds before any plane arrives: the previous result (an update keeps every
    plane it does not recompute) and, on every annotated plane, the annotation as drawn."""
    run_slices = sorted({i for s in supports for i in s.slices})
    masks = {}
    for support in supports:
        if previous is not None and support.label in previous.masks:
            mask = np.array(previous.masks[support.label], dtype=bool)
        else:
            mask = np.zeros(shape, dtype=bool)
        drawn = np.asarray(support.mask, dtype=bool)
        for index in run_slices:
            np.moveaxis(mask, axis, 0)[index] = np.moveaxis(drawn, axis, 0)[index]
        masks[int(support.label)] = mask
    return masks
