"""Reading volumes and label maps, intensity presets, and slice-axis choice.

SimpleITK only (no torch): the CLI, the Slicer worker and the tests use this module to turn
files into numpy ``(z, y, x)`` arrays on one grid. Geometry stays in the ``sitk.Image``
(origin, spacing, direction in ITK's LPS convention) so outputs can be written on the same grid.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

log = logging.getLogger(__name__)

MIN_PLANE_SIDE = 8  # smallest in-plane side (voxels) that still makes a usable slice
MAX_LABEL = 65535  # outputs are written as uint16 label maps
# More distinct values than this and a "label map" is an intensity image given by mistake
# (the MR volumes in the test data hold 700-1000 distinct integers, CT thousands).
MAX_DISTINCT_LABELS = 500

# Fixed intensity presets offered by the CLI and GUI. Two custom forms are also accepted:
# ``window:LO,HI`` (a window in the image's units) and ``percentile:A,B`` (volume percentiles).
PRESETS = ("auto", "ct-abdomen", "ct-soft", "ct-lung", "ct-bone", "mr", "minmax")
CUSTOM_PRESETS = ("window:LO,HI", "percentile:A,B")
CT_WINDOWS = {
    "ct-abdomen": (-125.0, 275.0),
    "ct-soft": (-160.0, 240.0),
    "ct-lung": (-1000.0, 200.0),
    "ct-bone": (-450.0, 1050.0),
}
MR_PERCENTILES = (0.5, 99.5)
# ``auto``: a volume whose minimum is below this is taken for CT in Hounsfield units (air is
# about -1000 HU and scanners pad with -1024 or -3024); MR intensities are never that negative.
CT_AUTO_MINIMUM = -500.0

AXIS_NAMES = ("axial", "coronal", "sagittal")
AXIS_CHOICES = (*AXIS_NAMES, "auto")

# DICOM modalities that are not images (a DICOM folder often holds a SEG or RTSTRUCT beside
# the CT/MR series; GDCM would happily list them as series of their own).
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
_SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

_SUPPORTED_FILES = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM file or a DICOM series folder"
)


# ---------------------------------------------------------------------------------------------
# Reading


def read_image(path) -> sitk.Image:
    """Read a 3-D scalar volume: NIfTI, NRRD, MetaImage, one DICOM file or a DICOM series folder.

    A 2-D+t sequence must be stored as a 3-D stack (frames along z) and is then handled like a
    volume. Raises :class:`InputError` for anything that cannot be segmented as it is.
    """
    image = _read_any(Path(path), "image")
    image = _as_3d_scalar(image, Path(path), "image")
    _check_finite(image, Path(path))
    sides = sorted(image.GetSize())
    if sides[1] < MIN_PLANE_SIDE:
        raise InputError(
            f"The image {path} is {'x'.join(map(str, image.GetSize()))} voxels: too small for a slice "
            f"(every slice needs at least {MIN_PLANE_SIDE}x{MIN_PLANE_SIDE} voxels)."
        )
    return image


def read_labels(path, reference: sitk.Image) -> np.ndarray:
    """Read a label map and bring it onto ``reference``'s grid; returns int ``(z, y, x)``.

    Float label maps (CHAOS stores labels as float64) are rounded; values that are not whole
    numbers, negative values and NaN are refused. A label map on a different grid that lies
    inside the image with the same axes (a crop, or another spacing) is resampled with nearest
    neighbour; anything else is refused with the geometry of both.
    """
    path = Path(path)
    labels = read_label_image(path, "label map")
    if not _same_grid(labels, reference):
        _check_aligned(labels, reference, path)
        _check_not_between_planes(labels, reference, path)
        labels = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return sitk.GetArrayFromImage(labels).astype(np.int32, copy=False)


def read_label_image(path, role: str) -> sitk.Image:
    """Read a 3-D label map as it is stored (no resampling); ``role`` names it in messages.
    Raises :class:`InputError` for what cannot be read or is not whole non-negative labels."""
    path = Path(path)
    return _integer_labels(_as_3d_scalar(_read_any(path, role), path, role), path)


def to_array(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as float32 ``(z, y, x)``."""
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)


