"""Pictures of results, drawn with Pillow only: per-case slice montages and Dice box plots.

A montage shows evenly spaced planes of a volume with the reference outlined in green and the
prediction in red; support planes get a cyan frame and an "S" tag. The box plot shows the
spread of per-case Dice for each method.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .outputs import apply_destination_mode

REFERENCE_COLOR = (0, 220, 0)
PREDICTION_COLOR = (255, 40, 40)
SUPPORT_COLOR = (0, 200, 255)
BACKGROUND = (0, 0, 0)
GAP = 4  # pixels between tiles and around the montage
HEADER = 34  # pixels above the tiles for the title and the legend
INTENSITY_PERCENTILES = (0.5, 99.5)


# ---------------------------------------------------------------------------------------------
# Montage


def montage_slices(length: int, count: int, *, masks: Sequence[np.ndarray] = (), axis: int = 0, marked: Sequence[int] = ()) -> list[int]:
    """Up to ``count`` planes evenly spaced over those holding an object in any of ``masks``
    (the whole axis when none does), plus every ``marked`` plane; sorted. ``count=0`` shows the
    marked planes only."""
    occupied = np.zeros(length, dtype=bool)
    for mask in masks:
        other = tuple(a for a in range(3) if a != axis)
        occupied |= np.asarray(mask).any(axis=other)
    first, last = (np.flatnonzero(occupied)[[0, -1]] if occupied.any() else (0, length - 1))
    spread = np.linspace(first, last, num=max(0, min(count, last - first + 1)))
    chosen = sorted({int(round(i)) for i in spread} | {int(i) for i in marked if 0 <= i < length})
    if not chosen:
        raise InputError("Nothing to show: ask for at least one plane or mark one.")
    return chosen


def montage_size(num_tiles: int, columns: int = 6, tile_size: int = 192) -> tuple[int, int]:
    """``(width, height)`` in pixels of a montage of ``num_tiles`` tiles."""
    columns = max(1, min(columns, num_tiles))
    rows = math.ceil(num_tiles / columns)
    return columns * tile_size + (columns + 1) * GAP, HEADER + rows * tile_size + (rows + 1) * GAP


def write_case_montage(
    path,
    image: np.ndarray,
    reference: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    *,
    axis: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    direction: Sequence[float] | None = None,
    marked_slices: Sequence[int] | Mapping[int, str] = (),
    num_slices: int = 12,
    columns: int = 6,
    tile_size: int = 192,
    title: str = "",
) -> Path:
    """Write a PNG montage of ``image`` ``(z, y, x)`` planes along ``axis``.

    ``reference`` and ``prediction`` are int label maps (or bool masks) on the image grid; every
    label's border is drawn (green reference, red prediction, red drawn last). ``spacing``
    ``(z, y, x)`` mm keeps the planes' physical aspect. ``direction`` (SimpleITK's 9 numbers;
    identity when None) orients planes the radiological way: patient right on the left,
    anterior / superior up. ``marked_slices`` (support planes) are always shown, framed
    in cyan; a mapping ``{plane: note}`` adds the note to the plane's tag. Returns the written path.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or axis not in (0, 1, 2):
        raise InputError(f"A montage needs a 3-D image and an axis 0..2; got shape {image.shape}, axis {axis!r}.")
    overlays = [(np.asarray(m), c) for m, c in ((reference, REFERENCE_COLOR), (prediction, PREDICTION_COLOR)) if m is not None]
    for mask, _ in overlays:
        if mask.shape != image.shape:
            raise InputError(f"A montage overlay has shape {mask.shape}; the image {image.shape}.")
    slices = montage_slices(image.shape[axis], num_slices, masks=[m for m, _ in overlays], axis=axis, marked=marked_slices)
    low, high = np.percentile(image, INTENSITY_PERCENTILES) if image.size else (0.0, 1.0)
    view = _View(axis, spacing, direction)
    width, height = montage_size(len(slices), columns, tile_size)
    columns = max(1, min(columns, len(slices)))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    marked = dict(marked_slices) if isinstance(marked_slices, Mapping) else dict.fromkeys(marked_slices, "")
    for n, index in enumerate(slices):
        tile = _tile(view.plane(image, index), [(view.plane(m, index), c) for m, c in overlays], (low, high), view.spacing, tile_size)
        left = GAP + (n % columns) * (tile_size + GAP)
        top = HEADER + GAP + (n // columns) * (tile_size + GAP)
        canvas.paste(tile, (left + (tile_size - tile.width) // 2, top + (tile_size - tile.height) // 2))
        tag = f"{index}"
        if index in marked:
            draw.rectangle([left, top, left + tile_size - 1, top + tile_size - 1], outline=SUPPORT_COLOR, width=3)
            tag = f"S {index} {marked[index]}".strip()
        _label(draw, (left + 4, top + 4), tag, font, SUPPORT_COLOR if index in marked else (255, 255, 255))
    legend = [("reference", REFERENCE_COLOR)] * (reference is not None) + [("prediction", PREDICTION_COLOR)] * (prediction is not None)
    _header(draw, title, font, legend + [("support plane", SUPPORT_COLOR)] * bool(marked))
    return _save(canvas, path)


class _View:
    """How planes along ``axis`` are turned for display (from the image direction, LPS).

    A plane's rows and columns are the two other array axes. The one closer to the patient's
    vertical (superior-inferior, else anterior-posterior) becomes the rows; then each is flipped
    so rows run superior -> inferior or anterior -> posterior and columns patient right -> left
    (or anterior -> posterior on sagittal planes): the radiological view.
    """

    # Wanted sign of the physical (LPS) direction along increasing display position: x towards
    # patient left (+), y towards posterior (+), z towards inferior (-).
    _WANTED_SIGN = (1.0, 1.0, -1.0)

    def __init__(self, axis: int, spacing, direction):
        matrix = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        self.axis = axis
        in_plane = [a for a in range(3) if a != axis]
        # Array axis a is ITK index axis 2 - a, whose physical direction is column 2 - a.
        physical = [int(np.argmax(np.abs(matrix[:, 2 - a]))) for a in in_plane]
        self.transpose = physical[0] < physical[1]
        if self.transpose:
            in_plane.reverse()
            physical.reverse()
        self.flips = [np.sign(matrix[k, 2 - a]) != self._WANTED_SIGN[k] for a, k in zip(in_plane, physical)]
        self.spacing = [float(spacing[a]) for a in in_plane]

    def plane(self, volume: np.ndarray, index: int) -> np.ndarray:
        plane = np.take(volume, index, axis=self.axis)
        if self.transpose:
            plane = plane.T
        if self.flips[0]:
            plane = plane[::-1, :]
        if self.flips[1]:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)


def _tile(plane, overlays, window, plane_spacing, tile_size) -> Image.Image:
    """One plane as RGB, scaled to fit ``tile_size`` with its physical aspect, outlines drawn."""
    rows, cols = plane.shape
    extent_y, extent_x = rows * plane_spacing[0], cols * plane_spacing[1]
    scale = tile_size / max(extent_y, extent_x)
    size = (max(1, round(extent_x * scale)), max(1, round(extent_y * scale)))  # (width, height)
    low, high = window
    gray = np.clip((plane - low) / max(high - low, 1e-6), 0, 1) * 255
    rgb = np.asarray(Image.fromarray(gray.astype(np.uint8)).resize(size, Image.BILINEAR).convert("RGB")).copy()
    for labels, color in overlays:
        # Nearest-neighbour upsampling keeps the outline one display pixel wide and crisp.
        scaled = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size, Image.NEAREST))
        rgb[outline(scaled)] = color
    return Image.fromarray(rgb)


