"""The engine's request schema: one request line read and checked before anything acts on it.

Shared by the JSON-lines worker (:mod:`oflsam2.worker`) and any other front end that takes the
same requests. Pure functions over bytes, dicts and path strings, standard library only (the
Slicer client imports this module, so it must never pull in torch).

:func:`parse_request` turns one line into a checked request or raises :class:`ProtocolError`:
the line is at most :data:`MAX_LINE_BYTES`, strict UTF-8, JSON nested at most :data:`MAX_DEPTH`
deep (measured before the JSON parser sees it, so no nesting can exhaust its recursion), an
object of a known ``type`` whose fields have the types below. Job ids are whole numbers or
short strings (hashable scalars). The request returned holds only the known fields; file names
are plain names (no folder part). Whether a folder lies inside the worker's root is checked
with :func:`inside_root` on paths the caller resolved.

Requests (``type``, then fields; ``?`` marks an optional one):

- ``segment``: ``job``, ``folder`` (str), ``settings`` and ``options`` (objects of scalars or
  lists of scalars: :class:`~oflsam2.settings.ModelSettings` / ``MethodOptions`` fields),
  ``method`` (str), ``axis`` (0, 1 or 2), ``preset`` (str), ``image`` (file name), ``supports``
  [{``label`` (int), ``name`` (str), ``slices`` [int], ``mask`` (file name)}], ``references``?
  [{``name`` (str), ``image``, ``labels`` (file names)}], ``previous_job``? (job id)
- ``download``: ``job``, ``model`` (str)
- ``cancel``: ``job``
- ``shutdown``
"""

from __future__ import annotations

import json
import os
import re

from .errors import ProtocolError

MAX_LINE_BYTES = 1 << 20  # a request carries names and settings, never arrays: a few KiB
MAX_DEPTH = 8  # the deepest request (segment > supports > [ ] > { } > slices) is 4
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 4096  # paths and names
MAX_FILE_NAME_CHARS = 255
MAX_ID = 2**63 - 1
REQUEST_TYPES = ("segment", "download", "cancel", "shutdown")

_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)  # an escape pair first, so \" never ends a string
_SCALARS = (str, int, float, bool, type(None))


def parse_request(line: bytes, protocol: int | None = None) -> dict:
    """The checked request on ``line`` (one line, without or with its newline).

    Raises :class:`ProtocolError`; its ``job`` is the request's id when that much could be read
    (so the error can be answered to that job), else ``None``. ``protocol`` is named in the
    message of an unknown request type.
    """
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"A request line is longer than {MAX_LINE_BYTES} bytes; requests never carry arrays.")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"A request line is not UTF-8 (byte {exc.start}); it was ignored.") from None
    depth = nesting_depth(line, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"A request is nested deeper than {MAX_DEPTH} levels; it was ignored.")
    try:
        message = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"A request line is not JSON ({_short(exc)}); it was ignored.") from None
    return validate_request(message, protocol)


def validate_request(message, protocol: int | None = None) -> dict:
    """``message`` (a parsed JSON value) checked against the schema; returns the request with
    only its known fields. Raises :class:`ProtocolError`."""
    if not isinstance(message, dict):
        raise ProtocolError(f"A request must be a JSON object; got {_kind(message)}.")
    job = message.get("job")
    job = job if _is_id(job) else None  # an error can be addressed to the job only if its id is valid
    kind = message.get("type")
    if kind not in REQUEST_TYPES:
        version = f" (protocol {protocol})" if protocol is not None else ""
        shown = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else _kind(kind)
        raise ProtocolError(f"Unknown request type {shown}: the worker{version} and the module are different versions.",
                            job=job)
    if kind == "shutdown":
        return {"type": kind}
    try:
        request = {"type": kind, "job": _id(message, "job")}
        if kind == "download":
            request["model"] = _text(message, "model")
        elif kind == "segment":
            request.update(_segment_fields(message))
        _refuse_unknown(message, request, {"references", "previous_job"} if kind == "segment" else set())
    except ProtocolError as exc:
        exc.job = job
        raise
    return request


def nesting_depth(line: bytes, limit: int) -> int:
    """The deepest nesting of ``[``/``{`` outside JSON strings in ``line``, counted up to
    ``limit + 1`` (a linear scan of the structural characters only; malformed JSON is left to
    the parser)."""
    depth = deepest = 0
    in_string = False
    for match in _STRUCTURE.finditer(line):
        token = match.group()
        if token[0] == 0x5C:  # a backslash escape: only meaningful inside a string
            continue
        if token == b'"':
            in_string = not in_string
        elif in_string:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth -= 1
    return deepest


