"""Benchmark: seconds per plane written into a Slicer segment, add-only vs Update's replacement.

Real MRML (``slicer-core``), a real volume: CHAOS T2 case 1 (256 x 256 x 37 by default) with
Liver, both kidneys and Spleen from the ground truth on one shared labelmap layer (as the
Segment Editor stores them). Every Liver plane but three is written once, side by side:

- ``add``: a run's write (``SegmentSliceWriter``, ``MODE_MERGE_MASK`` of the plane), onto a Liver
  painted on the three planes only;
- ``replace_old``: Update's replacement before this benchmark's change, reproduced here: read the
  whole segment, set the plane in the copy and write the whole segment back (``MODE_REPLACE``);
- ``replace_new``: ``SegmentPlaneReplacer`` (``MODE_MERGE_MIN`` of the voxels to clear, then
  ``MODE_MERGE_MASK`` of the ones to add, both over the plane only).

Both replacements start from the ground-truth Liver and write each plane's neighbour's mask (a
real change on every plane). Printed: seconds per plane of each, and replace/add ratios. Every
write is checked afterwards: the two replacements must leave identical segments.

    python benchmarks/plane_writes.py [--case 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"
ORGANS = {"Liver": 1, "Right kidney": 2, "Left kidney": 3, "Spleen": 4}


def register_converter_rules(slicer) -> None:
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def make_scene(image, labels, liver_planes):
    """A scene with the volume and a segmentation: Liver on ``liver_planes`` only (all: None),
    the other organs whole; all on one layer."""
    import SimpleITK as sitk
    import slicer

    from OFLSAM2SegmentLib import mrml_geometry

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CHAOS")
    slicer.util.updateVolumeFromArray(volume, sitk.GetArrayFromImage(image).astype(np.float32))
    flip = np.diag([-1.0, -1.0, 1.0])  # ITK's LPS -> RAS
    volume.SetSpacing(*image.GetSpacing())
    volume.SetOrigin(*(flip @ np.asarray(image.GetOrigin())))
    volume.SetIJKToRASDirections([[float(v) for v in row] for row in flip @ np.asarray(image.GetDirection()).reshape(3, 3)])
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    geometry = mrml_geometry.volume_geometry(volume)
    grid = mrml_geometry.SegmentGrid.of_volume(geometry)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = {}
    for name, value in ORGANS.items():
        mask = labels == value
        if name == "Liver" and liver_planes is not None:
            keep = np.zeros(mask.shape[0], bool)
            keep[liver_planes] = True
            mask &= keep[:, None, None]
        ids[name] = segmentation.GetSegmentation().AddEmptySegment(name, name)
        if not ids[name]:
            raise RuntimeError("AddEmptySegment failed: converter rules not registered")
        if mask.any() and not logic.SetBinaryLabelmapToSegment(grid.image(mask), segmentation, ids[name], logic.MODE_MERGE_MASK):
            raise RuntimeError(f"could not write {name}")
    return scene, volume, segmentation, ids, geometry


class WholeSegmentRewrite:
    """Update's plane replacement before ``SegmentPlaneReplacer``: the whole segment per plane."""

    def __init__(self, segmentation_node, geometry):
        self.segmentation_node = segmentation_node
        self.geometry = geometry

    def write(self, segment_id, axis, index, plane):
        import slicer

        from OFLSAM2SegmentLib import mrml_geometry

        grid = mrml_geometry.segment_grid(self.segmentation_node, segment_id, self.geometry)
        extent, _, value = grid.plane_voxels(self.geometry, axis, index, np.asarray(plane) > 0)
        current = slicer.vtkOrientedImageData()
        self.segmentation_node.GetBinaryLabelmapRepresentation(segment_id, current)
        voxels = grid.read(current)
        k0, j0, i0 = grid.extent[4], grid.extent[2], grid.extent[0]
        box = (slice(extent[4] - k0, extent[5] - k0 + 1), slice(extent[2] - j0, extent[3] - j0 + 1),
               slice(extent[0] - i0, extent[1] - i0 + 1))
        if np.array_equal(voxels[box], value):
            return True
        voxels[box] = value
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(grid.image(voxels), self.segmentation_node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"could not write plane {index}")
        return True


def timed_writes(writer, segment_id, planes, masks) -> float:
    start = time.perf_counter()
    for index in planes:
        writer.write(segment_id, 0, index, masks[index])
    return (time.perf_counter() - start) / len(planes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="each method's best of this many passes is printed")
    args = parser.parse_args()

    import SimpleITK as sitk
    import slicer

    from OFLSAM2SegmentLib import mrml_read, mrml_write

    register_converter_rules(slicer)
    image = sitk.ReadImage(str(DATA / f"image_{args.case}.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / f"label_{args.case}.nii.gz")))).astype(np.uint8)
    liver = labels == ORGANS["Liver"]
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    annotated = [int(present[round(f * (len(present) - 1))]) for f in (0.15, 0.35, 0.85)]
    planes = [int(i) for i in present if i not in annotated]
    new_masks = {i: liver[i + 1] if i + 1 < liver.shape[0] else liver[i - 1] for i in planes}  # the neighbour's mask
    size = "x".join(str(n) for n in labels.shape[::-1])
    print(f"CHAOS T2 case {args.case} ({size}), Liver written on {len(planes)} planes, "
          f"{len(ORGANS)} segments on one layer; best of {args.repeats}")

    best = {"add": np.inf, "replace_old": np.inf, "replace_new": np.inf}
    results = {}
    for _ in range(args.repeats):
        for method in best:
            scene, volume, segmentation, ids, geometry = make_scene(image, labels, annotated if method == "add" else None)
            writer = {
                "add": mrml_write.SegmentSliceWriter,
                "replace_old": WholeSegmentRewrite,
                "replace_new": mrml_write.SegmentPlaneReplacer,
            }[method](segmentation, geometry)
            best[method] = min(best[method], timed_writes(writer, ids["Liver"], planes, new_masks))
            results[method] = mrml_read.segment_masks(segmentation, list(ids.values()), volume)
            scene.Clear(1)
    for name, mask in results["replace_old"].items():
        if not np.array_equal(mask, results["replace_new"][name]):
            raise SystemExit(f"the two replacements disagree on segment {name}")
    print(f"add_s_per_plane={best['add']:.4f} replace_old_s_per_plane={best['replace_old']:.4f} "
          f"replace_new_s_per_plane={best['replace_new']:.4f}")
    print(f"replace_old_over_add={best['replace_old'] / best['add']:.2f} "
          f"replace_new_over_add={best['replace_new'] / best['add']:.2f} "
          f"old_over_new={best['replace_old'] / best['replace_new']:.1f}")


if __name__ == "__main__":
    main()
