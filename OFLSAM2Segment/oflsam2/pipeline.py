"""The file-level job behind the CLI: read, validate, segment, compose and write.

Everything the user gave is checked (and the outputs' folders tried) before the model is
loaded, so a typo costs seconds, not a finished run; outputs are written atomically, and the
user's annotated slices reach the output unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .adapter_labels import UNNAMED, find_adapter, intensity_warning, require_adapter
from .errors import AdapterError, InputError, OFLSAM2Error
from .events import Events, RunEvents
from .outputs import (
    SEG_NRRD_SUFFIX,
    StagedOutputs,
    check_writable,
    same_file,
    segment_color,
    write_label_volume,
    write_seg_nrrd,
)
from .review_checks import image_digest
from .settings import DEFAULT_METHOD, METHODS, LabelSupport, MethodOptions, ModelSettings, Reference
from .volume import (
    AXIS_CHOICES,
    MAX_LABEL,
    SliceRanges,
    annotated_slices,
    axis_name,
    check_plane_size,
    check_preset,
    format_indices,
    intensity_summary,
    read_image,
    read_labels,
    resolve_axis,
    resolve_preset,
    to_array,
)

log = logging.getLogger(__name__)


def segment_files(
    image_path,
    support_path,
    out_path,
    *,
    labels: Sequence[int] | None = None,
    support_slices: Sequence[int] | SliceRanges | None = None,
    method: str = DEFAULT_METHOD,
    axis: str = "auto",
    preset: str = "auto",
    settings: ModelSettings,
    options: MethodOptions | None = None,
    references: Sequence[tuple[str, str]] = (),
    seg_nrrd_path=None,
    events: RunEvents | None = None,
    engine=None,
    label_names: Mapping[int, str] | None = None,
    cleared_slices: Sequence[int] = (),
    adapter_files: StagedOutputs | None = None,
) -> dict:
    """Segment ``image_path`` from the annotated slices in ``support_path`` and write the result.

    - ``labels``: label values to segment; default every label present in the support (without
      one: in the adapter, else in the references).
    - ``support_slices``: restrict the support to these planes (indices along the slice axis, or
      :class:`~oflsam2.volume.SliceRanges`); default every plane that contains a chosen label.
      A plane annotated for any label is annotated for all of them (absent = "object absent").
    - ``axis``: ``axial|coronal|sagittal|auto`` (see :func:`oflsam2.volume.resolve_axis`).
    - ``references``: ``(image, label map)`` file pairs used as support; each is reoriented
      to the target's axis order so slices are taken along the same anatomical axis. They may be
      the only support (``support_path=None``) except for ``sam2``, which needs a prompt in the
      volume.
    - ``support_path=None`` needs references or ``options.adapter`` (a trained OFL-SAM2 adapter).
    - ``label_names``: names for the output segments and the adapters (default: the name of the
      label's adapter when ``options.adapter`` holds one for its value, else ``label_<n>``).
    - ``cleared_slices``: planes of ``support_slices`` that hold no label in the support and are
      annotated as such ("object absent" for every label: an update's cleared false positives).
    - ``adapter_files``: a :class:`~oflsam2.outputs.StagedOutputs` the adapter of
      ``options.save_adapter`` is written into, for the caller to commit (an update commits it
      with its saved state). Default: it replaces the folder's adapter right after the outputs
      are written, never before (a failed write leaves the previous adapter).

    The output holds all labels in one map; where two labels' masks overlap, the label listed
    later wins, except on annotated slices, which are copied from the support unchanged. The
    outputs are written together or not at all. Returns a summary: labels, axis, slices per
    label, output paths, voxel counts, timings, warnings.
    """
    started = time.perf_counter()
    options = options or MethodOptions()
    events = events or Events()
    warnings: list[str] = []
    _check_options(method, axis, preset, support_path, options, references)
    outputs = _check_outputs(
        out_path, seg_nrrd_path, [image_path, support_path, *(p for pair in references for p in pair)]
    )
    adapters = _read_adapters(options.adapter)

    image = read_image(image_path)
    volume = to_array(image)
    if _looks_like_labels(volume):
        warnings.append(
            f"The image {image_path} holds only the values {np.unique(volume).astype(int).tolist()}: it looks like a "
            "label map. Give the CT/MR volume as --image and the label map as --support."
        )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    support = read_labels(support_path, image) if support_path is not None else None
    reference_list = [_read_reference(pair, image) for pair in references]
    for (reference_path, _), reference in zip(references, reference_list):
        if _looks_like_labels(reference.image):
            warnings.append(
                f"The reference image {reference_path} holds only the values "
                f"{np.unique(reference.image).astype(int).tolist()}: it looks like a label map. Write each reference "
                "as IMAGE:LABELS, the CT/MR volume first."
            )
    chosen = _choose_labels(support, labels, support_path, adapters, reference_list)
    names = _label_names(chosen, label_names, adapters, options.adapter)
    axis_index = resolve_axis(axis, direction, image.GetSpacing(), _restrict(support, chosen))
    if axis != "auto" and support is not None:
        _check_drawn_across(_restrict(support, chosen), axis_index, direction, image.GetSpacing())
    check_plane_size(volume.shape, axis_index)
    slices = _choose_slices(support, chosen, axis_index, support_slices, volume.shape, bool(reference_list), cleared_slices)
    supports = [_label_support(support, value, names[value], slices, volume.shape) for value in chosen]
    warnings += _check_reference_labels(chosen, support, slices, axis_index, reference_list, method)
    if adapters:
        preset = _adapter_preset(adapters, preset)
        warnings += _check_adapters(adapters, options, chosen, names, settings, axis_index, volume, preset)
    if method == "sam2" and support is None:
        raise InputError(
            "SAM2 propagation needs a prompt in the volume itself: give --support with at least one annotated "
            "slice, or use --method ofl, revsam2 or forward with --reference volumes."
        )
    for message in warnings:
        log.warning(message)
    read_seconds = time.perf_counter() - started

    if engine is None:
        from .api import Engine

        engine = Engine(settings)
    own_adapter_files = adapter_files is None and options.save_adapter is not None
    if own_adapter_files:
        adapter_files = StagedOutputs()
    staging = {"staged": adapter_files} if options.save_adapter is not None else {}
    try:
        result = engine.segment(
            volume,
            supports,
            method=method,
            axis=axis_index,
            preset=preset,
            options=options,
            references=reference_list,
            events=events,
            **staging,
        )
        segment_seconds = time.perf_counter() - started - read_seconds

        events.progress("writing", 0, len(outputs), "writing outputs")
        composed = compose_labels(result.masks, supports, volume.shape, axis_index)
        with StagedOutputs() as staged:  # both files or neither
            write_label_volume(composed, image, outputs[0], staged=staged)
            if seg_nrrd_path is not None:
                segments = [(value, names[value], segment_color(names[value], value)) for value in chosen]
                write_seg_nrrd(composed, image, outputs[1], segments, staged=staged)
    except BaseException:
        if own_adapter_files:  # the previous adapter stays
            adapter_files.discard()
        raise
    if own_adapter_files:
        _commit_after_outputs(adapter_files, [str(p) for p in outputs], f"the adapter in {options.save_adapter}")
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
        "image_digest": image_digest(volume),
        "slices": {value: list(slices) for value in chosen},
        "voxels": {value: int(np.count_nonzero(composed == value)) for value in chosen},
        "outputs": [str(p) for p in outputs],
        "warnings": warnings,
        "timings": {
            "read": read_seconds,
            "segment": segment_seconds,
            "write": total - read_seconds - segment_seconds,
            "total": total,
        },
        "engine": dict(result.info),
    }


def _commit_after_outputs(files: StagedOutputs, outputs: Sequence[str], what: str) -> None:
    """Commit ``files`` (written after ``outputs``, which are in place); a failure says so."""
    try:
        files.commit()
    except OFLSAM2Error as error:
        raise OFLSAM2Error(
            f"{' and '.join(outputs)} {'were' if len(outputs) > 1 else 'was'} written, but {what} could not be: "
            f"{error}. Make room (or fix the folder) and run the same command again."
        ) from None


def compose_labels(masks: Mapping[int, np.ndarray], supports: Sequence[LabelSupport], shape, axis: int) -> np.ndarray:
    """One ``(z, y, x)`` label map from per-label bool masks, in ``supports`` order.

    Where masks overlap the later label wins. Every plane annotated for any label is then
    copied whole from the annotations (a label absent there stays absent), so the user's
    annotated slices come out exactly as drawn whatever the engine returned.
    """
    highest = max((s.label for s in supports), default=0)
    composed = np.zeros(shape, dtype=np.uint8 if highest <= 255 else np.uint16)
    for support in supports:
        mask = masks.get(support.label)
        if mask is None or np.shape(mask) != tuple(shape):
            raise InputError(f"The engine returned no {tuple(shape)} mask for label {support.name!r}.")
        composed[np.asarray(mask, dtype=bool)] = support.label
    for index in sorted({i for support in supports for i in support.slices}):
        plane = _plane(composed, axis, index)
        plane[...] = 0
        for support in supports:
            plane[_plane(support.mask, axis, index)] = support.label
    return composed


def _plane(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A writable view of plane ``index`` along ``axis``."""
    return np.moveaxis(array, axis, 0)[index]


def _check_options(method, axis, preset, support_path, options, references) -> None:
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    if axis not in AXIS_CHOICES:
        raise InputError(f"Unknown slice axis {axis!r}; choose one of: {', '.join(AXIS_CHOICES)}.")
    check_preset(preset)
    for flag, value in (("--adapter", options.adapter), ("--save-adapter", options.save_adapter)):
        if value is not None and method != "ofl":
            raise InputError(f"{flag} is for OFL-SAM2 adapters; method {method!r} cannot use one. Use --method ofl.")
    if options.adapter is not None:
        _check_adapter_folder(Path(options.adapter))
    if options.save_adapter is not None:
        check_folder_writable(Path(options.save_adapter), "--save-adapter")
    if support_path is None and options.adapter is None and not references:
        raise InputError(
            "Give a support label map with annotated slices (--support), other annotated volumes "
            "(--reference IMG:LABELS), or a trained adapter (--adapter) to segment without one."
        )


def _check_adapter_folder(folder: Path) -> None:
    if folder.is_file():
        raise InputError(
            f"--adapter wants the adapter folder (the one holding {folder.name}), not a file in it: "
            f"give {folder.parent}."
        )
    if not folder.is_dir():
        raise InputError(f"The adapter folder {folder} does not exist.")


def check_folder_writable(folder: Path, flag: str) -> None:
    """Refuse a folder that cannot be created or written, before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file; give a folder.")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {folder} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder} cannot be written: {existing} is not writable (permission denied).")


def _read_adapters(folder) -> list[dict]:
    """The metadata of every adapter in ``folder`` (none when no folder is given)."""
    if folder is None:
        return []
    from .ofl.adapter_metadata import list_adapters

    found = list_adapters(folder)
    if not found:
        raise InputError(f"The folder {folder} holds no adapter (no <label>.json file); train one with oflsam2 train.")
    return found


def _adapter_preset(adapters: list[dict], preset: str) -> str:
    """``auto`` with an adapter means the preset the adapter was trained with."""
    recorded = {a.get("preset") for a in adapters} - {None, "auto"}
    return recorded.pop() if preset == "auto" and len(recorded) == 1 else preset


def _check_adapters(adapters, options, chosen, names, settings, axis, volume, preset) -> list[str]:
    """Refuse, before the model is loaded, an adapter that cannot be used in this run; warn when
    the volume does not look like the ones it was trained on. Returns the warnings."""
    from .ofl.adapter_metadata import check_trained_with

    folder = options.adapter
    warnings = []
    resolved = resolve_preset(volume, preset)
    target = intensity_summary(volume)
    for value in chosen:
        adapter = require_adapter(adapters, value, names[value], folder)  # the rule the OFL-SAM2 loader applies
        current = {"model": settings.model, "image_size": settings.image_size, "axis": axis, "preset": resolved}
        problems = [
            f"{key} is {adapter.get(key)!r} in the adapter but {wanted!r} now"
            for key, wanted in current.items()
            if key in adapter and adapter[key] != wanted and not (key == "preset" and adapter[key] == "auto")
        ]
        if problems:
            raise AdapterError(
                f"The adapter {adapter['path']} does not fit this run: {'; '.join(problems)}. Use the adapter's "
                "settings (--model, --image-size, --axis, --preset) or train a new adapter."
            )
        check_trained_with(adapter, options)
        warning = intensity_warning(adapter, f"label {value}", target)
        if warning:
            warnings.append(warning)
    return warnings


def _check_outputs(out_path, seg_nrrd_path, inputs) -> list[Path]:
    """Try every output location first, and never let an output overwrite an input."""
    outputs = [check_writable(out_path)]
    if seg_nrrd_path is not None:
        outputs.append(check_writable(seg_nrrd_path, (SEG_NRRD_SUFFIX,)))
        if same_file(outputs[0], outputs[1]):
            raise InputError(f"The label volume and the segmentation file are both {outputs[0]}; give two names.")
    for output in outputs:
        refuse_inputs_as_output(output, inputs)
    return outputs


def refuse_inputs_as_output(output, inputs) -> None:
    """Refuse an output that is one of ``inputs`` (used by every command that writes)."""
    for source in inputs:
        if source is not None and same_file(output, source):
            raise InputError(
                f"The output {output} is one of the inputs ({source}); choose another name so your data is not overwritten."
            )


def _choose_labels(support, labels, support_path, adapters, references) -> list[int]:
    if support is None:
        if labels is not None:
            return _unique_ints(labels)
        if adapters:  # every label the adapter knows
            return _unique_ints(sorted({int(a["label"]) for a in adapters if isinstance(a.get("label"), int)}))
        present = sorted({int(v) for r in references for v in np.unique(r.labels) if v != 0})
        if not present:
            raise InputError("The reference label maps hold no labelled voxel; give annotated references.")
        return present
    present = [int(v) for v in np.unique(support) if v != 0]
    if not present:
        raise InputError(f"The support {support_path} has no labelled voxel; annotate at least one slice.")
    if labels is None:
        return present
    chosen = _unique_ints(labels)
    missing = [v for v in chosen if v not in present]
    if missing and not references and not adapters:
        raise InputError(f"Label(s) {missing} do not occur in the support {support_path}; it holds labels {present}.")
    return chosen


def _label_names(chosen, label_names, adapters, folder) -> dict[int, str]:
    """Each label's name: given, else its adapter's (found by value, see :mod:`oflsam2.adapter_labels`), else ``label_<n>``."""
    given = dict(label_names or {})
    unused = sorted(set(given) - set(chosen))
    if unused:
        raise InputError(f"Names were given for label(s) {unused}, which this run does not segment (labels {list(chosen)}).")
    names = {}
    for value in chosen:
        if value in given:
            names[value] = str(given[value]).strip()
            continue
        adapter = find_adapter(adapters, value, UNNAMED.format(value), folder) if adapters else None
        names[value] = str(adapter.get("label_name") or "").strip() if adapter else ""
        names[value] = names[value] or UNNAMED.format(value)
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


def _check_drawn_across(annotation: np.ndarray, axis: int, direction, spacing) -> None:
    """Refuse a requested axis whose planes the annotation only crosses as lines one voxel wide:
    it was drawn on another axis, and each crossed plane would count as annotated with a line."""
    planes = np.moveaxis(annotation != 0, axis, 0)
    if not planes.any() or (planes[:, :-1, :-1] & planes[:, 1:, :-1] & planes[:, :-1, 1:] & planes[:, 1:, 1:]).any():
        return
    drawn = resolve_axis("auto", direction, spacing, annotation)
    if drawn != axis:
        asked, drawn_name = axis_name(axis, direction), axis_name(drawn, direction)
        raise InputError(
            f"The annotation was drawn on {drawn_name} slices: it crosses the {asked} slices only as lines one voxel "
            f"wide, which would each count as an annotated slice. Leave out --axis (auto), or give --axis {drawn_name}."
        )


def _choose_slices(support, chosen, axis, support_slices, shape, has_references: bool, cleared=()) -> list[int]:
    """The annotated planes of the run: every plane holding a chosen label, or those requested
    (``cleared``: requested planes that may hold no label). Each is annotated for every label
    (an absent label there is an "object absent" annotation)."""
    if support is None:
        return []
    count = shape[axis]
    annotated = annotated_slices(np.isin(support, chosen), True, axis)
    planes = annotated
    if support_slices is not None:
        ranges = SliceRanges.of(support_slices)
        outside = ranges.outside(count)
        if outside:
            raise InputError(
                f"Slice(s) {format_indices(outside)} lie outside the volume: it has slices 0..{count - 1} along this axis."
            )
        planes = ranges.within(count)
        empty = sorted(set(planes) - set(annotated) - set(cleared))
        if empty:
            raise InputError(
                f"Slice(s) {format_indices(empty)} hold no annotation of the chosen labels in the support; "
                f"annotated: {format_indices(annotated)}."
            )
    for value in chosen:
        if not has_references and not any((np.take(support, i, axis=axis) == value).any() for i in planes):
            among = " among the requested ones" if support_slices is not None else ""
            raise InputError(f"Label {value} has no annotated slice{among}; annotate at least one.")
    return planes


def _label_support(support, value, name, slices, shape) -> LabelSupport:
    mask = np.zeros(shape, dtype=bool) if support is None else support == value
    return LabelSupport(label=value, name=name, mask=mask, slices=list(slices))


def _check_reference_labels(chosen, support, slices, axis, references, method) -> list[str]:
    """Warn about a reference that lacks a label; refuse a label no support holds at all."""
    if not references:
        return []
    warnings = []
    for value in chosen:
        lacking = [r.name for r in references if not np.any(r.labels == value)]
        in_volume = support is not None and any(np.any(np.take(support, i, axis=axis) == value) for i in slices)
        if len(lacking) == len(references) and not in_volume:
            raise InputError(
                f"Label {value} occurs in no support: neither the volume's annotation nor any --reference "
                f"({', '.join(lacking)}) holds it. Check the label value."
            )
        if lacking:
            warnings.append(f"Reference(s) {', '.join(lacking)} hold no voxel of label {value}; they add nothing for it.")
    return warnings


def _looks_like_labels(volume: np.ndarray, most: int = 16) -> bool:
    """A handful of whole values from 0: a label map, never a CT or MR scan (a sparse sample first
    keeps this cheap on real images)."""
    if len(np.unique(volume.ravel()[::97])) > most:
        return False
    values = np.unique(volume)
    return len(values) <= most and values.min() >= 0 and bool((values == np.rint(values)).all())


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
