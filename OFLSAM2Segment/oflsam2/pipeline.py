"""The file-level job behind the CLI: read, validate, segment, compose and write.

Everything the user gave is checked (and the outputs' folders tried) before the model is
loaded, so a typo costs seconds, not a finished run; outputs are written atomically, and the
user's annotated slices reach the output unchanged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .api import METHODS, LabelSupport, MethodOptions, ModelSettings, Reference
from .errors import InputError
from .events import Events, RunEvents
from .outputs import SEG_NRRD_SUFFIX, check_writable, segment_color, write_label_volume, write_seg_nrrd
from .volume import (
    AXIS_CHOICES,
    MAX_LABEL,
    annotated_slices,
    axis_name,
    check_plane_size,
    check_preset,
    read_image,
    read_labels,
    resolve_axis,
    resolve_preset,
    to_array,
)


def segment_files(
    image_path,
    support_path,
    out_path,
    *,
    labels: Sequence[int] | None = None,
    support_slices: Sequence[int] | None = None,
    method: str = "ofl",
    axis: str = "auto",
    preset: str = "auto",
    settings: ModelSettings,
    options: MethodOptions | None = None,
    references: Sequence[tuple[str, str]] = (),
    seg_nrrd_path=None,
    events: RunEvents | None = None,
    engine=None,
    label_names: Mapping[int, str] | None = None,
) -> dict:
    """Segment ``image_path`` from the annotated slices in ``support_path`` and write the result.

    - ``labels``: label values to segment; default every label present in the support.
    - ``support_slices``: restrict the support to these planes (indices along the slice axis);
      default every plane that contains the label.
    - ``axis``: ``axial|coronal|sagittal|auto`` (see :func:`oflsam2.volume.resolve_axis`).
    - ``references``: ``(image, label map)`` file pairs used as extra support; each is reoriented
      to the target's axis order so slices are taken along the same anatomical axis.
    - ``support_path=None`` needs ``options.adapter`` (a trained OFL-SAM2 adapter) and ``labels``.
    - ``label_names``: names for the output segments (default ``label_<n>``).

    The output holds all labels in one map; where two labels' masks overlap, the label listed
    later wins, except on annotated slices, which are copied from the support unchanged.
    Returns a summary: labels, axis, slices per label, output paths, voxel counts, timings.
    """
    started = time.perf_counter()
    options = options or MethodOptions()
    events = events or Events()
    _check_options(method, axis, preset, support_path, options, labels)
    outputs = _check_outputs(
        out_path, seg_nrrd_path, [image_path, support_path, *(p for pair in references for p in pair)]
    )

    image = read_image(image_path)
    volume = to_array(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    support = read_labels(support_path, image) if support_path is not None else None
    chosen = _choose_labels(support, labels, support_path)
    names = _label_names(chosen, label_names)
    axis_index = resolve_axis(axis, direction, image.GetSpacing(), _restrict(support, chosen))
    check_plane_size(volume.shape, axis_index)
    slices = _choose_slices(support, chosen, axis_index, support_slices, volume.shape)
    supports = [_label_support(support, value, names[value], slices[value], volume.shape) for value in chosen]
    reference_list = [_read_reference(pair, image) for pair in references]
    read_seconds = time.perf_counter() - started

    if engine is None:
        from .api import Engine

        engine = Engine(settings)
    result = engine.segment(
        volume,
        supports,
        method=method,
        axis=axis_index,
        preset=preset,
        options=options,
        references=reference_list,
        events=events,
    )
    segment_seconds = time.perf_counter() - started - read_seconds

    events.progress("writing", 0, len(outputs), "writing outputs")
    composed = compose_labels(result.masks, supports, volume.shape, axis_index)
    write_label_volume(composed, image, outputs[0])
    if seg_nrrd_path is not None:
        segments = [(value, names[value], segment_color(names[value], value)) for value in chosen]
        write_seg_nrrd(composed, image, outputs[1], segments)
    events.progress("writing", len(outputs), len(outputs), "done")
    total = time.perf_counter() - started
    return {
        "image": str(image_path),
        "support": None if support_path is None else str(support_path),
        "method": method,
        "labels": list(chosen),
        "label_names": names,
        "axis": axis_index,
        "axis_name": axis_name(axis_index, direction),
        "preset": resolve_preset(volume, preset),
        "slices": {value: list(slices[value]) for value in chosen},
        "voxels": {value: int(np.count_nonzero(composed == value)) for value in chosen},
        "outputs": [str(p) for p in outputs],
        "timings": {
            "read": read_seconds,
            "segment": segment_seconds,
            "write": total - read_seconds - segment_seconds,
            "total": total,
        },
        "engine": dict(result.info),
    }


def compose_labels(masks: Mapping[int, np.ndarray], supports: Sequence[LabelSupport], shape, axis: int) -> np.ndarray:
    """One ``(z, y, x)`` label map from per-label bool masks, in ``supports`` order.

    Where masks overlap the later label wins. On each label's annotated planes its voxels are
    then reset to exactly the user's annotation (the engine does the same; this guarantees it
    for any engine).
    """
    highest = max((s.label for s in supports), default=0)
    composed = np.zeros(shape, dtype=np.uint8 if highest <= 255 else np.uint16)
    for support in supports:
        mask = masks.get(support.label)
        if mask is None or np.shape(mask) != tuple(shape):
            raise InputError(f"The engine returned no {tuple(shape)} mask for label {support.name!r}.")
        composed[np.asarray(mask, dtype=bool)] = support.label
    for support in supports:
        for index in support.slices:
            plane = _plane(composed, axis, index)
            plane[plane == support.label] = 0
            plane[_plane(support.mask, axis, index)] = support.label
    return composed


def _plane(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A writable view of plane ``index`` along ``axis``."""
    return np.moveaxis(array, axis, 0)[index]