def check_plane_size(shape, axis: int) -> None:
    """Refuse an axis whose slices are smaller than ``MIN_PLANE_SIDE`` on a side."""
    plane = [n for a, n in enumerate(shape) if a != axis]
    if min(plane) < MIN_PLANE_SIDE:
        raise InputError(
            f"Slices along array axis {axis} would be {plane[0]}x{plane[1]} voxels; at least "
            f"{MIN_PLANE_SIDE}x{MIN_PLANE_SIDE} are needed. Choose another slice axis."
        )


def _read_any(path: Path, role: str) -> sitk.Image:
    if not path.exists():
        raise InputError(f"The {role} {path} does not exist.")
    _check_readable(path, role)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(
            f"The {role} {path} is an empty file (0 bytes): it was not saved or copied completely. Save or copy it again."
        )
    if path.is_dir():
        return _read_dicom_folder(path, role)
    check_nifti_file(path, role)
    modality = _dicom_modality(path)
    if modality in _NON_IMAGE_MODALITIES:
        raise InputError(
            f"{path} is a DICOM {modality} object, not an image. Give the image series "
            "(its folder or one of its files); convert a DICOM SEG to NRRD or NIfTI first "
            "(for example with Slicer or dcmqi's segimage2itkimage)."
        )
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        if "No such file or directory" in str(error):  # MetaImage's words for voxel data that end early
            raise InputError(
                f"Cannot read the {role} {path}: its voxel data are incomplete (the file is truncated, or its "
                "separate data file is missing or truncated). Copy or export it again."
            ) from None
        raise InputError(
            f"Cannot read the {role} {path}: {_first_line(error)}. Supported: {_SUPPORTED_FILES}."
        ) from None


def _check_readable(path: Path, role: str) -> None:
    """Say "permission denied" for what exists but cannot be opened (readers say "does not exist")."""
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise InputError(
            f"The {role} {path} cannot be read: permission denied. Change its permissions or copy it somewhere readable."
        ) from None
    except OSError as error:
        raise InputError(f"The {role} {path} cannot be read: {error.strerror or error}.") from None


# NIfTI datatype codes of floating-point voxels, and their numpy types.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK_BYTES = 1 << 24


def check_nifti_file(path, role: str = "file") -> None:
    """Refuse a NIfTI or Analyze file (``.nii``, ``.nii.gz``, a ``.hdr``/``.img`` pair) that is
    truncated, corrupt, or holds NaN/Inf voxels.

    ITK's NIfTI reader fills missing voxel data with zeros and turns NaN into 0 without a word,
    so the raw data are checked: read through gzip when the file starts with gzip's magic (a
    ``.nii.gz`` may be stored uncompressed, a ``.nii`` compressed; gzip's CRC catches
    corruption), their length compared with what the header promises, and floating-point voxels
    tested as stored. A pair's voxels are in the ``.img`` (or ``.img.gz``) beside its ``.hdr``.
    Other formats are left to their readers, which report truncation themselves (NRRD and
    MetaImage raise; ``Testing/test_volume.py`` checks it).
    """
    header_path, data_path = _nifti_files(Path(path))
    if header_path is None:
        return
    try:
        header = _head(header_path, 544)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        return  # the reader names the problem better
    layout = _nifti_layout(header, pair=data_path != header_path)
    if layout is None:
        return  # not a NIfTI header we know: let ITK judge (and complain)
    offset, size, dtype = layout
    opener = gzip.open if _starts_with(data_path, b"\x1f\x8b") else open
    position, carry, bad = 0, b"", 0
    try:
        with opener(data_path, "rb") as stream:
            for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
                start, end = max(offset - position, 0), min(offset + size - position, len(chunk))
                if dtype is not None and end > start:
                    data = carry + chunk[start:end]
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:usable], dtype)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    carry = data[usable:]
                position += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InputError(
            f"The {role} {path} is truncated or corrupt ({error}); it cannot be read completely. "
            "Copy or export it again."
        ) from None
    except OSError as error:
        raise InputError(f"The {role} {path} cannot be read: {error.strerror or error}.") from None
    if position < offset + size:
        where = f" ({data_path.name})" if data_path != Path(path) else ""
        raise InputError(
            f"The {role} {path}{where} is truncated: it holds {max(position - offset, 0)} of the {size} bytes of "
            "voxel data its header announces. Copy or export it again."
        )
    if bad:
        raise InputError(
            f"The {role} {path} has {bad} NaN or infinite voxels. Replace them (for example with the "
            "background value) before segmenting."
        )


