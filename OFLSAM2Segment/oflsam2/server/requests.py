"""A client's job request, checked field by field before it is queued.

The request is the worker protocol's ``segment`` request (:mod:`oflsam2.worker`) with every array
named by the SHA-256 of its upload instead of a file name, and two fields of its own in place
of the adapter paths a client cannot give a server: ``adapter_files`` ({file name: upload}, an
adapter folder's ``.json`` and ``.safetensors`` files) and ``save_adapter`` (true: the job's
trained adapter comes back as files). Nothing a client sends names a server path: a local
checkpoint, an adapter folder or a folder to save into is refused with what to do instead.
"""

from __future__ import annotations

import dataclasses

from ..errors import OFLSAM2Error
from ..settings import METHODS, MethodOptions, ModelSettings
from ..transfer import ADAPTER_FILE, TransferError, check_npy_file

REQUEST_FIELDS = {"type", "settings", "options", "method", "axis", "preset", "image", "supports", "references",
                  "previous_job", "previous", "adapter_files", "save_adapter"}
MAX_SUPPORTS = 256
MAX_REFERENCES = 64


class BadRequest(Exception):
    """A request that cannot be run as sent (answered 400 with the message)."""


def check_job_request(body, session) -> tuple[dict, set[str]]:
    """The request, checked, and the uploads it uses."""
    if not isinstance(body, dict):
        raise BadRequest("A job request is a JSON object.")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown request field(s) {unknown}: the client and the server are different versions.")
    if body.get("type", "segment") != "segment":
        raise BadRequest(f"This server runs segment jobs only, not {body.get('type')!r}. Checkpoints are downloaded "
                         "on the server by its administrator: oflsam2 checkpoints download NAME.")
    settings = _fields(ModelSettings, body.get("settings"), "settings")
    if settings.get("checkpoint"):
        raise BadRequest("A local checkpoint file cannot be used through a server: the server runs the models it has "
                         "downloaded itself. Leave the checkpoint empty and choose the model by name.")
    options = _fields(MethodOptions, body.get("options"), "options")
    for name, instead in (("adapter", "adapter_files"), ("save_adapter", "save_adapter: true")):
        if options.get(name):
            raise BadRequest(f"options.{name} names a folder, which a server cannot use; send {instead} instead.")
    _build(ModelSettings, settings)
    _build(MethodOptions, options)
    if body.get("method") not in METHODS:
        raise BadRequest(f"Unknown method {body.get('method')!r}; choose one of: {', '.join(METHODS)}.")
    if body.get("axis") not in (0, 1, 2) or isinstance(body.get("axis"), bool):
        raise BadRequest("axis must be 0, 1 or 2.")
    if not isinstance(body.get("preset", "auto"), str):
        raise BadRequest("preset must be a name.")
    arrays = [body.get("image")]
    supports = _list(body.get("supports"), "supports", MAX_SUPPORTS)
    for support in supports:
        _keys(support, {"label", "name", "slices", "mask"}, "a support")
        if not isinstance(support["label"], int) or not isinstance(support["name"], str):
            raise BadRequest("A support's label is a whole number and its name a text.")
        if not isinstance(support["slices"], list) or not all(isinstance(i, int) for i in support["slices"]):
            raise BadRequest("A support's slices are a list of whole numbers.")
        arrays.append(support["mask"])
    for reference in _list(body.get("references", []), "references", MAX_REFERENCES):
        _keys(reference, {"name", "image", "labels"}, "a reference")
        if not isinstance(reference["name"], str):
            raise BadRequest("A reference's name is a text.")
        arrays += [reference["image"], reference["labels"]]
    previous = body.get("previous")
    if body.get("previous_job") is not None and not isinstance(body["previous_job"], int):
        raise BadRequest("previous_job is the number of an earlier job of this session.")
    if previous is not None:
        _keys(previous, {"masks", "axis", "method", "info"}, "previous")
        if not isinstance(previous["masks"], dict) or not all(str(k).isdigit() for k in previous["masks"]):
            raise BadRequest("previous.masks maps label numbers to uploads.")
        arrays += list(previous["masks"].values())
    files = {}
    adapter_files = body.get("adapter_files") or {}
    if not isinstance(adapter_files, dict) or len(adapter_files) > 2 * MAX_SUPPORTS:
        raise BadRequest("adapter_files maps an adapter folder's file names to uploads.")
    for name, digest in adapter_files.items():
        if not ADAPTER_FILE.fullmatch(name):
            raise BadRequest(f"{name[:80]!r} is not an adapter file name (<label>.json or <label>.safetensors).")
        files[name] = digest
    if not isinstance(body.get("save_adapter", False), bool):
        raise BadRequest("save_adapter is true or false.")
    try:
        for digest in arrays:
            check_npy_file(session.blob(digest), session.limits.max_voxels)
        for digest in files.values():
            session.blob(digest)
    except TransferError as exc:
        raise BadRequest(f"An array of the request cannot be used: {exc}.") from None
    return {**body, "settings": settings, "options": options, "adapter_files": files}, set(arrays) | set(files.values())


def _fields(cls, values, what: str) -> dict:
    if not isinstance(values, dict):
        raise BadRequest(f"{what} is a JSON object of {cls.__name__} fields.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BadRequest(f"{cls.__name__} has no field(s) {unknown}: the client and the server are different versions.")
    return dict(values)


def _build(cls, values: dict) -> None:
    """Let the dataclass check its own fields (the engine's messages)."""
    try:
        cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except OFLSAM2Error as exc:
        raise BadRequest(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{cls.__name__}: {exc}") from None


def _list(value, what: str, most: int) -> list:
    if not isinstance(value, list) or len(value) > most:
        raise BadRequest(f"{what} is a list of at most {most} entries.")
    return value


def _keys(entry, required: set, what: str) -> None:
    if not isinstance(entry, dict) or set(entry) != required:
        raise BadRequest(f"{what.capitalize()} has exactly the fields {sorted(required)}.")

