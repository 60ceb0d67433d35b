"""The file-level job: input checks before any compute, label/slice choice, composition, outputs.

The engine is replaced by a small recorder (no SAM2 here); everything else is real: files from
the shared data folder, SimpleITK reading and writing.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2.api import MethodOptions, ModelSettings, SegmentResult
from oflsam2.errors import Cancelled, InputError
from oflsam2.events import Events
from oflsam2.pipeline import segment_files

SETTINGS = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu")


class RecordingEngine:
    """Stands in for :class:`oflsam2.api.Engine`: records the call, returns chosen masks."""

    def __init__(self, masks=None, error: Exception | None = None):
        self.masks = masks  # callable(image, supports, axis) -> {label: mask}; default: empty masks
        self.error = error
        self.calls = []

    def segment(self, image, supports, *, method, axis, preset, options, references, events):
        self.calls.append(
            dict(
                image=image,
                supports=supports,
                method=method,
                axis=axis,
                preset=preset,
                options=options,
                references=references,
            )
        )
        if self.error is not None:
            raise self.error
        masks = (
            self.masks(image, supports, axis)
            if self.masks
            else {s.label: np.zeros(image.shape, bool) for s in supports}
        )
        return SegmentResult(masks, axis, method, {"engine": "recording"})


@pytest.fixture(scope="module")
def chaos(shared_data):
    folder = shared_data / "chaos_t2_fewshot"
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_2.nii.gz")))).astype(np.uint8)
    return folder / "image_2.nii.gz", labels, sitk.ReadImage(str(folder / "label_2.nii.gz"))


ANNOTATED = (8, 14, 20)


@pytest.fixture
def sparse_support(chaos, tmp_path):
    """CHAOS case 2 labels kept on three axial slices only, as a user would annotate them."""
    _, labels, reference = chaos
    support = np.zeros_like(labels)
    for z in ANNOTATED:
        support[z] = labels[z]
    image = sitk.GetImageFromArray(support)
    image.CopyInformation(reference)
    path = tmp_path / "support.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, support


def run(image, support, out, **kwargs):
    kwargs.setdefault("engine", RecordingEngine())
    return segment_files(image, support, out, settings=SETTINGS, **kwargs)


def test_segments_every_label_of_the_support_and_writes_on_the_image_grid(chaos, sparse_support, tmp_path):
    image_path, _, reference = chaos
    support_path, support = sparse_support
    engine = RecordingEngine()
    summary = run(
        image_path, support_path, tmp_path / "out.nrrd", engine=engine, seg_nrrd_path=tmp_path / "out.seg.nrrd"
    )
    call = engine.calls[0]
    assert call["image"].shape == (31, 256, 256) and call["axis"] == 0 and call["preset"] == "auto"
    assert [s.label for s in call["supports"]] == [1, 2, 3, 4]
    assert summary["labels"] == [1, 2, 3, 4] and summary["axis"] == 0 and summary["axis_name"] == "axial"
    assert summary["preset"] == "mr"
    # a slice annotated for any label is annotated for all (absent labels: "object absent")
    assert summary["slices"] == {v: list(ANNOTATED) for v in (1, 2, 3, 4)}
    for support_of_label in call["supports"]:
        np.testing.assert_array_equal(support_of_label.mask, support == support_of_label.label)
    written = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    for read_back, expected in [
        (written.GetOrigin(), reference.GetOrigin()),
        (written.GetSpacing(), reference.GetSpacing()),
        (written.GetDirection(), reference.GetDirection()),
    ]:
        np.testing.assert_allclose(read_back, expected, rtol=0, atol=1e-9)
    # the engine predicted nothing, so the output is exactly the annotated slices
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), support)
    seg = sitk.ReadImage(str(tmp_path / "out.seg.nrrd"))
    assert seg.GetMetaData("Segment3_LabelValue") == "4" and seg.GetMetaData("Segment0_Name") == "label_1"
    assert summary["outputs"] == [str(tmp_path / "out.nrrd"), str(tmp_path / "out.seg.nrrd")]
    assert set(summary["timings"]) == {"read", "segment", "write", "total"}


def test_later_label_wins_overlaps_but_annotated_slices_stay_as_drawn(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, support = sparse_support
    everywhere = RecordingEngine(lambda image, supports, axis: {s.label: np.ones(image.shape, bool) for s in supports})
    summary = run(
        image_path,
        support_path,
        tmp_path / "out.nii.gz",
        labels=[4, 2],
        engine=everywhere,
        label_names={2: "right kidney"},
    )
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    free = [z for z in range(31) if z not in ANNOTATED]
    assert (out[free] == 2).all()  # label 2 is listed last
    for z in ANNOTATED:
        for value in (2, 4):
            if z in summary["slices"][value]:
                np.testing.assert_array_equal(out[z] == value, support[z] == value)
    assert summary["label_names"] == {4: "label_4", 2: "right kidney"}


def test_requested_slices_restrict_the_support(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    engine = RecordingEngine()
    summary = run(image_path, support_path, tmp_path / "out.nii.gz", labels=[1], support_slices=[20, 8], engine=engine)
    assert summary["slices"] == {1: [8, 20]} and engine.calls[0]["supports"][0].slices == [8, 20]


def test_explicit_axis_and_method_reach_the_engine(chaos, tmp_path):
    image_path, labels, reference = chaos
    rows = np.flatnonzero((labels == 1).any(axis=(0, 2)))
    drawn = sorted(int(y) for y in rows[[len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4]])
    coronal = np.zeros_like(labels)  # the liver annotated on three coronal planes
    coronal[:, drawn] = labels[:, drawn]
    support = sitk.GetImageFromArray(coronal)
    support.CopyInformation(reference)
    support_path = tmp_path / "coronal_support.nii.gz"
    sitk.WriteImage(support, str(support_path))
    engine = RecordingEngine()
    options = MethodOptions(top_k=2)
    summary = run(
        image_path,
        support_path,
        tmp_path / "out.nii.gz",
        labels=[1],
        axis="coronal",
        method="revsam2",
        preset="window:0,600",
        options=options,
        engine=engine,
    )
    call = engine.calls[0]
    assert (
        call["axis"] == 1
        and call["method"] == "revsam2"
        and call["preset"] == "window:0,600"
        and call["options"] is options
    )
    assert summary["axis_name"] == "coronal" and summary["slices"][1] == drawn


def test_dicom_series_with_nrrd_support(shared_data, tmp_path):
    folder = shared_data / "dcmqi_ct3slice"
    liver = RecordingEngine(lambda image, supports, axis: {s.label: s.mask for s in supports})
    summary = run(folder, folder / "liver_spine_seg.nrrd", tmp_path / "out.nrrd", engine=liver)
    assert summary["labels"] == [1, 2] and summary["axis"] == 0 and summary["preset"] == "ct-abdomen"
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nrrd")))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "liver_spine_seg.nrrd")))
    np.testing.assert_array_equal(out, expected)


def test_references_are_reoriented_to_the_target_axes(shared_data, tmp_path):
    """A RAS reference for a P-L-I target: its slices must be taken along the same anatomy."""
    lesion = shared_data / "deeplesion_medsam2" / "000015_01_01_103-115.nii.gz"
    support = np.zeros((13, 512, 512), np.uint8)
    support[6] = np.load(shared_data / "deeplesion_medsam2" / "CT_Lesion_000015_01_01_103-115.npz")["gts"][6]
    image = sitk.GetImageFromArray(support)
    image.CopyInformation(sitk.ReadImage(str(lesion)))
    sitk.WriteImage(image, str(tmp_path / "lesion_support.nrrd"))
    ct_folder = shared_data / "totalsegmentator_ct_mr"
    engine = RecordingEngine()
    run(
        lesion,
        tmp_path / "lesion_support.nrrd",
        tmp_path / "out.nrrd",
        engine=engine,
        references=[(str(ct_folder / "example_ct.nii.gz"), str(ct_folder / "example_seg_fast_force_split.nii.gz"))],
    )
    reference = engine.calls[0]["references"][0]
    ct_labels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(ct_folder / "example_seg_fast_force_split.nii.gz"))
    )  # (S, A, R) axes
    assert reference.image.shape == reference.labels.shape == (112, 122, 101)  # (I, L, P) like the target
    # target index axes run P, L, I: numpy (z, y, x) = (I, L, P); the reference is flipped and transposed to match
    np.testing.assert_array_equal(reference.labels, ct_labels[::-1, ::-1, ::-1].transpose(0, 2, 1))
    assert reference.name == "example_ct.nii.gz"


# --- bad input: refused with advice, engine never called, nothing written ----------------------


def assert_refused(match, image, support, out, tmp_path, **kwargs):
    engine = kwargs.pop("engine", RecordingEngine())
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=match):
        run(image, support, out, engine=engine, **kwargs)
    assert engine.calls == []
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no output, no temporary, inputs untouched


def test_output_folder_is_checked_before_anything_is_read(tmp_path):
    assert_refused(
        "folder .* does not exist",
        tmp_path / "no-such-image.nii.gz",
        tmp_path / "no-such-support.nii.gz",
        tmp_path / "missing" / "out.nii.gz",
        tmp_path,
    )
    assert_refused("must end with", tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", tmp_path / "out.png", tmp_path)


def test_output_may_not_overwrite_an_input(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    assert_refused("is one of the inputs", image_path, support_path, support_path, tmp_path)


def test_requested_label_absent_from_the_support(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    assert_refused(
        r"Label\(s\) \[7\] do not occur .* holds labels \[1, 2, 3, 4\]",
        image_path,
        support_path,
        tmp_path / "out.nii.gz",
        tmp_path,
        labels=[1, 7],
    )


def test_label_without_slice_among_the_requested_ones(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    # label 4 (spleen) is annotated on slices 14 and 20 only
    assert_refused(
        "Label 4 has no annotated slice among the requested",
        image_path,
        support_path,
        tmp_path / "out.nii.gz",
        tmp_path,
        labels=[1, 4],
        support_slices=[8],
    )


@pytest.mark.parametrize(
    "slices, match", [([8, 40], r"outside the volume: .* 0\.\.30"), ([8, 9], r"\(s\) 9 hold no annotation")]
)
def test_bad_requested_slices(chaos, sparse_support, tmp_path, slices, match):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    assert_refused(match, image_path, support_path, tmp_path / "out.nii.gz", tmp_path, support_slices=slices)


def test_empty_support(chaos, tmp_path):
    image_path, labels, reference = chaos
    empty = sitk.GetImageFromArray(np.zeros_like(labels))
    empty.CopyInformation(reference)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    assert_refused("no labelled voxel", image_path, tmp_path / "empty.nii.gz", tmp_path / "out.nii.gz", tmp_path)


def test_support_of_another_image(shared_data, chaos, tmp_path):
    image_path, _, _ = chaos
    other = shared_data / "chaos_t2_fewshot" / "label_1.nii.gz"
    assert_refused(
        "not on this image's grid(.|\n)*drawn on this image", image_path, other, tmp_path / "out.nii.gz", tmp_path
    )


def test_unusable_image(chaos, sparse_support, tmp_path):
    _, labels, reference = chaos
    volume = np.ones(labels.shape, np.float32)
    volume[3, 3, 3] = np.nan
    image = sitk.GetImageFromArray(volume)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "nan.nrrd"))
    support_path, _ = sparse_support
    assert_refused("NaN", tmp_path / "nan.nrrd", support_path, tmp_path / "out.nii.gz", tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="magic"), "Unknown method"),
        (dict(axis="transverse"), "Unknown slice axis"),
        (dict(preset="bright"), "Unknown intensity preset"),
        (dict(labels=[0]), "integers from 1 to 65535"),
        (dict(labels=[1], label_names={1: "liver\nspleen"}), "one line"),
    ],
)
def test_bad_options(chaos, sparse_support, tmp_path, kwargs, match):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    assert_refused(match, image_path, support_path, tmp_path / "out.nii.gz", tmp_path, **kwargs)


def adapter_metadata(folder, label, **fields):
    """The JSON record of a trained adapter (what the pipeline checks before loading the model)."""
    import json

    from oflsam2.ofl.adapter import KIND

    folder.mkdir(exist_ok=True)
    record = {"kind": KIND, "label": label, "label_name": f"label_{label}", "model": "sam2.1-tiny",
              "image_size": 1024, "axis": 0, "preset": "mr", **fields}
    (folder / f"label_{label}.json").write_text(json.dumps(record))
    return folder


def test_no_support_needs_an_adapter_or_references(chaos, tmp_path):
    image_path, _, _ = chaos
    out = tmp_path / "out.nii.gz"
    assert_refused("support label map .*--reference .* or a trained adapter", image_path, None, out, tmp_path)
    adapter = adapter_metadata(tmp_path / "adapter", 1)
    assert_refused(
        "cannot use one", image_path, None, out, tmp_path,
        options=MethodOptions(adapter=str(adapter)), labels=[1], method="sam2",
    )
    assert_refused(
        "does not exist", image_path, None, out, tmp_path,
        options=MethodOptions(adapter=str(tmp_path / "nope")), labels=[1],
    )


def test_adapter_without_support_runs_with_empty_supports(chaos, tmp_path):
    image_path, _, _ = chaos
    adapter = adapter_metadata(tmp_path / "adapter", 1)
    adapter_metadata(adapter, 4)
    engine = RecordingEngine(lambda image, supports, axis: {s.label: np.ones(image.shape, bool) for s in supports})
    summary = run(
        image_path,
        None,
        tmp_path / "out.nii.gz",
        options=MethodOptions(adapter=str(adapter)),
        engine=engine,
    )
    supports = engine.calls[0]["supports"]
    assert [s.label for s in supports] == [1, 4]  # every label the adapter holds
    assert [s.slices for s in supports] == [[], []] and not any(s.mask.any() for s in supports)
    assert summary["axis"] == 0 and summary["slices"] == {1: [], 4: []}
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))) == 4).all()


def test_cancelled_run_writes_nothing_and_keeps_the_old_output(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"earlier result")
    with pytest.raises(Cancelled):
        run(
            image_path,
            support_path,
            out,
            engine=RecordingEngine(error=Cancelled()),
            seg_nrrd_path=tmp_path / "out.seg.nrrd",
        )
    assert out.read_bytes() == b"earlier result" and not (tmp_path / "out.seg.nrrd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "support.nii.gz"]


def test_progress_reports_the_writing_stage(chaos, sparse_support, tmp_path):
    image_path, _, _ = chaos
    support_path, _ = sparse_support
    stages = []
    run(
        image_path,
        support_path,
        tmp_path / "out.mha",
        events=Events(on_progress=lambda stage, done, total, msg: stages.append((stage, done, total))),
    )
    assert stages == [("writing", 0, 1), ("writing", 1, 1)]