def outline(labels: np.ndarray) -> np.ndarray:
    """Bool ``(rows, cols)``: labelled pixels with a 4-neighbour of another value (or the edge)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    )
    return (labels != 0) & differs


def _header(draw: ImageDraw.ImageDraw, title: str, font, entries) -> None:
    _label(draw, (GAP, 4), title, font, (255, 255, 255))
    x = GAP
    for text, color in entries:
        draw.rectangle([x, 22, x + 10, 30], fill=color)
        draw.text((x + 14, 19), text, fill=color, font=font)
        x += 24 + int(draw.textlength(text, font=font))


def _label(draw, position, text, font, color) -> None:
    if not text:
        return
    x, y = position
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=BACKGROUND)
    draw.text((x, y), text, fill=color, font=font)


# ---------------------------------------------------------------------------------------------
# Box plot


def box_stats(values: Sequence[float]) -> dict:
    """Tukey box-plot figures of the non-NaN ``values``: quartiles, whiskers (furthest values
    within 1.5 IQR of the box), outliers, mean and count."""
    data = np.sort(np.array([v for v in values if not math.isnan(v)], dtype=float))
    if data.size == 0:
        raise InputError("A box needs at least one value.")
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    reach = 1.5 * (q3 - q1)
    inside = data[(data >= q1 - reach) & (data <= q3 + reach)]
    return {
        "q1": float(q1),
        "median": float(median),
        "q3": float(q3),
        "low": float(inside.min()),
        "high": float(inside.max()),
        "outliers": [float(v) for v in data if v < q1 - reach or v > q3 + reach],
        "mean": float(data.mean()),
        "count": int(data.size),
    }


def write_dice_boxplot(
    path, values: Mapping[str, Sequence[float]], *, title: str = "Dice per case", y_label: str = "Dice", y_range=(0.0, 1.0)
) -> Path:
    """Write a PNG box plot with one box per key of ``values`` (e.g. method -> per-case Dice).

    Boxes span the quartiles with the median as a thick red line and the mean as a black dot;
    whiskers follow Tukey (1.5 IQR); outliers are open circles. NaN values are left out.
    """
    stats = {name: box_stats(v) for name, v in values.items() if any(not math.isnan(x) for x in v)}
    if not stats:
        raise InputError("Nothing to plot: every method has no value.")
    font, small = _font(14), _font(11)
    slot, left, right, top, bottom = 120, 64, 20, 56, 64
    width, height = max(left + right + slot * len(stats), 480), 420
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y_low, y_high = y_range
    plot_bottom = height - bottom

    def y_of(value: float) -> float:
        clipped = min(max(value, y_low), y_high)
        return plot_bottom - (clipped - y_low) / (y_high - y_low) * (plot_bottom - top)

    for tick in np.linspace(y_low, y_high, 6):
        y = y_of(tick)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.line([left - 5, y, left, y], fill=(0, 0, 0))
        text = f"{tick:.1f}"
        draw.text((left - 8 - draw.textlength(text, font=small), y - 7), text, fill=(0, 0, 0), font=small)
    draw.line([left, top, left, plot_bottom], fill=(0, 0, 0), width=2)
    draw.line([left, plot_bottom, width - right, plot_bottom], fill=(0, 0, 0), width=2)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    key = "box: quartiles; red line: median; dot: mean; whiskers: 1.5 IQR; circles: outliers"
    draw.text((left, 28), key, fill=(90, 90, 90), font=small)
    draw.text((6, top - 24), y_label, fill=(0, 0, 0), font=small)
    for n, (name, s) in enumerate(stats.items()):
        centre = left + slot * n + slot // 2
        half = slot // 4
        draw.line([centre, y_of(s["low"]), centre, y_of(s["q1"])], fill=(0, 0, 0), width=2)
        draw.line([centre, y_of(s["q3"]), centre, y_of(s["high"])], fill=(0, 0, 0), width=2)
        for whisker in (s["low"], s["high"]):
            draw.line([centre - half // 2, y_of(whisker), centre + half // 2, y_of(whisker)], fill=(0, 0, 0), width=2)
        draw.rectangle([centre - half, y_of(s["q3"]), centre + half, y_of(s["q1"])], fill=(150, 190, 235), outline=(30, 60, 120), width=2)
        draw.line([centre - half, y_of(s["median"]), centre + half, y_of(s["median"])], fill=(200, 30, 30), width=3)
        m = y_of(s["mean"])
        draw.ellipse([centre - 4, m - 4, centre + 4, m + 4], fill=(0, 0, 0))
        for value in s["outliers"]:
            y = y_of(value)
            draw.ellipse([centre - 3, y - 3, centre + 3, y + 3], outline=(0, 0, 0), width=1)
        shown = _fit_text(draw, name, small, slot - 8)
        draw.text((centre - draw.textlength(shown, font=small) / 2, plot_bottom + 10), shown, fill=(0, 0, 0), font=small)
        count = f"n={s['count']}"
        draw.text((centre - draw.textlength(count, font=small) / 2, plot_bottom + 28), count, fill=(90, 90, 90), font=small)
    return _save(canvas, path)


def _fit_text(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# ---------------------------------------------------------------------------------------------
# Shared


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _save(canvas: Image.Image, path) -> Path:
    """Save as PNG atomically (a temporary file in the same folder, then moved into place)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(handle)
    try:
        canvas.save(temporary, format="PNG")
        apply_destination_mode(temporary, path)  # mkstemp's 0600 would ignore the umask
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
