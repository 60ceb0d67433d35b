"""What the review functions are given, checked before use: a :class:`~oflsam2.settings.SegmentResult`
(the previous result of :meth:`Engine.update`, the result :func:`oflsam2.review.suggest` ranks)
and the fingerprint of the image a result was made on.

A result comes from a run, from a file (the CLI's saved state) or from a caller's hands; a
malformed one must end in an :class:`InputError` that says what is wrong, never in a traceback
deep inside a method, and a mask of fractions must not be read as "everywhere" (``0.5`` is True
as a bool). No torch here.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .errors import InputError
from .volume import MAX_LABEL


def image_digest(image) -> str:
    """A fingerprint of a volume's voxels and shape, as float32 (the engine reads them so).

    Recorded in every result (``info["image_digest"]``) and in the CLI's saved state, so that an
    update with another patient's image on the same grid is refused."""
    array = np.ascontiguousarray(image, dtype=np.float32)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(str(array.shape).encode())
    return digest.hexdigest()


def check_result(result, role: str = "result") -> None:
    """Raise :class:`InputError` unless ``result`` is a usable SegmentResult: ``masks`` a dict of
    label values (1..MAX_LABEL) to 3-D masks of one shape holding only 0/1 (or bool), ``axis`` 0..2,
    ``method`` a name, ``info`` a dict whose ``annotated`` slices, ``quality`` entries, ``labels``
    statistics and ``image_digest`` (each optional) have their types."""
    from .settings import SegmentResult

    if not isinstance(result, SegmentResult):
        raise InputError(f"The {role} must be the SegmentResult of an earlier run; got {type(result).__name__}.")
    if isinstance(result.axis, (bool, np.bool_)) or result.axis not in (0, 1, 2):
        raise InputError(f"The {role}'s axis must be 0, 1 or 2; got {result.axis!r}.")
    if not isinstance(result.method, str):
        raise InputError(f"The {role}'s method must be a method name; got {result.method!r}.")
    if not isinstance(result.masks, dict) or not result.masks:
        raise InputError(f"The {role}'s masks must be a dict of label value -> (z, y, x) mask; got {result.masks!r:.80}.")
    if not isinstance(result.info, dict):
        raise InputError(f"The {role}'s info must be a dict; got {type(result.info).__name__}.")
    shapes = set()
    for label, mask in result.masks.items():
        if not _whole(label, 1, MAX_LABEL):
            raise InputError(f"The {role}'s masks are keyed by label values 1..{MAX_LABEL}; got the key {label!r}.")
        array = np.asarray(mask) if isinstance(mask, np.ndarray) else None
        if array is None or array.ndim != 3 or array.dtype.kind not in "biuf":
            raise InputError(f"The {role}'s mask of label {label} must be a 3-D (z, y, x) numpy array; got "
                             f"{type(mask).__name__} {getattr(mask, 'shape', '')}.")
        if array.dtype != bool and not ((array == 0) | (array == 1)).all():
            raise InputError(f"The {role}'s mask of label {label} holds values other than 0 and 1 (e.g. probabilities); "
                             "give a binary mask (True inside the object), e.g. probabilities > 0.5.")
        shapes.add(array.shape)
    if len(shapes) > 1:
        raise InputError(f"The {role}'s masks have different shapes {sorted(shapes)}; a result has one grid.")
    count = shapes.pop()[result.axis]
    _check_info(result.info, role, count)


def _check_info(info: dict, role: str, count: int) -> None:
    annotated = info.get("annotated", [])
    if not isinstance(annotated, (list, tuple)) or not all(_whole(i, 0, count - 1) for i in annotated):
        raise InputError(f"The {role}'s info['annotated'] must list slice indices 0..{count - 1}; got {annotated!r:.120}.")
    quality = info.get("quality", {})
    if not isinstance(quality, dict):
        raise InputError(f"The {role}'s info['quality'] must be a dict label -> slice -> entry; got {quality!r:.120}.")
    for label, entries in quality.items():
        if not isinstance(entries, dict):
            raise InputError(f"The {role}'s quality of label {label!r} must be a dict slice -> entry; got {entries!r:.120}.")
        for index, entry in entries.items():
            if not (_whole(_int_key(index), 0, count - 1) and isinstance(entry, dict) and _finite(entry.get("quality"))
                    and isinstance(entry.get("source"), str)):
                raise InputError(
                    f"The {role}'s quality entry of label {label!r}, slice {index!r} must be a slice 0..{count - 1} with "
                    f"{{'quality': a number, 'source': a name}}; got {entry!r:.120}."
                )
    stats = info.get("labels", {})
    if not isinstance(stats, dict) or not all(isinstance(v, dict) for v in stats.values()):
        raise InputError(f"The {role}'s info['labels'] must be a dict label -> statistics dict; got {stats!r:.120}.")
    for label, values in stats.items():
        selected = values.get("selected", [])
        if not isinstance(selected, (list, tuple)) or not all(_whole(i, 0, count - 1) for i in selected):
            raise InputError(f"The {role}'s selected slices of label {label!r} must be slice indices; got {selected!r:.120}.")
    if "image_digest" in info and not isinstance(info["image_digest"], str):
        raise InputError(f"The {role}'s info['image_digest'] must be a string; got {info['image_digest']!r:.80}.")


def _int_key(value):
    """A slice key as the engine (int) or JSON (digits) writes it."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _whole(value, low: int, high: int) -> bool:
    return (not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
            and low <= int(value) <= high)


def _finite(value) -> bool:
    return (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))
