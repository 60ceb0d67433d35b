"""Label volumes and Slicer segmentation files: geometry round trips, metadata, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import outputs
from oflsam2.errors import InputError, OFLSAM2Error
from oflsam2.outputs import check_writable, segment_color, write_label_volume, write_seg_nrrd
from oflsam2.volume import read_image, read_labels

DATASETS = {
    "ras-totalsegmentator": (
        "totalsegmentator_ct_mr/example_ct.nii.gz",
        "totalsegmentator_ct_mr/example_seg_fast_force_split.nii.gz",
    ),
    "oblique-chaos2": ("chaos_t2_fewshot/image_2.nii.gz", "chaos_t2_fewshot/label_2.nii.gz"),
    "pli-deeplesion": ("deeplesion_medsam2/000015_01_01_103-115.nii.gz", None),
    "lps-dicom": ("dcmqi_ct3slice", "dcmqi_ct3slice/liver_spine_seg.nrrd"),
}


def load(shared_data, case):
    image_file, labels_file = DATASETS[case]
    image = read_image(shared_data / image_file)
    if labels_file is None:  # the DeepLesion NIfTI has its mask in the npz of the same clip
        labels = np.load(shared_data / "deeplesion_medsam2" / "CT_Lesion_000015_01_01_103-115.npz")["gts"].astype(
            np.uint8
        )
    else:
        labels = read_labels(shared_data / labels_file, image).astype(np.uint8)
    return image, labels


def assert_same_geometry(written: sitk.Image, reference: sitk.Image, float32_header: bool = False):
    """Equal geometry; NIfTI headers store it in float32, so there it is equal to float32 precision."""
    atol = 1e-6 * max(map(abs, reference.GetOrigin()), default=1) if float32_header else 1e-9
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(
        written.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-7 if float32_header else 1e-9
    )


@pytest.mark.parametrize("case", DATASETS)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_label_volume_round_trip_keeps_geometry_and_voxels(shared_data, tmp_path, case, suffix):
    image, labels = load(shared_data, case)
    path = write_label_volume(labels, image, tmp_path / f"out{suffix}")
    written = sitk.ReadImage(str(path))
    assert_same_geometry(written, image, float32_header=suffix.startswith(".nii"))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def test_labels_above_255_are_written_as_uint16(shared_data, tmp_path):
    image, labels = load(shared_data, "lps-dicom")
    labels = labels.astype(np.uint16) * 300
    written = sitk.ReadImage(str(write_label_volume(labels, image, tmp_path / "big.nrrd")))
    assert written.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((3, 512, 511), np.uint8), "shape"),
        (np.zeros((3, 512, 512), np.float32), "integers"),
        (np.full((3, 512, 512), -1, np.int32), "0..65535"),
    ],
)
def test_bad_label_arrays_are_refused_and_nothing_is_written(shared_data, tmp_path, labels, message):
    image, _ = load(shared_data, "lps-dicom")
    with pytest.raises(InputError, match=message):
        write_label_volume(labels, image, tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_catches_every_bad_destination(tmp_path):
    assert check_writable(tmp_path / "out.nii.gz") == tmp_path / "out.nii.gz"
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.nii.gz")
    with pytest.raises(InputError, match="must end with"):
        check_writable(tmp_path / "out.png")
    (tmp_path / "folder.nrrd").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path / "folder.nrrd")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out.nrrd")
    with pytest.raises(InputError, match="not writable"):
        check_writable("/proc/out.nrrd")  # a folder that accepts no new file, even for root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.nrrd"]


def test_a_failed_write_leaves_the_previous_file_untouched(shared_data, tmp_path, monkeypatch):
    image, labels = load(shared_data, "lps-dicom")
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"previous result")

    def fail_half_way(img, name, *args):
        with open(name, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs.sitk, "WriteImage", fail_half_way)
    with pytest.raises(OFLSAM2Error, match="disk full"):
        write_label_volume(labels, image, target)
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]


def test_an_interrupted_write_cleans_up_and_passes_the_interrupt_on(shared_data, tmp_path, monkeypatch):
    image, labels = load(shared_data, "lps-dicom")

    def interrupted(img, name, *args):
        open(name, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_label_volume(labels, image, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --- Slicer segmentation files -----------------------------------------------------------------

CHAOS_SEGMENTS = [
    (1, "liver", (0.9, 0.5, 0.4)),
    (2, "right kidney", (0.7, 0.4, 0.3)),
    (3, "left kidney", (0.0, 0.0, 1.0)),
    (4, "spleen", (0.6, 0.4, 0.6)),
]


def geometry_matrix(field: str) -> tuple[np.ndarray, list[int]]:
    """Parse Slicer's ``Reference image geometry`` conversion parameter."""
    name, value, _ = field.rstrip("&").split("|")
    assert name == "Reference image geometry"
    numbers = value.rstrip(";").split(";")
    return np.array(numbers[:16], dtype=float).reshape(4, 4), [int(v) for v in numbers[16:]]


