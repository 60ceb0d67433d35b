"""Trained OFL-SAM2 adapters in Slicer: the :class:`~.logic.OFLSAM2Logic` methods that use one in
the following runs, train and save one, or segment a cohort of volumes with one (no annotation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer

from oflsam2.errors import InputError

from . import mrml_geometry
from .options import check_outputs, parse_options, read_adapters, snake_case
from .run_plan import check_input_nodes, is_node


class AdapterMixin:
    """Needs the façade's ``adapterPath`` and ``process``."""

    def loadAdapter(self, adapterPath: str | None) -> list[dict]:
        """Use a saved OFL-SAM2 adapter folder in the following runs (``None``: stop using one).
        Returns each label's adapter metadata (``label_name``, ``model``, ``image_size``, ``axis``...)."""
        if not adapterPath:
            self.adapterPath = None
            return []
        adapters = read_adapters(adapterPath)
        self.adapterPath = str(adapterPath)
        return adapters

    def saveAdapter(self, volumeNode, segmentationNode, adapterPath: str, segmentIds=None, progressCallback=None,
                    **options) -> dict:
        """Train OFL-SAM2 on the annotated slices, segment the volume, and save the trained
        adapter to ``adapterPath`` (written only if the whole run succeeds). Blocking."""
        if "method" in options:
            raise InputError("saveAdapter always trains OFL-SAM2 (method 'ofl'); leave out the method option.")
        return self.process(volumeNode, segmentationNode, segmentIds, "ofl", True, progressCallback,
                            saveAdapter=str(adapterPath), **options)

    def segmentVolumesWithAdapter(self, volumeNodes, adapterPath: str, segmentNames: Sequence[str] | None = None,
                                  progressCallback=None, **options) -> list:
        """Segment a cohort without any annotation: one new segmentation per volume with one
        segment per adapter label (or per name in ``segmentNames``). The model, image size,
        intensity preset and slice axis default to the adapter's. Blocking; returns the new
        segmentation nodes. If any volume fails, every segmentation this call created is
        removed again and the error is raised: the scene is left as it was."""
        from oflsam2.adapter_labels import adapter_stem
        from oflsam2.volume import axis_name

        adapters = read_adapters(adapterPath)
        if isinstance(segmentNames, str):
            segmentNames = [segmentNames]
        names = (list(segmentNames) if segmentNames is not None
                 else [a.get("label_name") or adapter_stem("", a["label"]) for a in adapters])
        if not names or not all(isinstance(n, str) and n for n in names) or len({n.casefold() for n in names}) != len(names):
            raise InputError(f"segmentNames must be distinct, non-empty names of the adapter's labels (or None for all "
                             f"of them); got {segmentNames!r}.")
        trained = adapters[0]
        options = {snake_case(k): v for k, v in options.items()}
        for key in ("model", "image_size", "preset"):
            options.setdefault(key, trained[key])
        options["adapter"] = str(adapterPath)
        volumeNodes = [volumeNodes] if is_node(volumeNodes, "vtkMRMLNode") else list(volumeNodes or ())
        config = parse_options("ofl", {**options, "axis": options.get("axis") or "auto"})
        for volumeNode in volumeNodes:  # every volume and option checked before any node is made
            _check_cohort_volume(volumeNode, options.get("axis") or None, int(trained["axis"]))
        check_outputs(config, names)
        created = []
        try:
            for volumeNode in volumeNodes:
                scene = volumeNode.GetScene()
                segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} OFL-SAM2")
                created.append(segmentation)
                segmentation.CreateDefaultDisplayNodes()
                segmentation.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())  # lies where its volume does
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in names]
                if not all(ids):
                    raise RuntimeError("Could not create segments: the segmentation converter rules are not registered.")
                axis = options.get("axis") or axis_name(int(trained["axis"]), mrml_geometry.volume_geometry(volumeNode).direction_lps)
                self.process(volumeNode, segmentation, ids, "ofl", True, progressCallback, **{**options, "axis": axis})
        except BaseException:
            for segmentation in created:
                _remove_with_display_nodes(segmentation)
            raise
        return created


def _check_cohort_volume(volumeNode, axis_choice: str | None, adapter_axis: int) -> None:
    """What :meth:`OFLSAM2Logic.process` would refuse about a volume of a cohort (before any
    volume is segmented): not a scalar volume, NaN voxels, slices too small along the axis."""
    from oflsam2.volume import check_plane_size, resolve_axis

    check_input_nodes(volumeNode, None, need_segmentation=False)
    name = volumeNode.GetName()
    if not np.isfinite(slicer.util.arrayFromVolume(volumeNode)).all():
        raise InputError(f"Volume {name!r} contains NaN or infinite voxels; fix or mask them before segmenting. "
                         "No volume was segmented.")
    geometry = mrml_geometry.volume_geometry(volumeNode)
    axis = resolve_axis(axis_choice, geometry.direction_lps, geometry.spacing_xyz) if axis_choice else adapter_axis
    try:
        check_plane_size(geometry.shape, axis)
    except InputError as error:
        raise InputError(f"Volume {name!r}: {error} No volume was segmented.") from None


def _remove_with_display_nodes(node) -> None:
    scene = node.GetScene()
    if scene is None:
        return
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    for display_node in display_nodes:
        if display_node is not None and display_node.GetScene() is scene:
            scene.RemoveNode(display_node)
    scene.RemoveNode(node)
