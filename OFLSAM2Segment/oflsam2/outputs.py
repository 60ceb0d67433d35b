"""Writing label volumes and Slicer segmentation files on the grid of the segmented image.

Every write is atomic: the file is written under a temporary name in the destination folder,
checked complete (a full disk can leave a truncated file that the writer reports as written),
and moved into place with ``os.replace``, so a failed or interrupted write never leaves a
partial file nor damages an existing one. :class:`StagedOutputs` does this for several files
at once: none replaces anything until all are written and checked. A replaced file keeps its
permissions; a new one gets the umask's.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OFLSAM2Error
from .volume import check_nifti_file

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_NRRD_SUFFIX = ".seg.nrrd"

# Colours (RGB 0..1) for common structures, close to Slicer's anatomy colours; matched by the
# first key contained in a lower-cased segment name.
DEFAULT_COLORS = {
    "liver": (0.867, 0.510, 0.396),
    "spleen": (0.616, 0.424, 0.635),
    "kidney": (0.725, 0.400, 0.325),
    "pancreas": (0.976, 0.706, 0.435),
    "gallbladder": (0.545, 0.588, 0.384),
    "stomach": (0.847, 0.518, 0.412),
    "aorta": (0.878, 0.380, 0.298),
    "heart": (0.808, 0.431, 0.329),
    "lung": (0.773, 0.647, 0.569),
    "bladder": (0.871, 0.604, 0.518),
    "prostate": (0.902, 0.620, 0.455),
    "spine": (0.945, 0.839, 0.569),
    "vertebra": (0.945, 0.839, 0.569),
    "bone": (0.945, 0.839, 0.569),
    "lesion": (0.565, 0.933, 0.565),
    "tumor": (0.565, 0.933, 0.565),
}
# Fallback colours by label value for names not in the table.
_PALETTE = (
    (0.502, 0.682, 0.502),
    (0.945, 0.839, 0.569),
    (0.694, 0.478, 0.396),
    (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310),
    (0.867, 0.510, 0.396),
    (0.565, 0.933, 0.565),
    (0.753, 0.408, 0.345),
)


def segment_color(name: str, label: int) -> tuple[float, float, float]:
    """A display colour (RGB 0..1) for a segment: from its name when known, else by label."""
    lowered = name.lower()
    for key, color in DEFAULT_COLORS.items():
        if key in lowered:
            return color
    return _PALETTE[(label - 1) % len(_PALETTE)]


def same_file(a, b) -> bool:
    """True when ``a`` and ``b`` name one file: the same path once symbolic links and ``..`` are
    resolved, or two hard links to it (so a link cannot make an output replace an input)."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_writable(path, suffixes: Sequence[str] = LABEL_SUFFIXES) -> Path:
    """Make sure ``path`` can be written before any computation; returns it as a ``Path``.

    Checks the file type (by suffix), that the folder exists and accepts a new file (by creating
    and removing a temporary one), and that ``path`` is not a folder.
    """
    path = Path(path)
    name = path.name.lower()
    if not any(name.endswith(s) for s in suffixes):
        raise InputError(f"Cannot write {path}: the output must end with one of {', '.join(suffixes)}.")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"Cannot write {path}: {folder} is a file, not a folder.")
    if not folder.is_dir():
        raise InputError(f"Cannot write {path}: the folder {folder} does not exist. Create it first.")
    if path.is_dir():
        raise InputError(f"Cannot write {path}: it is a folder; give a file name.")
    try:
        os.stat(path)
    except FileNotFoundError:  # a new file, or a link to one not made yet: it is replaced by the new file
        pass
    except OSError as error:  # a loop of symbolic links, a link through a file
        raise InputError(f"Cannot write {path}: {error.strerror}. Give another name, or remove the link.") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise InputError(f"Cannot write {path}: the folder {folder} is not writable ({error.strerror}).") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"Cannot write {path}: the existing file is read-only.")
    return path


