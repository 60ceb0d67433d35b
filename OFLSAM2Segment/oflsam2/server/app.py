"""The HTTP API of ``oflsam2 serve`` (FastAPI), under ``/v1``.

- ``GET /v1/health`` (the only path open without the token): service, version, protocol,
  device, models on the server, limits.
- ``POST /v1/sessions`` {``protocol``, ``version``} -> {``session``, ``idle_minutes``}; a client
  of another protocol is refused (409) with one message naming both versions.
- ``DELETE /v1/sessions/{session}``: close it now (else it closes once idle).
- ``HEAD|PUT /v1/sessions/{session}/blobs/{sha256}``: is it there / upload it (the body's
  SHA-256 must be its name; ``Content-Length`` is checked before the body is read, a ``.npy``
  header when it is in).
- ``POST /v1/sessions/{session}/jobs``: queue a ``segment`` job (:mod:`.requests`) ->
  {``job``, ``ahead``}.
- ``GET /v1/sessions/{session}/jobs/{job}/events?after=N&wait=S``: the job's events after the
  N-th, waiting up to S seconds (long polling) -> {``events``}.
- ``POST /v1/sessions/{session}/jobs/{job}/cancel``.
- ``GET /v1/sessions/{session}/jobs/{job}/files/{name}``: a file the job wrote (its adapter).

Errors are JSON ``{"detail": message}``; the message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from starlette.requests import ClientDisconnect

from ..engine_session import json_default
from ..errors import Cancelled, CheckpointError
from ..transfer import DIGEST, NPY_MAGIC, TransferError, check_npy_file, protocol_mismatch
from ..version import __version__
from ..worker import PROTOCOL_VERSION
from .auth import BearerAuth
from .config import MODELS_PER_DEVICE, ServerConfig
from .jobs import DeviceQueue, EventLog, QueueFull, ServerJob
from .models import ModelPool
from .requests import BadRequest, check_job_request
from .sessions import SessionError, SessionStore

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 25.0  # one long poll; a client asks again at once
STOP_SECONDS = 10.0


def create_app(config: ServerConfig, engine_factory=None) -> FastAPI:
    """The server's ASGI app. ``engine_factory(settings)``: each session's engine (default: an
    :class:`~oflsam2.api.Engine` with its own caches on the device's shared model)."""
    pool = ModelPool(MODELS_PER_DEVICE, on_evict=lambda: store.release_engines())
    queue = DeviceQueue(lambda job: _run_job(job), config.limits.max_queued_jobs)
    store = SessionStore(config.limits, engine_factory or pool.engine_factory, config.device, config.state_dir,
                         busy=queue.busy_with)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        reaper = asyncio.create_task(_expire_idle(store))
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(queue.stop, STOP_SECONDS)
            store.close_all()
            pool.clear()

    app = FastAPI(title="OFLSAM2", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store, app.state.queue, app.state.pool = store, queue, pool

    @app.get("/v1/health")
    def health():
        return _json({"service": "oflsam2", "version": __version__, "protocol": PROTOCOL_VERSION,
                      "device": config.device_label or config.device, "models": config.models,
                      "limits": config.limits.describe()})

    @app.post("/v1/sessions", status_code=201)
    async def open_session(request: Request):
        body = await _json_body(request, limit=4096)
        protocol = body.get("protocol") if isinstance(body, dict) else None
        if protocol != PROTOCOL_VERSION:
            raise HTTPException(409, protocol_mismatch(protocol, PROTOCOL_VERSION, str(body.get("version", "?"))
                                                       if isinstance(body, dict) else "?", __version__))
        session = _call(store.create, status=429)
        return _json({"session": session.id, "idle_minutes": config.limits.session_idle_seconds / 60}, 201)

    @app.delete("/v1/sessions/{session_id}")
    def close_session(session_id: str):
        session = _session(store, session_id)
        for job in list(session.jobs.values()):  # a running one ends at its next check
            queue.cancel(job)
        store.close(session_id)
        return _json({"closed": session_id})

    @app.head("/v1/sessions/{session_id}/blobs/{digest}")
    def has_blob(session_id: str, digest: str):
        session = _session(store, session_id)
        if not DIGEST.fullmatch(digest) or not (session.blobs / digest).is_file():
            return Response(status_code=404)
        return Response(status_code=200)

    @app.put("/v1/sessions/{session_id}/blobs/{digest}")
    async def upload(session_id: str, digest: str, request: Request):
        session = _session(store, session_id)
        if not DIGEST.fullmatch(digest):
            raise HTTPException(400, "An upload is named by the SHA-256 of its bytes (64 lowercase hex digits).")
        length = _content_length(request, config.limits.max_upload_bytes)
        used = session.blob_bytes()
        if used + length > config.limits.max_session_bytes:
            raise HTTPException(413, f"This session already keeps {used >> 20} MiB of uploads; the server allows "
                                     f"{config.limits.max_session_bytes >> 20} MiB per session. Close the session and "
                                     "start again, or ask for a higher limit.")
        await _receive_blob(request, session, digest, length, config.limits.max_voxels)
        return _json({"stored": digest}, 201)

    @app.post("/v1/sessions/{session_id}/jobs", status_code=202)
    async def submit(session_id: str, request: Request):
        session = _session(store, session_id)
        body = await _json_body(request, limit=1 << 20)
        try:
            checked, uses = check_job_request(body, session)
        except BadRequest as exc:
            raise HTTPException(400, str(exc)) from None
        with session.lock:
            job = ServerJob(next(session.job_ids), session, checked, EventLog(asyncio.get_running_loop()))
            ahead = _call(lambda: queue.submit(job), status=429)
            session.jobs[job.id] = job
            waiting = {d for j in session.jobs.values() if j.state != "finished" for d in _uploads_of(j)}
            session.keep_only(uses | waiting)
            for old in [j for j in session.jobs.values() if j.state == "finished" and j.log.finished and j.id < job.id - 4]:
                del session.jobs[old.id]  # read long ago: only their results, kept by the engine session, matter
        return _json({"job": job.id, "ahead": ahead}, 202)

    @app.get("/v1/sessions/{session_id}/jobs/{job_id}/events")
    async def events(session_id: str, job_id: int, after: int = 0, wait: float = 0.0):
        job = _job(store, session_id, job_id)
        found = await job.log.read(max(0, after), min(max(0.0, wait), MAX_WAIT_SECONDS))
        return _json({"events": found})

    @app.post("/v1/sessions/{session_id}/jobs/{job_id}/cancel")
    def cancel(session_id: str, job_id: int):
        queue.cancel(_job(store, session_id, job_id))
        return _json({"cancelling": job_id})

    @app.get("/v1/sessions/{session_id}/jobs/{job_id}/files/{name}")
    def job_file(session_id: str, job_id: int, name: str):
        session = _session(store, session_id)
        path = _call(lambda: session.job_file(job_id, name), status=404)
        return FileResponse(path, media_type="application/octet-stream")

    def _run_job(job: ServerJob) -> None:
        session = job.session
        try:
            if job.token.is_cancelled():
                raise Cancelled()
            summary = session.run(job)
            job.log.append({"event": "done", "job": job.id, "summary": json.loads(json.dumps(summary, default=json_default))})
        except Cancelled:
            job.log.append({"event": "cancelled", "job": job.id})
        except Exception as exc:  # the job fails, the server and every other session go on
            log.warning("job %s of a session failed: %s: %s", job.id, type(exc).__name__, exc, exc_info=True)
            event = session.engine.error_event(job.id, exc)
            event["message"] = event["message"].replace(str(session.folder), "<session>")
            if isinstance(exc, CheckpointError):
                event["message"] = "On the server: " + event["message"]
            event["traceback"] = ""  # the server's files and code stay on the server
            job.log.append(event)
        finally:
            if session.closed:
                session.remove()

    return BearerAuth(app, config.token) if config.token else app


# ---------------------------------------------------------------------------------------------


def _json(value, status: int = 200) -> Response:
    return Response(json.dumps(value, default=json_default), status_code=status, media_type="application/json")


def _call(function, status: int):
    try:
        return function()
    except (SessionError, QueueFull) as exc:
        raise HTTPException(status, str(exc)) from None


def _session(store: SessionStore, session_id: str):
    try:
        return store.get(session_id)
    except SessionError as exc:
        raise HTTPException(404, str(exc)) from None


def _job(store: SessionStore, session_id: str, job_id: int) -> ServerJob:
    job = _session(store, session_id).jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"This session has no job {job_id}.")
    return job


def _uploads_of(job: ServerJob) -> set[str]:
    request = job.request
    names = {request.get("image")} | {s["mask"] for s in request.get("supports", [])}
    names |= {n for r in request.get("references", []) for n in (r["image"], r["labels"])}
    names |= set((request.get("previous") or {}).get("masks", {}).values()) | set(request.get("adapter_files", {}).values())
    return {n for n in names if isinstance(n, str)}


def _content_length(request: Request, most: int) -> int:
    text = request.headers.get("content-length")
    if text is None or not text.isdigit():
        raise HTTPException(411, "An upload needs a Content-Length header (no chunked uploads).")
    length = int(text)
    if length > most:
        raise HTTPException(413, f"The upload has {length >> 20} MiB; this server accepts at most {most >> 20} MiB "
                                 "per array (--max-upload-mb). Crop the volume or ask for a higher limit.")
    return length


async def _json_body(request: Request, limit: int):
    length = _content_length(request, limit)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > length:
            raise HTTPException(400, "The request body is longer than its Content-Length.")
    try:
        return json.loads(body) if body else {}
    except ValueError:
        raise HTTPException(400, "The request body is not JSON.") from None


async def _receive_blob(request: Request, session, digest: str, length: int, max_voxels: int) -> None:
    """The body into ``blobs/<digest>`` through a temporary file, checked on the way."""
    import hashlib

    temporary = session.blobs / f".upload-{secrets.token_hex(8)}"
    hasher, received = hashlib.sha256(), 0
    try:
        with open(temporary, "xb") as out:
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > length:
                        raise HTTPException(400, "The upload is longer than its Content-Length.")
                    hasher.update(chunk)
                    out.write(chunk)
            except ClientDisconnect:  # the client went away mid-upload: nothing is kept
                raise HTTPException(400, "The upload was cut off.") from None
        if received != length:
            raise HTTPException(400, f"The upload ended after {received} of {length} bytes; send it again.")
        if hasher.hexdigest() != digest:
            raise HTTPException(400, "The upload's SHA-256 differs from its name: it was damaged on the way. Send it again.")
        with open(temporary, "rb") as handle:
            is_array = handle.read(len(NPY_MAGIC)) == NPY_MAGIC
        if is_array:
            try:
                check_npy_file(temporary, max_voxels)
            except TransferError as exc:
                raise HTTPException(400, f"The uploaded array cannot be used: {exc}.") from None
        os.replace(temporary, session.blobs / digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


async def _expire_idle(store: SessionStore) -> None:
    period = max(1.0, min(60.0, store.limits.session_idle_seconds / 4))
    while True:
        await asyncio.sleep(period)
        for session_id in store.expire():
            log.info("closed an idle session (%s...)", session_id[:4])
