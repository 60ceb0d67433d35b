"""``oflsam2 demo``: a real sample that works offline once installed.

nilearn ships the MNI152 T1 template and its white-matter probability map inside its wheel
(no download). The demo resamples both to 2 mm, takes a slab of 24 axial slices around the
level with the most white matter (keeping a CPU run to minutes), annotates 3 of its slices
with the white matter (probability > 0.5), segments the rest through
:func:`oflsam2.pipeline.segment_files`, and scores the result against the same map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OFLSAM2Error

SLAB_SLICES = 24
SUPPORT_SLICES = (4, 12, 19)  # annotated axial slices, as indices within the slab
WM_THRESHOLD = 0.5
RESOLUTION_MM = 2
WM_LABEL = 1
OVERLAY_SLICES = 4
OVERLAY_ZOOM = 3
PREDICTION_RGB = (255, 40, 40)
REFERENCE_RGB = (40, 220, 40)


def run(out_dir: Path, method: str, settings, options, events=None) -> dict:
    """Write the sample, segment it and score it.

    Returns ``files`` (paths written), ``dice`` over the slab, ``dice_unannotated`` over the
    slices that were not annotated, ``unannotated_slices`` (their count) and the pipeline's
    ``summary``.
    """
    import SimpleITK as sitk

    from . import pipeline

    image, reference = load_sample()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OFLSAM2Error(f"Cannot create the demo folder {out_dir} ({exc.strerror}); choose another with --out.") from exc
    paths = {
        "image": out_dir / "mni152_t1_slab.nii.gz",
        "reference": out_dir / "white_matter_reference.nii.gz",
        "support": out_dir / "support_3_slices.nii.gz",
        "result": out_dir / "segmentation.nii.gz",
        "seg_nrrd": out_dir / "segmentation.seg.nrrd",
        "overlay": out_dir / "overlay.png",
    }
    _save_nifti(image, paths["image"])
    _save_nifti(reference, paths["reference"])
    _save_nifti(support_from(reference), paths["support"])

    summary = pipeline.segment_files(
        paths["image"], paths["support"], paths["result"],
        labels=[WM_LABEL], method=method, axis="axial", preset="mr", settings=settings, options=options,
        seg_nrrd_path=paths["seg_nrrd"], events=events, label_names={WM_LABEL: "white matter"},
    )
    # Read everything back through SimpleITK so the arrays share the (z, y, x) order the engine used.
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["image"])))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["reference"]))) == WM_LABEL
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["result"]))) == WM_LABEL
    unannotated = [z for z in range(truth.shape[0]) if z not in SUPPORT_SLICES]
    write_overlay(grey, predicted, truth, _spread(unannotated, OVERLAY_SLICES), paths["overlay"])
    return {
        "files": [paths[key] for key in ("image", "reference", "support", "result", "seg_nrrd", "overlay")],
        "dice": dice(predicted, truth),
        "dice_unannotated": dice(predicted[unannotated], truth[unannotated]),
        "unannotated_slices": len(unannotated),
        "summary": summary,
    }


def load_sample():
    """(T1 slab, white-matter label slab) as nibabel images on the same 2 mm grid; the slab
    holds :data:`SLAB_SLICES` axial slices centred on the level with the most white matter."""
    try:
        import nibabel as nib
        from nilearn import datasets
    except ImportError as exc:
        raise OFLSAM2Error(
            f"The demo needs nilearn ({exc}); install it with: pip install 'oflsam2[demo]' (or pip install nilearn)."
        ) from exc
    template = datasets.load_mni152_template(resolution=RESOLUTION_MM)
    wm_probability = datasets.load_mni152_wm_template(resolution=RESOLUTION_MM)
    white_matter = (np.asarray(wm_probability.get_fdata()) > WM_THRESHOLD).astype(np.uint8)
    per_level = white_matter.sum(axis=(0, 1))  # nibabel arrays are (x, y, z): z is axial in MNI space
    first = int(np.clip(per_level.argmax() - SLAB_SLICES // 2, 0, white_matter.shape[2] - SLAB_SLICES))
    labels = nib.Nifti1Image(white_matter * WM_LABEL, wm_probability.affine)
    window = (slice(None), slice(None), slice(first, first + SLAB_SLICES))
    return template.slicer[window], labels.slicer[window]


def support_from(reference):
    """The reference kept on :data:`SUPPORT_SLICES` only: what a user would have annotated."""
    import nibabel as nib

    labels = np.asarray(reference.dataobj)
    support = np.zeros_like(labels)
    support[:, :, list(SUPPORT_SLICES)] = labels[:, :, list(SUPPORT_SLICES)]
    return nib.Nifti1Image(support, reference.affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool arrays; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def write_overlay(grey: np.ndarray, predicted: np.ndarray, truth: np.ndarray, slices, path: Path) -> None:
    """PNG of ``slices`` (axial planes of ``(z, y, x)`` arrays) side by side: the grey image with
    the prediction outlined in red and the reference in green, anterior up."""
    from PIL import Image, ImageDraw

    low, high = np.percentile(grey, (0.5, 99.5))
    tiles = []
    for z in slices:
        plane = np.clip((grey[z] - low) / max(high - low, 1e-6), 0, 1)
        rgb = np.repeat((plane * 255).astype(np.uint8)[..., None], 3, axis=2)
        rgb = _zoom(np.flipud(rgb))
        for mask, colour in ((truth[z], REFERENCE_RGB), (predicted[z], PREDICTION_RGB)):
            rgb[_outline(_zoom(np.flipud(mask)))] = colour
        tile = Image.fromarray(rgb)
        ImageDraw.Draw(tile).text((4, 4), f"slice {z}", fill=(255, 255, 0))
        tiles.append(tile)
    canvas = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height + 16))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * tile.width, 0))
    ImageDraw.Draw(canvas).text((4, tiles[0].height + 2), "red: prediction   green: reference (WM > 0.5)", fill=(255, 255, 255))
    canvas.save(path)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _zoom(array: np.ndarray) -> np.ndarray:
    return array.repeat(OVERLAY_ZOOM, axis=0).repeat(OVERLAY_ZOOM, axis=1)


def _spread(items, count):
    """``count`` items spread evenly over ``items``."""
    picks = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[i] for i in picks]


def _save_nifti(image, path: Path) -> None:
    import nibabel as nib

    nib.save(image, str(path))