class StagedOutputs:
    """Files written under temporary names and moved into place together.

    ``with StagedOutputs() as staged:`` then ``write_label_volume(..., staged=staged)`` for each
    file: leaving the block normally moves every file into place; an exception (or an
    interrupt) removes the temporary files and leaves every existing file as it was.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (temporary, destination), moved in this order
        self._folders: list[Path] = []  # created for staged files: removed again (if empty) on discard

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    @contextmanager
    def path(self, path: Path):
        """Yield a temporary name beside ``path``; once the block has written it, check it."""
        suffix = next((s for s in (SEG_NRRD_SUFFIX, *LABEL_SUFFIXES) if path.name.lower().endswith(s)), path.suffix)
        try:
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".part{suffix}")
        except OSError as error:
            raise OFLSAM2Error(f"Could not write {path}: {error.strerror or error}.") from None
        os.close(handle)
        self._staged.append((Path(temporary), path))
        try:
            yield Path(temporary)
            _check_complete(Path(temporary), path)
        except (RuntimeError, OSError) as error:
            raise OFLSAM2Error(f"Could not write {path}: {str(error).strip().splitlines()[-1]}") from error

    def adopt(self, temporary: Path, destination: Path) -> None:
        """Move ``temporary`` (a complete file, written in ``destination``'s folder) into place on
        commit; remove it on discard."""
        self._staged.append((Path(temporary), Path(destination)))

    def text(self, path: Path, text: str) -> None:
        """Stage a text file (UTF-8) for ``path``."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        self.adopt(Path(temporary), path)
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())

    def remove_if_empty(self, folder: Path) -> None:
        """``folder`` is about to be created for staged files: remove it again if they are discarded."""
        self._folders.append(Path(folder))

    def commit(self) -> None:
        try:
            for temporary, destination in self._staged:
                apply_destination_mode(temporary, destination)
            for temporary, destination in self._staged:
                os.replace(temporary, destination)
        except OSError as error:
            self.discard()
            raise OFLSAM2Error(f"Could not move the outputs into place: {error}") from error
        self._staged, self._folders = [], []

    def discard(self) -> None:
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        for folder in reversed(self._folders):
            try:
                folder.rmdir()
            except OSError:  # not empty (other files), or never created
                pass
        self._staged, self._folders = [], []


def apply_destination_mode(temporary, destination) -> None:
    """Give ``temporary`` the permissions ``destination`` has, or the umask's for a new file
    (``mkstemp`` creates files readable by their owner only)."""
    try:
        mode = os.stat(destination).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(temporary, mode)


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:  # Linux: read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_complete(temporary: Path, destination: Path) -> None:
    """Refuse a written file that is not whole (a full disk truncates NIfTI files silently)."""
    with open(temporary, "rb+") as stream:
        os.fsync(stream.fileno())
    try:
        check_nifti_file(temporary, "written file")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(temporary))
        reader.ReadImageInformation()
    except (InputError, RuntimeError) as error:
        raise OFLSAM2Error(
            f"Could not write {destination}: the written file is incomplete (is the disk full?). "
            f"Nothing was replaced. ({str(error).strip().splitlines()[-1]})"
        ) from None


def write_label_volume(labels: np.ndarray, reference: sitk.Image, path, staged: StagedOutputs | None = None) -> Path:
    """Write a ``(z, y, x)`` label map with ``reference``'s origin, spacing and direction.

    ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``; stored as uint8 when labels fit, else uint16.
    With ``staged`` the file is moved into place when that :class:`StagedOutputs` commits.
    """
    path = check_writable(path)
    image, _ = _label_image(labels, reference)
    with _staging(staged) as outputs, outputs.path(path) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return path


def write_seg_nrrd(
    labels: np.ndarray,
    reference: sitk.Image,
    path,
    segments: Sequence[tuple[int, str, Sequence[float]]],
    staged: StagedOutputs | None = None,
) -> Path:
    """Write a Slicer segmentation file (``.seg.nrrd``) holding ``labels`` on ``reference``'s grid.

    ``segments`` lists ``(label_value, name, (r, g, b) in 0..1)``; every nonzero value in
    ``labels`` must have one. All segments share one labelmap layer (a voxel has one label), the
    layout Slicer writes for non-overlapping segments. Each gets the ``Segment{i}_*`` fields
    (ID, Name, NameAutoGenerated, Color, ColorAutoGenerated, LabelValue, Layer, Extent, Tags)
    and the file the ``Segmentation_*`` fields Slicer's segmentation reader expects.
    """
    path = check_writable(path, (SEG_NRRD_SUFFIX,))
    image, array = _label_image(labels, reference)
    _check_segments(array, segments)
    for key, value in _segmentation_fields(reference).items():
        image.SetMetaData(key, value)
    for index, (value, name, color) in enumerate(segments):
        for key, text in _segment_fields(array, int(value), name, color).items():
            image.SetMetaData(f"Segment{index}_{key}", text)
    with _staging(staged) as outputs, outputs.path(path) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return path


