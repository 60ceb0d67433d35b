"""Reading images and label maps, intensity presets and slice-axis choice, on the real data."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2.errors import InputError
from oflsam2.volume import (
    PRESETS,
    annotated_slices,
    apply_preset,
    axis_name,
    check_plane_size,
    parse_slices,
    read_image,
    read_labels,
    resolve_axis,
    resolve_preset,
    to_array,
)

CT_SERIES_UID = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"


def direction_of(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)


def to_ras(direction: np.ndarray) -> np.ndarray:
    """What the Slicer side hands over: the LPS direction converted to RAS."""
    return np.diag([-1.0, -1.0, 1.0]) @ direction


def write(array: np.ndarray, path, like: sitk.Image | None = None, spacing=None):
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def ct(shared_data):
    return read_image(shared_data / "totalsegmentator_ct_mr" / "example_ct.nii.gz")


@pytest.fixture(scope="module")
def chaos2(shared_data):
    return read_image(shared_data / "chaos_t2_fewshot" / "image_2.nii.gz")


# --- reading images ---------------------------------------------------------------------------


def test_reads_every_dataset_with_its_geometry(shared_data):
    ct = read_image(shared_data / "totalsegmentator_ct_mr" / "example_ct.nii.gz")
    assert ct.GetSize() == (122, 101, 112) and ct.GetSpacing() == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(direction_of(ct), np.diag([-1, -1, 1]))
    chaos = read_image(shared_data / "chaos_t2_fewshot" / "image_2.nii.gz")
    assert chaos.GetSize() == (256, 256, 31)
    assert abs(direction_of(chaos)[0, 2]) > 0.004  # the oblique case keeps its direction
    lesion = read_image(shared_data / "deeplesion_medsam2" / "000015_01_01_103-115.nii.gz")
    assert to_array(lesion).shape == (13, 512, 512) and to_array(lesion).dtype == np.float32


def test_dicom_folder_reads_the_ct_series_not_the_seg(shared_data):
    image = read_image(shared_data / "dcmqi_ct3slice")
    assert image.GetSize() == (512, 512, 3)
    assert image.GetOrigin()[2] == pytest.approx(-128.69, abs=1e-3)  # z index 0 is ct-3slice_03.dcm
    hu = to_array(image)
    assert hu.min() == pytest.approx(-3024) and hu.max() == pytest.approx(1381)


def test_dicom_folder_with_two_image_series_takes_the_larger_and_says_so(shared_data, tmp_path, caplog):
    for source in (shared_data / "dcmqi_ct3slice").glob("*.dcm"):
        shutil.copy(source, tmp_path)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(2):  # a second, smaller MR series in the same folder
        frame = sitk.GetImageFromArray(np.full((16, 16), k, np.int16))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"1.2.3.4.5.6.{k}",
            "0020|000d": "1.2.3.4.5",
            "0020|000e": "1.2.3.4.5.6",
            "0020|0032": f"0\\0\\{2 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k),
        }
        for tag, value in tags.items():
            frame.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"mr{k}.dcm"))
        writer.Execute(frame)
    with caplog.at_level(logging.WARNING, logger="oflsam2.volume"):
        image = read_image(tmp_path)
    assert image.GetSize() == (512, 512, 3)
    assert "2 image series" in caplog.text and CT_SERIES_UID in caplog.text


def test_single_dicom_file_is_a_one_slice_volume(shared_data):
    image = read_image(shared_data / "dcmqi_ct3slice" / "ct-3slice_01.dcm")
    assert image.GetDimension() == 3 and image.GetSize() == (512, 512, 1)


def test_dicom_seg_file_is_refused_with_advice(shared_data):
    with pytest.raises(InputError, match="DICOM SEG.*not an image"):
        read_image(shared_data / "dcmqi_ct3slice" / "liver.dcm")


def test_a_folder_without_dicom_images_is_refused(tmp_path):
    with pytest.raises(InputError, match="no DICOM image series"):
        read_image(tmp_path)


def _junk(path):
    path.write_bytes(b"not an image at all")


def _four_d(path):
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(16, 16, 16, sitk.sitkFloat32)] * 2), str(path))


def _with_nan(path):
    volume = np.ones((16, 16, 16), np.float32)
    volume[3, 4, 5] = np.nan
    write(volume, path)


BAD_IMAGES = {
    "not-an-image": (_junk, "Cannot read the image"),
    "2d": (lambda p: write(np.zeros((32, 32), np.float32), p), "2-D image"),
    "4d": (_four_d, "4-D"),
    "vector": (lambda p: write(np.zeros((4, 16, 16, 3), np.uint8), p), "values per voxel"),
    "nan": (_with_nan, "1 NaN or infinite"),
    "inf": (lambda p: write(np.full((16, 16, 16), np.inf, np.float32), p), "NaN or infinite"),
    "too-small": (lambda p: write(np.zeros((40, 5, 4), np.float32), p), "too small"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_unusable_images_are_refused(tmp_path, case):
    make, message = BAD_IMAGES[case]
    path = tmp_path / "bad.nrrd"
    make(path)
    with pytest.raises(InputError, match=message):
        read_image(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "absent.nii.gz")


def test_volume_with_a_unit_time_axis_is_read_as_3d(tmp_path):
    path = tmp_path / "t1.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(16, 16, 9, sitk.sitkInt16)]), str(path))
    assert read_image(path).GetSize() == (16, 16, 9)


def test_thin_axis_is_refused_only_for_slicing_across_it():
    check_plane_size((3, 512, 512), 0)  # three axial 512x512 slices are fine
    with pytest.raises(InputError, match="3x512"):
        check_plane_size((3, 512, 512), 1)


# --- reading label maps -----------------------------------------------------------------------


def test_float_labels_are_rounded_on_the_same_grid(shared_data, chaos2):
    labels = read_labels(shared_data / "chaos_t2_fewshot" / "label_2.nii.gz", chaos2)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "label_2.nii.gz")))
    assert labels.dtype.kind == "i" and labels.shape == (31, 256, 256)
    np.testing.assert_array_equal(labels, np.rint(raw))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_nrrd_labels_on_the_dicom_series(shared_data):
    ct3 = read_image(shared_data / "dcmqi_ct3slice")
    labels = read_labels(shared_data / "dcmqi_ct3slice" / "liver_spine_seg.nrrd", ct3)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "dcmqi_ct3slice" / "liver_spine_seg.nrrd")))
    np.testing.assert_array_equal(labels, expected)  # float-noise origin difference -> same grid
    assert set(np.unique(labels)) == {0, 1, 2}


def test_cropped_label_map_is_put_back_on_the_image_grid(shared_data, ct, tmp_path):
    full = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    crop = sitk.RegionOfInterest(full, (40, 30, 50), (20, 25, 30))
    sitk.WriteImage(crop, str(tmp_path / "crop.nii.gz"))
    labels = read_labels(tmp_path / "crop.nii.gz", ct)
    expected = np.zeros_like(labels)
    whole = sitk.GetArrayFromImage(full)
    expected[30:80, 25:55, 20:60] = whole[30:80, 25:55, 20:60]
    np.testing.assert_array_equal(labels, expected)


def test_label_map_at_another_spacing_is_resampled(shared_data, ct, tmp_path):
    full = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    fine = sitk.Resample(  # 1.5 mm grid over the same extent, as if drawn on a finer image
        full,
        [2 * n for n in full.GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        [o - 0.75 * d for o, d in zip(full.GetOrigin(), (-1, -1, 1))],
        (1.5, 1.5, 1.5),
        full.GetDirection(),
        0,
    )
    sitk.WriteImage(fine, str(tmp_path / "fine.nrrd"))
    labels = read_labels(tmp_path / "fine.nrrd", ct)
    original = sitk.GetArrayFromImage(full)
    liver, back = original == 5, labels == 5
    dice = 2 * np.count_nonzero(liver & back) / (np.count_nonzero(liver) + np.count_nonzero(back))
    assert labels.shape == original.shape and dice > 0.97


def test_coarser_label_map_with_centred_voxels_is_accepted(shared_data, ct, tmp_path):
    full = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    coarse = sitk.Resample(
        full,
        [n // 3 for n in full.GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        full.GetOrigin(),
        (9.0, 9.0, 9.0),
        full.GetDirection(),
        0,
    )
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    labels = read_labels(tmp_path / "coarse.nrrd", ct)
    assert labels.shape == (112, 101, 122) and np.count_nonzero(labels == 5) > 0.8 * np.count_nonzero(
        sitk.GetArrayFromImage(full) == 5
    )


def test_label_map_with_permuted_axes_lands_on_the_same_voxels(shared_data, ct, tmp_path):
    full = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(full, "PIL"), str(tmp_path / "pil.nrrd"))
    np.testing.assert_array_equal(read_labels(tmp_path / "pil.nrrd", ct), sitk.GetArrayFromImage(full))


def test_misaligned_label_map_is_refused_with_both_geometries(shared_data, chaos2, ct, tmp_path):
    with pytest.raises(InputError) as refused:
        read_labels(shared_data / "chaos_t2_fewshot" / "label_1.nii.gz", chaos2)  # another patient
    text = str(refused.value)
    assert "origin" in text and "spacing" in text and "direction" in text and "drawn on this image" in text
    shifted = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    shifted.SetOrigin([o + 60.0 for o in shifted.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(InputError, match=r"reaches \d+\.\d mm outside"):
        read_labels(tmp_path / "shifted.nii.gz", ct)


def test_non_integer_and_negative_labels_are_refused(ct, tmp_path):
    shape = tuple(reversed(ct.GetSize()))
    write(np.full(shape, 0.4, np.float32), tmp_path / "soft.nii.gz", like=ct)
    with pytest.raises(InputError, match="non-integer"):
        read_labels(tmp_path / "soft.nii.gz", ct)
    write(np.full(shape, -1, np.int16), tmp_path / "negative.nii.gz", like=ct)
    with pytest.raises(InputError, match="negative"):
        read_labels(tmp_path / "negative.nii.gz", ct)


def test_intensity_image_given_as_labels_is_refused(shared_data, chaos2, ct):
    with pytest.raises(InputError, match="looks like an intensity image"):
        read_labels(shared_data / "chaos_t2_fewshot" / "image_2.nii.gz", chaos2)  # whole numbers 0..1000
    with pytest.raises(InputError, match="negative"):
        read_labels(shared_data / "totalsegmentator_ct_mr" / "example_ct.nii.gz", ct)


# --- intensity presets ------------------------------------------------------------------------


def test_ct_windows_map_hounsfield_units_per_volume(ct):
    hu = to_array(ct)
    out = apply_preset(hu, "ct-abdomen")
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, np.clip((hu + 125) / 400, 0, 1), atol=1e-6)
    lung = apply_preset(hu, "ct-lung")
    np.testing.assert_allclose(lung, np.clip((hu + 1000) / 1200, 0, 1), atol=1e-6)
    np.testing.assert_allclose(apply_preset(hu, "window:-100,300"), np.clip((hu + 100) / 400, 0, 1), atol=1e-6)


def test_mr_preset_uses_whole_volume_percentiles(chaos2):
    mr = to_array(chaos2)
    out = apply_preset(mr, "mr")
    low, high = np.percentile(mr, (0.5, 99.5))
    np.testing.assert_allclose(out, np.clip((mr - low) / (high - low), 0, 1), atol=1e-5)
    # one window for the volume: a dim slice stays dim instead of being stretched to [0, 1]
    assert out.max() == 1.0 and out[27].max() < 0.9


def test_auto_preset_tells_ct_from_mr(shared_data, ct, chaos2):
    assert resolve_preset(to_array(ct), "auto") == "ct-abdomen"
    assert resolve_preset(to_array(chaos2), "auto") == "mr"
    lesion = read_image(shared_data / "deeplesion_medsam2" / "000015_01_01_103-115.nii.gz")
    assert resolve_preset(to_array(lesion), "auto") == "ct-abdomen"
    np.testing.assert_array_equal(apply_preset(to_array(ct), "auto"), apply_preset(to_array(ct), "ct-abdomen"))


def test_minmax_percentile_and_constant_volumes():
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    np.testing.assert_allclose(apply_preset(volume, "minmax"), volume / 999, atol=1e-6)
    out = apply_preset(volume, "percentile:10,90")
    assert out[0, 0, 0] == 0 and out[-1, -1, -1] == 1 and 0 < out[5, 0, 0] < 1
    assert not apply_preset(np.full((4, 8, 8), 7.0), "minmax").any()


@pytest.mark.parametrize(
    "preset", ["soft-tissue", "window:300,100", "window:a,b", "percentile:-5,50", "percentile:10,120"]
)
def test_bad_presets_are_refused_with_the_valid_names(preset):
    with pytest.raises(InputError) as refused:
        apply_preset(np.zeros((2, 8, 8), np.float32), preset)
    if preset == "soft-tissue":
        assert all(name in str(refused.value) for name in PRESETS)


# --- slice axis -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative, expected",
    [
        ("totalsegmentator_ct_mr/example_ct.nii.gz", {"axial": 0, "coronal": 1, "sagittal": 2}),
        ("chaos_t2_fewshot/image_2.nii.gz", {"axial": 0, "coronal": 1, "sagittal": 2}),  # LAS, oblique
        ("deeplesion_medsam2/000015_01_01_103-115.nii.gz", {"axial": 0, "coronal": 2, "sagittal": 1}),  # P, L, I
        ("dcmqi_ct3slice", {"axial": 0, "coronal": 1, "sagittal": 2}),  # LPS DICOM
    ],
)
def test_anatomical_axes_on_every_dataset(shared_data, relative, expected):
    image = read_image(shared_data / relative)
    for direction in (direction_of(image), to_ras(direction_of(image))):
        for name, axis in expected.items():
            assert resolve_axis(name, direction, image.GetSpacing()) == axis
            assert axis_name(axis, direction) == name


def test_auto_axis_without_support_takes_the_largest_spacing(ct, chaos2):
    assert resolve_axis("auto", direction_of(chaos2), chaos2.GetSpacing()) == 0  # 7.7 mm slices
    assert resolve_axis("auto", direction_of(ct), ct.GetSpacing()) == 0  # isotropic -> axial
    assert resolve_axis("auto", np.eye(3), (0.8, 4.0, 0.8)) == 1  # thick coronal planes
    assert resolve_axis("auto", np.eye(3), (2.0, 2.0, 1.0)) == 1  # tie between y and x -> coronal


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_auto_axis_follows_sparse_annotations(shared_data, ct, axis):
    labels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_seg_fast_force_split.nii.gz"))
    )
    liver = np.where(labels == 5, 5, 0)
    planes = annotated_slices(liver, 5, axis)
    chosen = planes[len(planes) // 4 :: max(1, len(planes) // 4)][:3]
    support = np.zeros_like(liver)
    for index in chosen:
        np.moveaxis(support, axis, 0)[index] = np.moveaxis(liver, axis, 0)[index]
    assert resolve_axis("auto", direction_of(ct), ct.GetSpacing(), support) == axis
    one = np.zeros_like(liver)
    np.moveaxis(one, axis, 0)[chosen[0]] = np.moveaxis(liver, axis, 0)[chosen[0]]
    assert resolve_axis("auto", direction_of(ct), ct.GetSpacing(), one) == axis


def test_auto_axis_on_dense_labels_is_not_fooled_by_gaps_between_organs(shared_data, chaos2):
    labels = read_labels(shared_data / "chaos_t2_fewshot" / "label_2.nii.gz", chaos2)  # both kidneys
    assert resolve_axis("auto", direction_of(chaos2), chaos2.GetSpacing(), labels) == 0


def test_unknown_axis_name_is_refused():
    with pytest.raises(InputError, match="axial, coronal, sagittal, auto"):
        resolve_axis("transverse", np.eye(3), (1, 1, 1))


# --- slices -----------------------------------------------------------------------------------


def test_annotated_slices_count_matches_the_data_readme(shared_data):
    image = read_image(shared_data / "chaos_t2_fewshot" / "image_1.nii.gz")
    labels = read_labels(shared_data / "chaos_t2_fewshot" / "label_1.nii.gz", image)
    assert [len(annotated_slices(labels, value, 0)) for value in (1, 2, 3, 4)] == [24, 14, 16, 14]
    assert annotated_slices(labels, 9, 0) == []


def test_parse_slices():
    assert parse_slices("12,20,30-33").within(100) == [12, 20, 30, 31, 32, 33]
    assert parse_slices(" 3, 1 ,1, 2 - 2").within(100) == [1, 2, 3]
    huge = parse_slices("5,30-999999999999")  # kept as ranges: nothing is expanded
    assert huge.within(32) == [5, 30, 31] and huge.outside(32) == [(32, 999999999999)]


@pytest.mark.parametrize(
    "text, message", [("", "empty"), ("4,x", "'x'"), ("9-3", "backwards"), ("-2", "'-2'"), ("1,,2", "''")]
)
def test_parse_slices_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_slices(text)