def _check_options(method, axis, preset, support_path, options, labels) -> None:
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    if axis not in AXIS_CHOICES:
        raise InputError(f"Unknown slice axis {axis!r}; choose one of: {', '.join(AXIS_CHOICES)}.")
    check_preset(preset)
    if support_path is None:
        if options.adapter is None:
            raise InputError(
                "Give a support label map with annotated slices, or a trained adapter (--adapter) "
                "to segment without one."
            )
        if method != "ofl":
            raise InputError(f"Segmenting without support needs an OFL-SAM2 adapter; method {method!r} cannot use one.")
        if not labels:
            raise InputError("Without a support label map, name the label value(s) the adapter should segment.")
        if not Path(options.adapter).is_dir():
            raise InputError(f"The adapter folder {options.adapter} does not exist.")


def _check_outputs(out_path, seg_nrrd_path, inputs) -> list[Path]:
    """Try every output location first, and never let an output overwrite an input."""
    outputs = [check_writable(out_path)]
    if seg_nrrd_path is not None:
        outputs.append(check_writable(seg_nrrd_path, (SEG_NRRD_SUFFIX,)))
        if _same_file(outputs[0], outputs[1]):
            raise InputError(f"The label volume and the segmentation file are both {outputs[0]}; give two names.")
    for output in outputs:
        for source in inputs:
            if source is not None and _same_file(output, Path(source)):
                raise InputError(
                    f"The output {output} is one of the inputs; choose another name so your data is not overwritten."
                )
    return outputs


def _same_file(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _choose_labels(support, labels, support_path) -> list[int]:
    if support is None:
        return _unique_ints(labels)
    present = [int(v) for v in np.unique(support) if v != 0]
    if not present:
        raise InputError(f"The support {support_path} has no labelled voxel; annotate at least one slice.")
    if labels is None:
        return present
    chosen = _unique_ints(labels)
    missing = [v for v in chosen if v not in present]
    if missing:
        raise InputError(f"Label(s) {missing} do not occur in the support {support_path}; it holds labels {present}.")
    return chosen


def _label_names(chosen, label_names) -> dict[int, str]:
    names = {value: str((label_names or {}).get(value, f"label_{value}")).strip() for value in chosen}
    for value, name in names.items():
        if not name or "\n" in name or "\r" in name:
            raise InputError(f"The name of label {value} must be one line of text; got {name!r}.")
    return names


def _unique_ints(labels) -> list[int]:
    chosen: list[int] = []
    for value in labels:
        if isinstance(value, bool) or int(value) != value or not 0 < int(value) <= MAX_LABEL:
            raise InputError(f"Label values must be integers from 1 to {MAX_LABEL}; got {value!r}.")
        if int(value) not in chosen:
            chosen.append(int(value))
    if not chosen:
        raise InputError("No label to segment was given.")
    return chosen


def _restrict(support, chosen) -> np.ndarray | None:
    if support is None:
        return None
    return np.where(np.isin(support, chosen), support, 0)


def _choose_slices(support, chosen, axis, support_slices, shape) -> dict[int, list[int]]:
    if support is None:
        return {value: [] for value in chosen}
    requested = None
    if support_slices is not None:
        requested = sorted({int(i) for i in support_slices})
        outside = [i for i in requested if not 0 <= i < shape[axis]]
        if outside:
            raise InputError(
                f"Slice(s) {outside} lie outside the volume: it has slices 0..{shape[axis] - 1} along this axis."
            )
        annotated = set(annotated_slices(np.isin(support, chosen), True, axis))
        empty = [i for i in requested if i not in annotated]
        if empty:
            raise InputError(
                f"Slice(s) {empty} hold no annotation of the chosen labels in the support; "
                f"annotated: {sorted(annotated)}."
            )
    slices = {}
    for value in chosen:
        planes = annotated_slices(support, value, axis)
        if requested is not None:
            planes = [i for i in planes if i in requested]
        if not planes:
            among = " among the requested ones" if requested else ""
            raise InputError(f"Label {value} has no annotated slice{among}; annotate at least one.")
        slices[value] = planes
    return slices


def _label_support(support, value, name, slices, shape) -> LabelSupport:
    mask = np.zeros(shape, dtype=bool) if support is None else support == value
    return LabelSupport(label=value, name=name, mask=mask, slices=list(slices))


def _read_reference(pair, target: sitk.Image) -> Reference:
    """A reference image + label map, reoriented to the target's axis order."""
    image_path, labels_path = pair
    image = read_image(image_path)
    labels = sitk.GetImageFromArray(read_labels(labels_path, image))
    labels.CopyInformation(image)
    orientation = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(target.GetDirection())
    image, labels = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(labels, orientation)
    name = Path(str(image_path).rstrip("/\\")).name
    return Reference(image=to_array(image), labels=sitk.GetArrayFromImage(labels), name=name)