def _label_image(labels: np.ndarray, reference: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """The labels as an image on ``reference``'s grid, and the uint8/uint16 array it was made from."""
    labels = np.asarray(labels)
    expected = tuple(reversed(reference.GetSize()))
    if labels.shape != expected:
        raise InputError(f"The label array has shape {labels.shape}; the image grid is {expected} (z, y, x).")
    if labels.dtype.kind not in "uib":
        raise InputError(f"Labels must be integers; got {labels.dtype}.")
    high = int(labels.max(initial=0))
    if (labels.size and int(labels.min()) < 0) or high > 65535:
        raise InputError("Labels must lie in 0..65535 to be written.")
    array = labels.astype(np.uint8 if high <= 255 else np.uint16, copy=False)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image, array


@contextmanager
def _staging(staged: StagedOutputs | None):
    """``staged`` itself, or a one-file :class:`StagedOutputs` committed at the end of the block."""
    if staged is not None:
        yield staged
        return
    with StagedOutputs() as own:
        yield own


def _check_segments(array: np.ndarray, segments) -> None:
    values = [int(v) for v, _, _ in segments]
    if not segments:
        raise InputError("A segmentation file needs at least one segment.")
    if len(set(values)) != len(values) or min(values) < 1:
        raise InputError(f"Segment label values must be distinct and positive; got {values}.")
    missing = sorted(set(int(v) for v in np.unique(array)) - {0} - set(values))
    if missing:
        raise InputError(f"Labels {missing} are in the label map but have no segment name.")
    for value, name, color in segments:
        if not str(name).strip() or any(c in str(name) for c in "\r\n"):
            raise InputError(f"Segment {value}: the name must be one line of text; got {name!r}.")
        if len(color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in color):
            raise InputError(f"Segment {name!r}: the colour must be three numbers in 0..1; got {color!r}.")


def _segmentation_fields(reference: sitk.Image) -> dict[str, str]:
    return {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{_reference_geometry(reference)}|"
            "Geometry (IJK to RAS matrix and extent) of the image the segmentation was made on&"
        ),
    }


def _segment_fields(array: np.ndarray, value: int, name: str, color) -> dict[str, str]:
    return {
        "ID": f"Segment_{value}",
        "Name": str(name).strip(),
        "NameAutoGenerated": "0",
        "Color": " ".join(f"{float(c):.6g}" for c in color),
        "ColorAutoGenerated": "0",
        "LabelValue": str(value),
        "Layer": "0",
        "Extent": _extent(array == value),
        # Slicer's segment status: "inprogress" marks an automatic result awaiting review.
        "Tags": "Segmentation.Status:inprogress|",
    }


def _extent(mask: np.ndarray) -> str:
    """Voxel bounding box ``i0 i1 j0 j1 k0 k1`` of ``mask`` ((z, y, x)); ``0 -1 0 -1 0 -1`` if empty."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):  # i (x), j (y), k (z)
        planes = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds += [int(planes[0]), int(planes[-1])]
    return " ".join(map(str, bounds))


def _reference_geometry(reference: sitk.Image) -> str:
    """Slicer's serialised image geometry: IJK-to-RAS matrix (row by row) then the extent, ';'-separated."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ direction @ np.diag(reference.GetSpacing())
    matrix[:3, 3] = lps_to_ras @ np.array(reference.GetOrigin())
    size = reference.GetSize()
    extent = [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    return "".join(f"{v:.17g};" for v in matrix.ravel()) + "".join(f"{v};" for v in extent)
