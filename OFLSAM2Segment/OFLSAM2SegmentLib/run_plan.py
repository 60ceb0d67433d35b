"""What a run reads from the scene, checked and ready for the worker: its :class:`RunPlan`.

:func:`read_plan` reads a fresh run (the volume, each segment's annotated planes along the run's
axis, the reference pairs); :func:`update_plan` reads an Update of a completed run (its
annotated planes plus those corrected since). Main thread, no writes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from oflsam2.api import LabelSupport, Reference, validate_run
from oflsam2.errors import InputError

from . import mrml_geometry, mrml_read
from .options import RunConfig, read_adapters
from .worker import SegmentRequest


@dataclass
class SegmentTarget:
    """One segment of a run: the engine's label number and its annotated planes."""

    segment_id: str
    name: str
    label: int
    slices: list[int]
    ignored_axes: list[str] = dataclasses.field(default_factory=list)  # strokes drawn on other axes, left out


@dataclass
class RunPlan:
    """What was read from the scene for one run, ready for the worker."""

    volume_node: object
    segmentation_node: object
    geometry: mrml_geometry.VolumeGeometry
    axis: int
    axis_name: str
    targets: list[SegmentTarget]
    request: SegmentRequest | None  # released (None) when the run ends
    config: RunConfig
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the user: what was left out and why


def read_plan(volumeNode, segmentationNode, segmentIds, config: RunConfig, references=()) -> RunPlan:
    """Read the image and the annotated slices from the scene (main thread, no writes)."""
    with_adapter = bool(config.options.adapter)
    check_input_nodes(volumeNode, segmentationNode)
    segmentIds = segment_id_list(segmentIds)
    references = reference_pairs_list(references)
    chosen = segmentIds is None and not with_adapter  # the default: the segments drawn on the run's axis
    ids = segmentIds if segmentIds is not None else _default_segments(segmentationNode, volumeNode, with_adapter)
    support = read_support(volumeNode, segmentationNode, ids, config.axis)
    warnings = []
    if chosen:
        left_out = [s for s in ids if not support.slices[s]]
        ids = [s for s in ids if support.slices[s]] or ids  # none drawn on the axis: the error below says so
        warnings = [f"Segment {support.names[s]!r} has strokes only on the {' and '.join(support.ignored[s])} axis; "
                    f"it was left out of this {support.axis_name} run." for s in left_out if s not in ids]
    image, geometry = mrml_read.volume_array(volumeNode)
    reference_pairs = [_reference(pair, support.names) for pair in references]
    targets, supports = [], []
    for label, segment_id in enumerate(ids, start=1):
        name, slices = support.names[segment_id], support.slices[segment_id]
        if not slices and not with_adapter and not reference_pairs:
            ignored = support.ignored[segment_id]
            raise InputError(
                f"Segment {name!r} has no annotated slice. Paint it on at least one {support.axis_name} "
                "slice (or add a reference volume, or use a trained adapter)."
                + (f" Its strokes on the {' and '.join(ignored)} axis were ignored: a run along the "
                   f"{support.axis_name} axis uses only what was drawn on {support.axis_name} slices." if ignored else "")
            )
        targets.append(SegmentTarget(segment_id, name, label, slices, support.ignored[segment_id]))
        supports.append(LabelSupport(label, name, support.masks[segment_id], slices))
    # The engine's own checks (NaN voxels, supports...) here, before the worker starts any model work.
    image = validate_run(image, supports, method=config.method, axis=support.axis, preset=config.preset,
                         options=config.options, references=reference_pairs, settings=config.settings)
    request = SegmentRequest(config.settings, image, supports, config.method, support.axis, config.preset,
                             config.options, reference_pairs)
    return RunPlan(volumeNode, segmentationNode, geometry, support.axis, support.axis_name, targets, request, config,
                   warnings)