def _nifti_files(path: Path) -> tuple[Path | None, Path | None]:
    """(header file, voxel data file) of a NIfTI file or Analyze pair, by name (as ITK picks
    its NIfTI reader); ``(None, None)`` for other formats or a pair missing a file."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return path, path
    suffix = next((s for s in (".hdr", ".img.gz", ".img") if name.endswith(s)), None)
    if suffix is None:
        return None, None
    stem = path.name[: -len(suffix)]

    def sibling(*suffixes):
        return next((c for c in (path.with_name(stem + s) for s in suffixes) if c.is_file()), None)

    header = path if suffix == ".hdr" else sibling(".hdr", ".HDR")
    data = sibling(".img", ".IMG", ".img.gz", ".IMG.GZ") if suffix == ".hdr" else path
    return (header, data) if header is not None and data is not None else (None, None)


def _head(path: Path, count: int) -> bytes:
    """The first ``count`` bytes of ``path``, decompressed when it is gzip data."""
    opener = gzip.open if _starts_with(path, b"\x1f\x8b") else open
    with opener(path, "rb") as stream:
        return stream.read(count)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(len(magic)) == magic
    except OSError:
        return False


def _nifti_layout(header: bytes, pair: bool = False) -> tuple[int, int, np.dtype | None] | None:
    """(voxel data offset, voxel data bytes, float dtype or None) from a NIfTI-1/2 (or Analyze
    7.5) header; ``pair``: the voxels are in a file of their own (offset from its start)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            stored = struct.unpack(order + "f", header[108:112])[0]
            stored = int(stored) if np.isfinite(stored) else 0
            offset = max(stored, 0) if pair else max(stored, 352)
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            stored = struct.unpack(order + "q", header[168:176])[0]
            offset = max(stored, 0) if pair else max(stored, 544)
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : rank + 1]):
        return None
    size = int(np.prod([int(d) for d in dims[1 : rank + 1]], dtype=object)) * bitpix // 8
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return offset, size, dtype


def _read_dicom_folder(folder: Path, role: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        if files and _dicom_modality(Path(files[0])) not in _NON_IMAGE_MODALITIES:
            series.append((len(files), uid, files))
    if not series:
        raise InputError(
            f"The folder {folder} holds no DICOM image series. Give a folder with the {role}'s DICOM "
            f"files, or a file: {_SUPPORTED_FILES}."
        )
    series.sort(key=lambda s: -s[0])
    count, uid, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"{u} ({n} files)" for n, u, _ in series[1:])
        log.warning("%s holds %d image series; using %s (%d files), not %s.", folder, len(series), uid, count, others)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"Cannot read the DICOM series {uid} in {folder}: {_first_line(error)}.") from None


def _dicom_modality(path: Path) -> str | None:
    """Modality of a DICOM file ("SEG" for a DICOM-SEG), or None if it is not DICOM."""
    if path.suffix.lower() not in ("", ".dcm", ".ima", ".dicom"):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.HasMetaDataKey("0008|0016") and reader.GetMetaData("0008|0016").strip("\0 ") == _SEGMENTATION_SOP_CLASS:
        return "SEG"
    return reader.GetMetaData("0008|0060").strip("\0 ").upper() if reader.HasMetaDataKey("0008|0060") else ""


