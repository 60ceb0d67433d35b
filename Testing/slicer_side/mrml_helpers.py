"""Helpers for tests with real MRML classes (slicer-core): build volumes and segmentations."""

from __future__ import annotations

import numpy as np
import pytest


def require_slicer():
    """The ``slicer`` module of ``slicer-core``, or skip (never the unrelated PyPI ``slicer``)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
    return slicer


def add_volume(scene, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions_ras=None, name="Volume"):
    """A scalar volume node holding ``array`` (z, y, x); ``directions_ras`` has the i, j, k axes as columns."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if directions_ras is not None:
        node.SetIJKToRASDirections([[float(v) for v in row] for row in np.asarray(directions_ras)])
    return node


def add_volume_from_sitk(scene, image, name="Volume"):
    """A volume node from a SimpleITK image, LPS -> RAS (negate x and y)."""
    import SimpleITK as sitk

    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ np.asarray(image.GetDirection()).reshape(3, 3)
    origin = flip @ np.asarray(image.GetOrigin())
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return add_volume(scene, array, image.GetSpacing(), origin, direction, name)


def add_segmentation(scene, volume, masks: dict, name="Segmentation"):
    """A segmentation on ``volume``'s grid with one segment per ``{name: bool (z, y, x) mask}``,
    written as whole volumes (all segments share one layer when they do not overlap)."""
    import slicer

    from OFLSAM2SegmentLib import mrml_geometry

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    geometry = mrml_geometry.volume_geometry(volume)
    ids = []
    for segment_name, mask in masks.items():
        segment_id = node.GetSegmentation().AddEmptySegment(segment_name, segment_name)
        assert segment_id, "AddEmptySegment returned '' (converter rules not registered)"
        ids.append(segment_id)
        if np.any(mask):
            image = whole_image(geometry, mask)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            assert logic.SetBinaryLabelmapToSegment(image, node, segment_id, logic.MODE_MERGE_MASK)
    return node, ids


def whole_image(geometry, mask):
    """A ``vtkOrientedImageData`` of a whole (z, y, x) mask on ``geometry``."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    z, y, x = geometry.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    )
    image.SetImageToWorldMatrix(geometry.vtk_matrix())
    return image


def read_segments(segmentation, volume, ids=None):
    """{segment id: bool (z, y, x)} of every (or the given) segment on the volume grid."""
    from OFLSAM2SegmentLib import mrml_read

    ids = list(ids) if ids is not None else list(segmentation.GetSegmentation().GetSegmentIDs())
    return mrml_read.segment_masks(segmentation, ids, volume)