def update_plan(base) -> RunPlan:
    """The request of an update of ``base`` (the last completed :class:`~.run.Run`): the annotated planes of ``base`` and the planes
    edited since (any target differs there from what ``base`` left), read from the scene."""
    volume, segmentation = base.plan.volume_node, base.plan.segmentation_node
    if volume.GetScene() is None or segmentation.GetScene() is None:
        raise InputError("The volume or segmentation of the last run left the scene; run a fresh segmentation.")
    ids = [t.segment_id for t in base.plan.targets]
    mrml_read.check_segments(segmentation, ids)
    masks = mrml_read.segment_masks(segmentation, ids, volume)
    axis = base.plan.axis
    now = mrml_geometry.volume_geometry(volume)
    if (now.shape != base.plan.geometry.shape or not np.allclose(now.ijk_to_ras, base.plan.geometry.ijk_to_ras, atol=1e-4)
            or any(masks[s].shape != base.result_masks[s].shape for s in ids)):
        # read on a moved grid, every plane would differ from the result and count as corrected
        raise InputError("The volume's grid (size, spacing, origin or orientation) changed since the last run, "
                         "e.g. a transform was hardened; run a fresh segmentation.")
    edited = set()
    for segment_id in ids:
        changed = np.moveaxis(masks[segment_id] != base.result_masks[segment_id], axis, 0).any(axis=(1, 2))
        edited.update(int(i) for i in np.flatnonzero(changed))
    if not edited:
        raise InputError(f"No {base.plan.axis_name} slice was corrected since the last run; paint or erase on a "
                         "slice first, then Update.")
    drawn_on = mrml_read.drawing_axis([masks[s] ^ base.result_masks[s] for s in ids])
    if drawn_on is not None and drawn_on != axis:
        from oflsam2.volume import axis_name

        other = axis_name(drawn_on, base.plan.geometry.direction_lps)
        raise InputError(f"The corrections since the last run were drawn on {other} slices; Update takes corrections "
                         f"on {base.plan.axis_name} slices (the run's axis). Undo them and correct on "
                         f"{base.plan.axis_name} slices, or run a fresh segmentation along the {other} axis.")
    # An annotated plane may be empty (a cleared false positive, or a target absent from another
    # target's plane): only one that held voxels after the run and holds none now was erased.
    def holds(where: dict, index: int) -> bool:
        return any(np.take(where[s], index, axis=axis).any() for s in ids)

    erased = sorted(i for i in {i for t in base.plan.targets for i in t.slices}
                    if holds(base.result_masks, i) and not holds(masks, i))
    if erased:
        raise InputError(f"Annotated slice(s) {erased} were erased: an update cannot remove an annotation. Undo the "
                         "erase, or run a fresh segmentation. Nothing was changed.")
    annotated = {int(i) for i in base.summary["engine"].get("annotated", [])} | {i for t in base.plan.targets for i in t.slices}
    slices = sorted(annotated | edited)
    image, geometry = mrml_read.volume_array(volume)
    config = base.plan.config
    options = dataclasses.replace(config.options, save_adapter=None)  # the update never rewrites an adapter
    supports = [LabelSupport(t.label, t.name, masks[t.segment_id], slices) for t in base.plan.targets]
    image = validate_run(image, supports, method=config.method, axis=axis, preset=config.preset, options=options,
                         settings=config.settings)
    request = SegmentRequest(config.settings, image, supports, config.method, axis, config.preset, options,
                             previous_job=base.result_job)
    targets = [SegmentTarget(t.segment_id, t.name, t.label, slices) for t in base.plan.targets]
    return RunPlan(volume, segmentation, geometry, axis, base.plan.axis_name, targets, request,
                   dataclasses.replace(config, options=options))


def _default_segments(segmentationNode, volumeNode, with_adapter: bool) -> list[str]:
    ids = list(segmentationNode.GetSegmentation().GetSegmentIDs())
    if with_adapter or not ids:
        if not ids:
            raise InputError(f"Segmentation {segmentationNode.GetName()!r} has no segment; add one and paint a few slices.")
        return ids
    mrml_read.check_segments(segmentationNode, ids)  # the source representation, before reading
    masks = mrml_read.segment_masks(segmentationNode, ids, volumeNode)
    painted = [s for s in ids if masks[s].any()]
    if not painted:
        raise InputError("No segment has any painted voxel. Paint the structure on a few slices first.")
    return painted


def _reference(pair, names: dict[str, str]) -> Reference:
    volume, segmentation = pair
    check_input_nodes(volume, segmentation)
    image, _ = mrml_read.volume_array(volume)
    by_name = {n.lower(): s for s, n in mrml_read.segment_names(segmentation).items()}
    matched = {label: by_name[name.lower()] for label, name in enumerate(names.values(), start=1) if name.lower() in by_name}
    if not matched:
        raise InputError(
            f"Reference segmentation {segmentation.GetName()!r} has no segment named like the targets "
            f"({', '.join(names.values())}); rename its segments to match."
        )
    masks = mrml_read.segment_masks(segmentation, list(matched.values()), volume)
    labels = np.zeros(image.shape, dtype=np.uint16)
    for label, segment_id in matched.items():
        labels[masks[segment_id]] = label
    return Reference(image, labels, name=volume.GetName())


def adapter_warnings(config: RunConfig, plan: RunPlan) -> list[str]:
    """The CLI's warning when the volume does not look like the adapter's training volumes
    (an MR adapter on a CT volume, or the reverse)."""
    from oflsam2.adapter_labels import find_adapter, intensity_warning
    from oflsam2.volume import intensity_summary

    folder = config.options.adapter
    if not folder or plan.request is None or os.path.isfile(folder):
        return []
    adapters = read_adapters(folder)
    target = intensity_summary(plan.request.image)
    found = [(t, find_adapter(adapters, None, t.name, folder)) for t in plan.targets]
    return [w for w in (intensity_warning(a, f"segment {t.name!r}", target) for t, a in found if a) if w]