def _as_3d_scalar(image: sitk.Image, path: Path, role: str) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1 or "complex" in image.GetPixelIDTypeAsString():
        raise InputError(
            f"The {role} {path} has {image.GetNumberOfComponentsPerPixel()} values per voxel "
            f"({image.GetPixelIDTypeAsString()}); a single grey value per voxel is needed. "
            "Convert colour or vector images to one scalar channel first."
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:  # a 3-D volume stored with a unit time axis
        image = sitk.Extract(image, (*size[:3], 0), (0, 0, 0, 0))
    if image.GetDimension() == 2:
        raise InputError(
            f"The {role} {path} is a 2-D image ({size[0]}x{size[1]}). Give a 3-D volume; a 2-D+t "
            "sequence must be stacked into a 3-D image with the frames along z."
        )
    if image.GetDimension() != 3:
        raise InputError(
            f"The {role} {path} is {image.GetDimension()}-D ({'x'.join(map(str, size))}). Give one "
            "3-D volume: extract the time point or channel to segment first."
        )
    return image


def _check_finite(image: sitk.Image, path: Path) -> None:
    if "float" not in image.GetPixelIDTypeAsString():
        return
    voxels = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(voxels).all():
        bad = int(np.size(voxels) - np.count_nonzero(np.isfinite(voxels)))
        raise InputError(
            f"The image {path} has {bad} NaN or infinite voxels. Replace them (for example with the "
            "background value) before segmenting."
        )


def _integer_labels(labels: sitk.Image, path: Path) -> sitk.Image:
    """Labels as an integer image (float labels rounded), refusing what is not a label map."""
    values = sitk.GetArrayViewFromImage(labels)
    if "float" in labels.GetPixelIDTypeAsString():
        if not np.isfinite(values).all():
            raise InputError(f"The label map {path} contains NaN or infinite values.")
        rounded = np.rint(values)
        worst = float(np.abs(values - rounded).max(initial=0.0))
        if worst > 1e-3:
            raise InputError(
                f"The label map {path} has non-integer values (off by up to {worst:.3g}); it looks like "
                "an intensity image. Give a label map with whole-number labels (0 = background)."
            )
        as_int = sitk.GetImageFromArray(rounded.astype(np.int32))
        as_int.CopyInformation(labels)
        labels, values = as_int, sitk.GetArrayViewFromImage(as_int)
    if values.size and values.min() < 0:
        raise InputError(f"The label map {path} has negative values ({values.min()}); labels must be 0 or positive.")
    if values.size and values.max() > MAX_LABEL:
        raise InputError(f"The label map {path} has label {values.max()}; labels above {MAX_LABEL} are not supported.")
    distinct = len(np.unique(values[::2, ::2, ::2]))  # a subsample: enough to tell, and fast
    if distinct > MAX_DISTINCT_LABELS:
        raise InputError(
            f"The file {path} has more than {distinct} distinct values: it looks like an intensity image, "
            f"not a label map (at most {MAX_DISTINCT_LABELS} labels are supported)."
        )
    return labels


# Geometry tolerances: spacing relative, origin in voxels, direction cosines absolute.
_SPACING_TOL = 1e-4
_ORIGIN_TOL_VOXELS = 1e-2
_DIRECTION_TOL = 1e-3


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    spacing_a, spacing_b = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(spacing_a - spacing_b) > _SPACING_TOL * spacing_b):
        return False
    if np.any(np.abs(np.subtract(a.GetDirection(), b.GetDirection())) > _DIRECTION_TOL):
        return False
    return bool(np.all(np.abs(np.subtract(a.GetOrigin(), b.GetOrigin())) <= _ORIGIN_TOL_VOXELS * spacing_b.min()))


def _direction(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)


def _check_aligned(labels: sitk.Image, image: sitk.Image, path: Path) -> None:
    """Accept a label grid whose axes are parallel to the image's and whose box lies inside it."""
    relative = np.abs(_direction(image).T @ _direction(labels))  # a permutation matrix when parallel
    parallel = np.all(np.abs(relative - np.rint(relative)) < _DIRECTION_TOL) and np.allclose(
        relative.sum(0), 1, atol=1e-2
    )
    outside_mm = 0.0
    if parallel:
        # Corners of the label voxel box (voxel edges, not centres), in the image's index space.
        size = np.array(labels.GetSize())
        corners = [np.where(c, size - 0.5, -0.5) for c in itertools.product((0, 1), repeat=3)]
        index = np.array(
            [
                image.TransformPhysicalPointToContinuousIndex(
                    labels.TransformContinuousIndexToPhysicalPoint(c.tolist())
                )
                for c in corners
            ]
        )
        spacing = np.array(image.GetSpacing())
        beyond_mm = np.maximum(-0.5 - index, index - (np.array(image.GetSize()) - 0.5)) * spacing
        # Grids that cover the same extent still differ by up to half a voxel of the coarser one
        # (voxel centres aligned rather than edges).
        allowed_mm = 0.5 * np.maximum(max(labels.GetSpacing()), spacing) + _ORIGIN_TOL_VOXELS * spacing
        outside_mm = float(np.maximum(beyond_mm - allowed_mm, 0.0).max())
        if outside_mm == 0.0:
            return
    reason = (
        f"its box reaches {outside_mm:.1f} mm outside the image"
        if parallel
        else "its axes are rotated against the image's"
    )
    raise InputError(
        f"The label map {path} is not on this image's grid and {reason}.\n"
        f"  image:     {grid_text(image)}\n"
        f"  label map: {grid_text(labels)}\n"
        "The support must be drawn on this image (or saved on its grid, e.g. exported from Slicer "
        "with this volume as the reference geometry)."
    )