def inside_root(path: str, root: str) -> bool:
    """True when ``path`` lies strictly inside the folder ``root`` (both already resolved,
    absolute paths; compared by their parts, case-folded where the system is case-insensitive)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    if not (os.path.isabs(path) and os.path.isabs(root)) or path == root:
        return False
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive
        return False


def is_file_name(name) -> bool:
    """A plain file name: no folder part, no separator of any system, not ``.``/``..``."""
    return (
        isinstance(name, str) and 0 < len(name) <= MAX_FILE_NAME_CHARS and name not in (".", "..")
        and not any(c in name for c in "/\\\0:")
    )


# ---------------------------------------------------------------------------------------------


def _segment_fields(message: dict) -> dict:
    fields = {
        "folder": _text(message, "folder"),
        "settings": _scalar_object(message, "settings"),
        "options": _scalar_object(message, "options"),
        "method": _text(message, "method"),
        "axis": _whole(message, "axis", 0, 2),
        "preset": _text(message, "preset"),
        "image": _file_name(message, "image"),
        "supports": [_support(item, n) for n, item in enumerate(_list(message, "supports"))],
        "references": [_reference(item, n) for n, item in enumerate(_list(message, "references", optional=True))],
    }
    if message.get("previous_job") is not None:
        fields["previous_job"] = _id(message, "previous_job")
    return fields


def _support(item, number: int) -> dict:
    where = f"supports[{number}]"
    item = _object(item, where)
    support = {
        "label": _whole(item, "label", 0, MAX_ID, where),
        "name": _text(item, "name", where),
        "slices": [_whole_value(v, f"{where}.slices") for v in _list(item, "slices", where=where)],
        "mask": _file_name(item, "mask", where),
    }
    _refuse_unknown(item, support, set(), where)
    return support


def _reference(item, number: int) -> dict:
    where = f"references[{number}]"
    item = _object(item, where)
    reference = {
        "name": _text(item, "name", where),
        "image": _file_name(item, "image", where),
        "labels": _file_name(item, "labels", where),
    }
    _refuse_unknown(item, reference, set(), where)
    return reference


def _is_id(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_ID <= value <= MAX_ID
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and "\0" not in value


def _id(message: dict, key: str):
    value = message.get(key)
    if not _is_id(value):
        raise ProtocolError(f"{key} must be a whole number or a short text (at most {MAX_ID_CHARS} characters); "
                            f"got {_kind(value)}.")
    return value


def _field(message: dict, key: str, where: str):
    if key not in message:
        raise ProtocolError(f"The request lacks {_name(key, where)}: the worker and the module are different versions.")
    return message[key]


def _text(message: dict, key: str, where: str = "") -> str:
    value = _field(message, key, where)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS or "\0" in value:
        raise ProtocolError(f"{_name(key, where)} must be a text of 1 to {MAX_TEXT_CHARS} characters; got {_kind(value)}.")
    return value


def _file_name(message: dict, key: str, where: str = "") -> str:
    value = _field(message, key, where)
    if not is_file_name(value):
        raise ProtocolError(f"{_name(key, where)} must be a plain file name inside the request folder; got {_kind(value)}.")
    return value


def _whole(message: dict, key: str, low: int, high: int, where: str = "") -> int:
    return _whole_value(_field(message, key, where), _name(key, where), low, high)


def _whole_value(value, name: str, low: int = 0, high: int = MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{name} must be a whole number from {low} to {high}; got {_kind(value)}.")
    return value


def _object(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} must be a JSON object; got {_kind(value)}.")
    return value


def _list(message: dict, key: str, optional: bool = False, where: str = "") -> list:
    value = message.get(key, []) if optional else _field(message, key, where)
    if not isinstance(value, list):
        raise ProtocolError(f"{_name(key, where)} must be a list; got {_kind(value)}.")
    return value


def _scalar_object(message: dict, key: str) -> dict:
    """An object whose values are JSON scalars or flat lists of them (dataclass fields)."""
    value = _object(_field(message, key, ""), key)
    for name, item in value.items():
        items = item if isinstance(item, list) else [item]
        if not all(isinstance(v, _SCALARS) for v in items):
            raise ProtocolError(f"{key}.{name} must be a number, text, true/false, null or a list of those; "
                                f"got {_kind(item)}.")
    return value


def _refuse_unknown(message: dict, known: dict, optional: set, where: str = "") -> None:
    unknown = sorted(set(message) - set(known) - optional - {"type"})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise ProtocolError(f"{where or 'The request'} has unknown field(s) {shown}: the worker and the module are "
                            "different versions.")


def _name(key: str, where: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value) -> str:
    """What ``value`` is, for a message, without echoing a long or nested value."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} of {len(value) if isinstance(value, str) else len(text)} characters"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