@dataclass
class Support:
    """The segments' annotation along the run's axis, as :func:`read_support` found it."""

    masks: dict  # segment id -> bool (z, y, x) on the volume grid
    names: dict  # segment id -> name
    slices: dict  # segment id -> annotated plane indices along ``axis``
    axis: int
    axis_name: str
    ignored: dict  # segment id -> names of the other axes it has strokes on (left out of ``masks``)


def read_support(volumeNode, segmentationNode, ids: list[str], axis_choice: str) -> Support:
    """Each segment on the volume grid, the slice axis (``auto``: the axis the strokes were drawn
    on, :func:`mrml_read.drawing_axis`, else the one the annotations lie along) and the annotated
    planes along it."""
    from oflsam2.volume import axis_name, check_plane_size, resolve_axis

    if not ids:
        raise InputError("No segment selected; select the segments to segment.")
    if len(set(ids)) != len(ids):
        raise InputError("A segment was selected twice; select each segment once.")
    mrml_read.check_same_space(volumeNode, segmentationNode)
    mrml_read.check_segments(segmentationNode, ids)
    geometry = mrml_geometry.volume_geometry(volumeNode)
    masks = mrml_read.segment_masks(segmentationNode, ids, volumeNode)
    union = np.zeros(geometry.shape, dtype=np.uint16)
    for label, segment_id in enumerate(ids, start=1):
        union[masks[segment_id]] = label
    axis = mrml_read.drawing_axis(masks.values()) if axis_choice == "auto" else None
    if axis is None:  # a named axis, or strokes that do not tell
        axis = resolve_axis(axis_choice, geometry.direction_lps, geometry.spacing_xyz, support=union)
    check_plane_size(geometry.shape, axis)
    drawn = {s: mrml_read.drawn_support(masks[s], axis) for s in ids}
    ignored = {s: [axis_name(a, geometry.direction_lps) for a in drawn[s].ignored_axes] for s in ids}
    return Support({s: drawn[s].mask for s in ids}, mrml_read.segment_names(segmentationNode, ids),
                    {s: drawn[s].planes for s in ids}, axis, axis_name(axis, geometry.direction_lps), ignored)


def segment_id_list(segmentIds) -> list[str] | None:
    """``segmentIds`` as a list: None stays None (the default segments), one string is one ID."""
    if segmentIds is None:
        return None
    if isinstance(segmentIds, str):
        ids = [segmentIds]
    else:
        try:
            ids = list(segmentIds)
        except TypeError:
            raise InputError(f"segmentIds must be a list of segment IDs (e.g. ['Segment_1']); got {segmentIds!r}.") from None
    if not ids:
        raise InputError("No segment selected: give at least one segment ID, or None for the default segments.")
    bad = [s for s in ids if not isinstance(s, str) or not s]
    if bad:
        raise InputError(f"Segment IDs must be non-empty strings (e.g. 'Segment_1'); got {bad!r}.")
    return ids


def reference_pairs_list(references) -> list[tuple]:
    """``references`` as a list of (volumeNode, segmentationNode) pairs, or a clear error."""
    pairs = list(references or ())
    for number, pair in enumerate(pairs, start=1):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(
                f"Reference {number} must be a pair (volumeNode, segmentationNode); got {pair!r}. "
                "Pass references=[(volumeNode, segmentationNode), ...]."
            )
    return [tuple(pair) for pair in pairs]


def ignored_stroke_warnings(targets: Sequence[SegmentTarget]) -> list[str]:
    return [f"Segment {t.name!r} also has strokes on the {' and '.join(t.ignored_axes)} axis, which were ignored."
            for t in targets if t.ignored_axes]


def is_node(node, class_name: str) -> bool:
    return callable(getattr(node, "IsA", None)) and bool(node.IsA(class_name))


def check_input_nodes(volumeNode, segmentationNode, need_segmentation: bool = True) -> None:
    if not is_node(volumeNode, "vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError("Select the CT or MR volume to segment (a scalar volume node, not a labelmap or a name).")
    if volumeNode.GetScene() is None:
        raise InputError(f"Volume {volumeNode.GetName()!r} is not in a scene.")
    mrml_geometry.check_scalar_volume(volumeNode)  # image data, spacing, one component: before reading any segment
    if not need_segmentation:
        return
    if not is_node(segmentationNode, "vtkMRMLSegmentationNode"):
        raise InputError("Select the segmentation that holds the annotated slices.")
    if volumeNode.GetScene() is None or volumeNode.GetScene() is not segmentationNode.GetScene():
        raise InputError("The volume and the segmentation must be in the same scene.")