_TIE_TOL_VOXELS = 0.05  # a label grid this close to half a voxel off: nearest neighbour is a coin toss


def _check_not_between_planes(labels: sitk.Image, image: sitk.Image, path: Path) -> None:
    """Refuse a label grid with the image's spacing along an axis but shifted by half a voxel
    there: each label plane falls exactly between two image planes, and nearest-neighbour
    resampling would move every annotated slice by one, silently."""
    centre = np.array(labels.TransformPhysicalPointToContinuousIndex(image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0))))
    for axis in range(3):  # image index axis i, j, k
        step = np.zeros(3)
        step[axis] = 1.0
        moved = np.array(labels.TransformPhysicalPointToContinuousIndex(image.TransformContinuousIndexToPhysicalPoint(step.tolist())))
        label_axis = int(np.argmax(np.abs(moved - centre)))  # parallel axes (checked before)
        if abs(abs(moved[label_axis] - centre[label_axis]) - 1.0) > 1e-3:
            continue  # another spacing along this axis: no plane-for-plane correspondence to keep
        offset = centre[label_axis] % 1.0
        if abs(offset - 0.5) < _TIE_TOL_VOXELS:
            spacing = image.GetSpacing()[axis]
            raise InputError(
                f"The label map {path} lies half a voxel ({0.5 * spacing:.3g} mm) off the image's grid along "
                f"{'xyz'[axis]} (array axis {2 - axis}): each of its planes falls between two of the image's, so its "
                "annotated slices cannot be placed (they would move by one slice). Save the label map on the "
                "image's grid, e.g. export it from Slicer with this volume as the reference geometry.\n"
                f"  image:     {grid_text(image)}\n  label map: {grid_text(labels)}"
            )


def grid_text(image: sitk.Image) -> str:
    """The grid of ``image`` (size, origin, spacing, direction) for a message."""
    def numbers(values, digits):
        return "(" + ", ".join(f"{v:.{digits}f}" for v in values) + ")"

    return (
        f"size {image.GetSize()}, origin {numbers(image.GetOrigin(), 2)} mm, spacing "
        f"{numbers(image.GetSpacing(), 4)} mm, direction {numbers(image.GetDirection(), 3)}"
    )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with file/line noise; the last line carries the description.
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Intensity presets


def resolve_preset(volume: np.ndarray, preset: str) -> str:
    """The concrete preset ``preset`` stands for on ``volume`` (``auto`` -> ``ct-abdomen`` or ``mr``).

    ``auto`` rule: CT in Hounsfield units when the volume's minimum is below -500 (air and
    scanner padding), otherwise MR-like (percentile window).
    """
    _parse_preset(preset)
    if preset != "auto":
        return preset
    return "ct-abdomen" if float(np.min(volume)) < CT_AUTO_MINIMUM else "mr"


def intensity_summary(volume: np.ndarray) -> dict:
    """What kind of intensities ``volume`` holds: ``modality`` (``ct`` by the ``auto`` preset's
    rule, else ``mr``) and its 1st/99th percentiles ``low``/``high`` (on a subsample: fast)."""
    sample = np.asarray(volume, dtype=np.float32)[::2, ::2, ::2]
    low, high = np.percentile(sample, (1.0, 99.0)) if sample.size else (0.0, 0.0)
    modality = "ct" if float(np.min(volume)) < CT_AUTO_MINIMUM else "mr"
    return {"modality": modality, "low": float(low), "high": float(high)}


def check_preset(preset: str) -> None:
    """Raise :class:`InputError` if ``preset`` is not a known or well-formed custom preset."""
    _parse_preset(preset)