def test_seg_nrrd_carries_slicer_segment_metadata(shared_data, tmp_path):
    image, labels = load(shared_data, "oblique-chaos2")
    path = write_seg_nrrd(labels, image, tmp_path / "result.seg.nrrd", CHAOS_SEGMENTS)
    written = sitk.ReadImage(str(path))
    assert_same_geometry(written, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    meta = {key: written.GetMetaData(key) for key in written.GetMetaDataKeys()}
    assert meta["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert meta["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert meta["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    for index, (value, name, color) in enumerate(CHAOS_SEGMENTS):
        field = {key[len(f"Segment{index}_") :]: v for key, v in meta.items() if key.startswith(f"Segment{index}_")}.get
        assert field("ID") == f"Segment_{value}" and field("Name") == name
        assert field("LabelValue") == str(value) and field("Layer") == "0"
        assert field("NameAutoGenerated") == "0" and field("ColorAutoGenerated") == "0"
        np.testing.assert_allclose([float(c) for c in field("Color").split()], color)
        assert "Segmentation.Status:" in field("Tags")
        z, y, x = np.nonzero(labels == value)
        assert [int(v) for v in field("Extent").split()] == [x.min(), x.max(), y.min(), y.max(), z.min(), z.max()]
    # the reference geometry is the image's IJK-to-RAS matrix: LPS -> RAS flips x and y
    matrix, extent = geometry_matrix(meta["Segmentation_ConversionParameters"])
    lps = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    np.testing.assert_allclose(matrix[:3, :3], np.diag([-1, -1, 1]) @ lps, atol=1e-12)
    np.testing.assert_allclose(matrix[:3, 3], np.array(image.GetOrigin()) * [-1, -1, 1], atol=1e-9)
    assert extent == [0, 255, 0, 255, 0, 30]


def test_seg_nrrd_empty_segment_gets_an_empty_extent(shared_data, tmp_path):
    image, labels = load(shared_data, "lps-dicom")
    path = write_seg_nrrd(
        labels,
        image,
        tmp_path / "s.seg.nrrd",
        [
            (1, "liver", segment_color("liver", 1)),
            (2, "spine", segment_color("spine", 2)),
            (3, "heart", segment_color("heart", 3)),
        ],
    )
    assert sitk.ReadImage(str(path)).GetMetaData("Segment2_Extent") == "0 -1 0 -1 0 -1"


@pytest.mark.parametrize(
    "segments, message",
    [
        ([(1, "liver", (1, 0, 0))], r"Labels \[2\] .* no segment"),
        ([(1, "liver", (1, 0, 0)), (2, "spine\nx", (0, 1, 0))], "one line"),
        ([(1, "liver", (255, 0, 0)), (2, "spine", (0, 1, 0))], "0..1"),
        ([(1, "liver", (1, 0, 0)), (1, "again", (0, 1, 0)), (2, "spine", (0, 1, 0))], "distinct"),
        ([], "at least one segment"),
    ],
)
def test_seg_nrrd_refuses_bad_segment_lists(shared_data, tmp_path, segments, message):
    image, labels = load(shared_data, "lps-dicom")
    with pytest.raises(InputError, match=message):
        write_seg_nrrd(labels, image, tmp_path / "s.seg.nrrd", segments)
    assert list(tmp_path.iterdir()) == []


def test_seg_nrrd_needs_its_suffix(shared_data, tmp_path):
    image, labels = load(shared_data, "lps-dicom")
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        write_seg_nrrd(labels, image, tmp_path / "s.nrrd", [(1, "liver", (1, 0, 0)), (2, "spine", (0, 1, 0))])


def test_default_colours():
    assert segment_color("liver", 7) == outputs.DEFAULT_COLORS["liver"]
    assert segment_color("Kidney_Left", 3) == outputs.DEFAULT_COLORS["kidney"]
    assert segment_color("label_1", 1) != segment_color("label_2", 2)
    assert all(0 <= c <= 1 for c in segment_color("whatever", 99))


@pytest.mark.slicer
def test_slicer_reads_the_segmentation_file(shared_data, tmp_path):
    slicer = pytest.importorskip("slicer")
    image, labels = load(shared_data, "oblique-chaos2")
    path = write_seg_nrrd(labels, image, tmp_path / "result.seg.nrrd", CHAOS_SEGMENTS)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    for value, name, color in CHAOS_SEGMENTS:
        segment = segmentation.GetSegment(f"Segment_{value}")
        assert segment.GetName() == name and segment.GetLabelValue() == value
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)
        labelmap = segment.GetRepresentation("Binary labelmap")
        extent = labelmap.GetExtent()
        from vtk.util.numpy_support import vtk_to_numpy

        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(shape)
        inside = labels[extent[4] : extent[5] + 1, extent[2] : extent[3] + 1, extent[0] : extent[1] + 1]
        np.testing.assert_array_equal(voxels == value, inside == value)
        assert np.count_nonzero(voxels == value) == np.count_nonzero(labels == value)
