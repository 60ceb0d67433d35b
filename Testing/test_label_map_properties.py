"""Property-based test of the label-map pipeline (``segment_files``) with hypothesis.

Random label maps, label values (past 255, so outputs switch to uint16), annotated slice sets
and slicing axes go through the real reading, composition and writing with a stand-in engine
whose masks are deterministic noise. Whatever it predicts, the promise holds: a slice annotated
for any label of the run comes out exactly as drawn (labels absent there stay absent), the
output lies on the image's grid and holds only the run's labels, and off the annotated slices
the later label wins where predictions overlap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oflsam2.api import ModelSettings, SegmentResult
from oflsam2.pipeline import segment_files

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}  # numpy axis of each name for an identity direction
SETTINGS = ModelSettings(random_weights=True, device="cpu", image_size=256)


class NoiseEngine:
    """``Engine.segment``'s signature; each label's mask is fixed noise seeded by its value."""

    def __init__(self):
        self.supports = None

    def segment(self, image, supports, *, method, axis, preset, options, references, events):
        self.supports = supports
        masks = {s.label: np.random.default_rng(s.label).random(image.shape) < 0.4 for s in supports}
        return SegmentResult(masks, axis, method, {})


@st.composite
def label_maps(draw):
    """(support (z, y, x), axis name, requested slices or None, labels or None)."""
    axis_name = draw(st.sampled_from(sorted(AXES)))
    axis = AXES[axis_name]
    shape = [draw(st.integers(8, 11)) for _ in range(3)]
    shape[axis] = draw(st.integers(3, 9))
    values = draw(st.lists(st.integers(1, 700), min_size=1, max_size=4, unique=True))
    planes = draw(st.lists(st.integers(0, shape[axis] - 1), min_size=1, max_size=shape[axis], unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    support = np.zeros(shape, np.uint16)
    view = np.moveaxis(support, axis, 0)
    for plane in planes:
        present = [v for v in values if rng.random() < 0.7] or values[:1]  # some labels absent here
        view[plane] = rng.choice([0, *present], size=view.shape[1:])
        view[plane][0, 0] = present[0]  # every annotated plane holds something
    present = sorted({int(v) for v in np.unique(support)} - {0})
    labels = draw(st.none() | st.lists(st.sampled_from(present), min_size=1, unique=True))
    chosen = labels or present
    requested = None
    if draw(st.booleans()):  # one plane per chosen label at least, then any that holds a chosen label
        holding = {v: [p for p in planes if (view[p] == v).any()] for v in chosen}
        eligible = sorted({p for v in chosen for p in holding[v]})
        requested = {draw(st.sampled_from(holding[v])) for v in chosen}
        requested = sorted(requested | set(draw(st.lists(st.sampled_from(eligible), unique=True))))
    return support, axis_name, requested, labels


def write(array: np.ndarray, path: Path) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(image, str(path))
    return image


def _one_noisy_plane() -> tuple:
    """One axial plane of 3, label 2 scattered with an empty row: before, the gap in the rows
    made 'auto' take the annotation as drawn on coronal slices and the axial run was refused."""
    support = np.zeros((3, 8, 8), np.uint16)
    support[0] = np.random.default_rng(7).choice([0, 1, 2], size=(8, 8))
    support[0, 6][support[0, 6] == 2] = 1
    support[0, 0, 0] = 2
    return support, "axial", None, [2]


# derandomize: the same examples on every run, so that CI cannot fail by a new draw
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@example(_one_noisy_plane())
@given(label_maps())
def test_annotated_slices_come_out_exactly_as_drawn(case):
    support, axis_name, requested, labels = case
    axis = AXES[axis_name]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image = write(np.random.default_rng(0).normal(100, 20, support.shape).astype(np.float32), folder / "image.nii.gz")
        write(support, folder / "support.nii.gz")
        engine = NoiseEngine()
        summary = segment_files(
            folder / "image.nii.gz", folder / "support.nii.gz", folder / "out.nii.gz", labels=labels,
            support_slices=requested, axis=axis_name, method="ofl", settings=SETTINGS, engine=engine,
        )
        out = sitk.ReadImage(str(folder / "out.nii.gz"))
        result = sitk.GetArrayFromImage(out)

    chosen = summary["labels"]
    annotated = sorted({i for s in engine.supports for i in s.slices})
    expected_planes = requested if requested is not None else [
        i for i in range(support.shape[axis]) if np.isin(np.take(support, i, axis=axis), chosen).any()
    ]
    assert summary["axis"] == axis and annotated == expected_planes
    assert all(s.slices == annotated for s in engine.supports)  # annotated for one label = for every label
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing() + out.GetOrigin(), image.GetSpacing() + image.GetOrigin(), rtol=1e-6)
    assert set(np.unique(result)) <= {0, *chosen}
    drawn = np.where(np.isin(support, chosen), support, 0)
    for plane in annotated:
        np.testing.assert_array_equal(np.take(result, plane, axis=axis), np.take(drawn, plane, axis=axis))
    predicted = np.zeros_like(result)
    for value in chosen:  # later labels win where the predictions overlap
        predicted[np.random.default_rng(value).random(support.shape) < 0.4] = value
    others = [i for i in range(support.shape[axis]) if i not in annotated]
    np.testing.assert_array_equal(np.take(result, others, axis=axis), np.take(predicted, others, axis=axis))