def apply_preset(volume: np.ndarray, preset: str) -> np.ndarray:
    """Map raw intensities to float32 ``[0, 1]`` with one window for the whole volume.

    ``volume`` is ``(z, y, x)`` of any shape; the window is computed once per volume (never per
    slice) so that slices stay comparable. A constant volume maps to zeros.
    """
    volume = np.asarray(volume, dtype=np.float32)
    kind, values = _parse_preset(resolve_preset(volume, preset))
    if kind == "window":
        low, high = values
    elif kind == "percentile":
        low, high = (float(v) for v in np.percentile(volume, values))
    else:  # minmax
        low, high = float(volume.min()), float(volume.max())
    if high <= low:
        return np.zeros_like(volume)
    out = volume - np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def _parse_preset(preset: str) -> tuple[str, tuple[float, float]]:
    """``(kind, (a, b))`` with kind ``window``, ``percentile`` or ``minmax``."""
    if preset in CT_WINDOWS:
        return "window", CT_WINDOWS[preset]
    if preset in ("mr", "auto"):
        return "percentile", MR_PERCENTILES
    if preset == "minmax":
        return "minmax", (0.0, 0.0)
    match = re.fullmatch(r"\s*(window|percentile)\s*:\s*([^,]+),([^,]+)", str(preset))
    if match:
        kind = match.group(1)
        try:
            a, b = float(match.group(2)), float(match.group(3))
        except ValueError:
            a = b = float("nan")
        if not (np.isfinite(a) and np.isfinite(b) and a < b):
            example = "window:-100,300" if kind == "window" else "percentile:0.5,99.5"
            raise InputError(f"Preset {preset!r}: give two numbers, the lower first, e.g. {example}.")
        if kind == "percentile" and not (0.0 <= a and b <= 100.0):
            raise InputError(f"Preset {preset!r}: percentiles must lie between 0 and 100.")
        return kind, (a, b)
    raise InputError(f"Unknown intensity preset {preset!r}. Choose one of: {', '.join(PRESETS + CUSTOM_PRESETS)}.")


# ---------------------------------------------------------------------------------------------
# Slice axis


def anatomical_axes(direction) -> dict[str, int]:
    """Numpy array axis (0 = k/z, 1 = j/y, 2 = i/x) of each anatomical slice orientation.

    ``direction`` is 3x3 with the index axes i, j, k as columns, in LPS or RAS (signs do not
    matter). The axial slice normal is the index axis closest to S/I, coronal to A/P, sagittal
    to L/R; oblique matrices get the assignment that fits best overall.
    """
    cosines = np.abs(_direction_matrix(direction))
    # rows: L/R, A/P, S/I. Pick the one-to-one assignment of rows to index axes with most weight.
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cosines[row, p[row]] for row in range(3)))
    index_axis = {"sagittal": best[0], "coronal": best[1], "axial": best[2]}
    return {name: 2 - i for name, i in index_axis.items()}


def axis_name(axis: int, direction) -> str:
    """Anatomical name (``axial``, ``coronal``, ``sagittal``) of numpy array axis ``axis``."""
    return {a: name for name, a in anatomical_axes(direction).items()}[axis]


def resolve_axis(name: str, direction, spacing_xyz, support: np.ndarray | None = None) -> int:
    """Numpy array axis (0 = k/z, 1 = j/y, 2 = i/x) to slice along for ``axial|coronal|sagittal|auto``.

    ``auto`` with a ``support`` ((z, y, x) label map or mask, nonzero = annotated): the axis along
    which the annotation lies in a few separate planes. For each axis and each label, the
    fraction of planes inside the label's range that contain it is measured (gaps between
    annotated slices make it small; a label within one plane counts as 0, since gaps in its
    drawing must not make another axis look sparser); the axis with the lowest sum wins, then
    the one with fewest annotated planes (a single annotated slice). Without support (or an empty one): the axis with
    the largest spacing, ties -> axial, then coronal.
    """
    if name not in AXIS_CHOICES:
        raise InputError(f"Unknown slice axis {name!r}; choose one of: {', '.join(AXIS_CHOICES)}.")
    axes = anatomical_axes(direction)
    if name != "auto":
        return axes[name]
    preference = [axes[n] for n in AXIS_NAMES]  # axial first, for ties
    if support is not None and np.any(support):
        return _axis_from_support(np.asarray(support), preference)
    spacing = np.asarray(spacing_xyz, dtype=float)[::-1]  # per numpy axis (z, y, x)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise InputError(f"Spacing must be three positive numbers (x, y, z); got {tuple(spacing_xyz)}.")
    largest = spacing.max()
    return next(a for a in preference if spacing[a] >= largest * (1 - 1e-3))


def _axis_from_support(support: np.ndarray, preference: list[int]) -> int:
    if support.ndim != 3:
        raise InputError(f"The support must be a 3-D (z, y, x) array; got shape {support.shape}.")
    values = [v for v in np.unique(support) if v != 0]
    scores = {a: [0.0, 0] for a in range(3)}
    for value in values:
        mask = support == value
        for axis in range(3):
            planes = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            scores[axis][0] += 0.0 if len(planes) == 1 else len(planes) / (planes[-1] - planes[0] + 1)
            scores[axis][1] += len(planes)
    return min(preference, key=lambda a: (round(scores[a][0], 6), scores[a][1], preference.index(a)))


def _direction_matrix(direction) -> np.ndarray:
    matrix = np.asarray(direction, dtype=float)
    if matrix.size != 9 or not np.all(np.isfinite(matrix)):
        raise InputError(f"The direction must be a 3x3 matrix; got {np.shape(direction)}.")
    return matrix.reshape(3, 3)


# ---------------------------------------------------------------------------------------------
# Slices


def annotated_slices(labels: np.ndarray, label: int, axis: int) -> list[int]:
    """Indices of the planes along ``axis`` of ``labels`` ((z, y, x) ints) that contain ``label``."""
    planes = np.moveaxis(np.asarray(labels) == label, axis, 0)
    return [int(i) for i in np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1))]


class SliceRanges(tuple):
    """Parsed slice list such as ``"12,20,30-33"``: sorted ``(first, last)`` pairs, never expanded
    until clipped to a volume (``0-999999999999`` costs nothing)."""

    def within(self, count: int) -> list[int]:
        """The listed indices that exist in a volume of ``count`` slices, sorted."""
        chosen: set[int] = set()
        for first, last in self:
            chosen.update(range(min(first, count), min(last, count - 1) + 1))
        return sorted(chosen)

    def outside(self, count: int) -> list[tuple[int, int]]:
        """The listed ranges (or their parts) at or beyond ``count``."""
        return [(max(first, count), last) for first, last in self if last >= count]

    @classmethod
    def of(cls, indices) -> "SliceRanges":
        """From whole numbers (an API caller's list); anything else is refused."""
        if isinstance(indices, SliceRanges):
            return indices
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise InputError(f"Give the slices as a list of whole numbers; got {indices!r}.")
        values = list(indices)
        for value in values:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"Slice indices must be whole numbers from 0; got {value!r}.")
        return cls(sorted((int(v), int(v)) for v in set(values)))


def format_indices(indices, limit: int = 10) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``; ``(first, last)`` pairs are accepted too; at most
    ``limit`` parts are shown, so a message stays one short line."""
    pairs = []
    for item in sorted(indices):
        first, last = item if isinstance(item, tuple) else (item, item)
        if pairs and first <= pairs[-1][1] + 1:
            pairs[-1][1] = max(pairs[-1][1], last)
        else:
            pairs.append([first, last])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in pairs]
    shown = ", ".join(parts[:limit])
    return shown + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def parse_slices(text: str) -> SliceRanges:
    """``"12,20,30-33"`` -> ranges ((12, 12), (20, 20), (30, 33)); see :class:`SliceRanges`."""
    example = "e.g. 12,20,30-33"
    if not str(text).strip():
        raise InputError(f"The slice list is empty; give slice indices ({example}).")
    ranges: set[tuple[int, int]] = set()
    for item in str(text).split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d{1,18})(?:\s*-\s*(\d{1,18}))?", item)
        if not match:
            shown = item if len(item) <= 40 else item[:40] + "..."
            raise InputError(f"Cannot read {shown!r} in the slice list: use indices from 0 and ranges ({example}).")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InputError(f"The range {item!r} in the slice list runs backwards; write it as {last}-{first}.")
        ranges.add((first, last))
    return SliceRanges(sorted(ranges))
