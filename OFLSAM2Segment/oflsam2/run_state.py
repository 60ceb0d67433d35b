"""Review and correct from files: the CLI's ``--save-state``, ``--previous``, ``--quality-out``
and ``--suggest``.

A run given ``--save-state DIR`` writes ``DIR/state.json`` after its outputs: the model and
image size, method, axis, labels and their names, annotated slices, the image grid and a
fingerprint of its voxels, a digest of the output, the per-slice quality and, for ``ofl``, the
trained adapter in ``DIR/adapter``. An update is the same command with ``--previous PREV`` (the
untouched output of that run) and ``--support CORRECTED`` (PREV with corrections drawn on some
slices): every plane along the run's axis where CORRECTED differs from PREV becomes an annotated
slice (a plane emptied of every label is a cleared false positive: annotated as "absent"), the
engine re-propagates from those planes only (:func:`oflsam2.review.previous_run`), and the state
is rewritten for the next round. The refined adapter and ``state.json`` replace the old ones
together, after the outputs are written: a failed update leaves the state as it was, so running
it again gives the same result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OFLSAM2Error
from .outputs import StagedOutputs
from .review import quality_rows, suggest, write_quality_csv
from .review_checks import image_digest
from .volume import AXIS_NAMES, MAX_LABEL, format_indices, grid_text, read_image, read_label_image, read_labels, to_array

STATE_FILE = "state.json"
ADAPTER_FOLDER = "adapter"
KIND = "oflsam2-run-state"
FORMAT_VERSION = 2  # 2: image_digest (an update of another image on the same grid is refused)
_GRID_TOLERANCE = 1e-4  # relative, on spacing, origin and direction
# what an update reads from the state (a hand-edited or truncated state lacks some)
_REQUIRED_STATE_KEYS = frozenset(
    {"method", "axis", "axis_name", "preset", "labels", "annotated", "grid", "output_digest", "image_digest"}
)


class _RecordingEngine:
    """Passes ``previous`` to :meth:`Engine.segment` and keeps the result for the review outputs."""

    def __init__(self, engine, previous=None):
        self.engine, self.previous, self.result = engine, previous, None

    def segment(self, *args, **kwargs):
        self.result = self.engine.segment(*args, previous=self.previous, **kwargs)
        return self.result


def check_review_options(method: str, options, quality_out, state_dir, previous_path) -> None:
    """Refuse review options that cannot work, before anything is read."""
    from .outputs import check_writable
    from .pipeline import check_folder_writable

    if quality_out is not None:
        path = Path(quality_out)
        if path.suffix.lower() != ".csv":
            raise InputError(f"--quality-out {path}: give a .csv file name.")
        if not path.parent.is_dir():
            raise InputError(f"--quality-out {path}: the folder {path.parent} does not exist. Create it first.")
        check_writable(path, (".csv",))  # a read-only folder or file: refused now, not after the run
    if previous_path is not None and state_dir is None:
        raise InputError(
            "--previous needs --save-state DIR: the folder the run that wrote the previous result saved its "
            "state in (it knows the annotated slices). Run the first segmentation with --save-state DIR."
        )
    if state_dir is not None:
        check_folder_writable(Path(state_dir), "--save-state")
        if method == "ofl" and options.save_adapter is not None:
            raise InputError("--save-state already keeps the OFL-SAM2 adapter (in DIR/adapter); leave out --save-adapter.")


def load_state(state_dir, settings) -> dict:
    """The state saved in ``state_dir``; refused when missing, damaged or made with another
    model or image size."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path} does not exist: --previous needs the state saved by the run that wrote the previous result "
            "(run it with --save-state DIR)."
        ) from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path} cannot be read ({error}); run a fresh segmentation with --save-state.") from None
    if (not isinstance(state, dict) or state.get("kind") != KIND or state.get("format_version") != FORMAT_VERSION
            or not _REQUIRED_STATE_KEYS <= state.keys()):
        raise InputError(f"{path} is not a run state this version reads; run a fresh segmentation with --save-state.")
    problem = _state_problem(state)
    if problem:
        raise InputError(f"{path} is damaged ({problem}); it was edited or truncated. Run a fresh segmentation with --save-state.")
    current = {"model": settings.model, "image_size": settings.image_size, "random_weights": settings.random_weights}
    problems = [f"{key} is {state.get(key)!r} there but {value!r} now" for key, value in current.items() if state.get(key) != value]
    if problems:
        raise InputError(
            f"The saved state {path} comes from another model setup: {'; '.join(problems)}. Update with the same "
            "--model and --image-size (and weights), or run a fresh segmentation."
        )
    return state


def _state_problem(state: dict) -> str | None:
    """What is wrong with the fields of a state read from disk, or None."""
    from .settings import METHODS

    def whole(value, low=0, high=None) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)

    def numbers(value, count) -> bool:
        return (isinstance(value, list) and len(value) == count
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value))

    grid, labels, annotated = state["grid"], state["labels"], state["annotated"]
    if state["method"] not in METHODS:
        return f"method is {state['method']!r:.60}, not one of {', '.join(METHODS)}"
    if not whole(state["axis"], 0, 2) or state["axis_name"] not in AXIS_NAMES:
        return f"axis is {state['axis']!r:.40} / {state['axis_name']!r:.40}, not 0..2 and one of {', '.join(AXIS_NAMES)}"
    if not isinstance(state["preset"], str):
        return f"preset is {state['preset']!r:.60}, not a preset name"
    if (not isinstance(grid, dict) or not (isinstance(grid.get("size"), list) and len(grid["size"]) == 3
                                           and all(whole(n, 1) for n in grid["size"]))
            or not numbers(grid.get("spacing"), 3) or not numbers(grid.get("origin"), 3) or not numbers(grid.get("direction"), 9)):
        return f"grid is {grid!r:.120}, not size, spacing, origin (3 numbers each) and direction (9)"
    if not isinstance(labels, list) or not labels or not all(whole(v, 1, MAX_LABEL) for v in labels) or len(set(labels)) != len(labels):
        return f"labels is {labels!r:.80}, not a list of distinct label values 1..{MAX_LABEL}"
    count = grid["size"][2 - state["axis"]]
    if not isinstance(annotated, list) or not all(whole(i, 0, count - 1) for i in annotated):
        return f"annotated is {annotated!r:.80}, not a list of slice indices 0..{count - 1}"
    if not isinstance(state["output_digest"], str) or not isinstance(state["image_digest"], str):
        return "output_digest and image_digest must be strings"
    names = state.get("label_names", {})
    if not isinstance(names, dict) or not all(isinstance(n, str) and n.strip() for n in names.values()):
        return f"label_names is {names!r:.80}, not label -> name"
    for key in ("quality", "label_stats"):
        value = state.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, dict) for k, v in value.items()):
            return f"{key} is {value!r:.80}, not label -> entries"
    for label, entries in state.get("quality", {}).items():
        for index, entry in entries.items():
            if not (isinstance(index, str) and index.isdigit() and int(index) < count and isinstance(entry, dict)
                    and numbers([entry.get("quality")], 1) and isinstance(entry.get("source"), str)):
                return f"the quality of label {label}, slice {index!r:.20} is {entry!r:.80}, not {{quality, source}}"
    for label, stats in state.get("label_stats", {}).items():
        selected = stats.get("selected", [])
        if not isinstance(selected, list) or not all(whole(i, 0, count - 1) for i in selected):
            return f"the selected slices of label {label} are {selected!r:.80}, not slice indices"
    return None


def label_digest(labels: np.ndarray) -> str:
    """A digest of a label map's values and shape (independent of the file's integer type)."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    digest.update(str(labels.shape).encode())
    return digest.hexdigest()


def _grid(image: sitk.Image) -> dict:
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _same_grid(grid: dict, image: sitk.Image) -> bool:
    other = _grid(image)
    if grid["size"] != other["size"]:
        return False
    scale = max(1.0, float(np.abs(other["spacing"]).max()))
    return all(np.allclose(grid[key], other[key], atol=_GRID_TOLERANCE * scale) for key in ("spacing", "origin", "direction"))


def _read_previous(previous_path, image: sitk.Image, state: dict) -> np.ndarray:
    """PREV as an integer array; refused unless it lies on the image's grid and is the output
    the state's run wrote."""
    if Path(previous_path).is_dir():
        raise InputError(f"The previous result {previous_path} is a folder; give the label file the run wrote (its --out).")
    previous = read_label_image(previous_path, "previous result")
    if not _same_grid(_grid(image), previous):
        raise InputError(
            f"The previous result {previous_path} lies on another grid than the image:\n"
            f"  image:           {grid_text(image)}\n"
            f"  previous result: {grid_text(previous)}\n"
            "Give the output of a run on this image."
        )
    labels = sitk.GetArrayFromImage(previous).astype(np.int32)
    if label_digest(labels) != state.get("output_digest"):
        raise InputError(
            f"The previous result {previous_path} is not the output saved with this state (it was edited, or comes "
            "from another run). Give the untouched output as --previous and your corrected copy as --support."
        )
    return labels


def _edited_planes(support: np.ndarray, previous: np.ndarray, labels, axis: int, annotated) -> list[int]:
    """Planes along ``axis`` where the support's labels differ from the previous result.

    A plane emptied of every label is a correction to "absent" (a cleared false positive): the
    support is a copy of the whole previous result, so an empty plane that held a label there
    was emptied on purpose. Refused: a label the previous run did not segment (it would be
    dropped), corrections drawn on another axis (the changes fill one plane of another axis but
    several of the run's: a sagittal stroke in an axial run), and an annotated slice erased.
    """
    added = [int(v) for v in np.unique(support) if v != 0 and v not in set(labels)]
    if added:
        planes = np.flatnonzero(np.moveaxis(np.isin(support, added), axis, 0).any(axis=(1, 2)))
        raise InputError(
            f"Label(s) {', '.join(map(str, added))} appear on slice(s) {format_indices([int(i) for i in planes])} of the "
            f"corrected copy, but the previous run segmented label(s) {', '.join(map(str, labels))}: an update keeps the "
            "run's labels, and the new one would be lost. Remove it, or run a fresh segmentation with it in --labels."
        )
    ours = support
    theirs = np.where(np.isin(previous, labels), previous, 0)
    changed = ours != theirs
    planes = {a: np.flatnonzero(changed.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)}
    edited = [int(i) for i in planes[axis]]
    for other in (a for a in range(3) if a != axis):
        if len(edited) >= 3 and len(planes[other]) == 1:
            raise InputError(
                f"The corrections lie in one plane of array axis {other} ({int(planes[other][0])}) but change "
                f"{len(edited)} slices of the run's axis {axis}: draw corrections on slices of the run's axis, "
                "or run a fresh segmentation along the other axis."
            )
    empty = [i for i in edited if not np.take(ours, i, axis=axis).any()]
    erased = [i for i in empty if i in set(annotated)]
    if erased:
        raise InputError(
            f"Annotated slice(s) {format_indices(erased)} were erased in the support: an update cannot remove an "
            "annotation. Restore them, or run a fresh segmentation without them."
        )
    return edited


def prepare_update(state: dict, image_path, support_path, previous_path, labels, axis: str, method: str):
    """Check an update against its state; return (previous SegmentResult, annotated slices,
    edited slices, the annotated slices that hold no label, axis name). Nothing is written."""
    from .settings import SegmentResult

    if method != state["method"]:
        raise InputError(
            f"The previous result was made with --method {state['method']}; update with the same method "
            "(or run a fresh segmentation)."
        )
    if axis not in ("auto", state["axis_name"]):
        raise InputError(
            f"The previous run sliced along the {state['axis_name']} axis, this one asks for {axis}: corrections "
            f"are taken on the run's axis. Leave out --axis or give --axis {state['axis_name']}."
        )
    if labels is not None and sorted(labels) != sorted(state["labels"]):
        raise InputError(f"The previous run segmented labels {state['labels']}; an update segments the same labels.")
    if support_path is None:
        raise InputError("--previous needs --support: the previous result with your corrections drawn on some slices.")
    image = read_image(image_path)
    if not _same_grid(state["grid"], image):
        raise InputError(f"The image {image_path} is not on the grid of the image the saved state was made on.")
    if image_digest(to_array(image)) != state["image_digest"]:
        raise InputError(
            f"The image {image_path} is not the image the saved state was made on (same grid, other voxels: another "
            "patient or a processed copy?). Update with the first run's --image, or run a fresh segmentation."
        )
    previous = _read_previous(previous_path, image, state)
    support = read_labels(support_path, image)
    axis_index, annotated = int(state["axis"]), [int(i) for i in state["annotated"]]
    edited = _edited_planes(support, previous, state["labels"], axis_index, annotated)
    result = SegmentResult(
        masks={int(label): previous == int(label) for label in state["labels"]},
        axis=axis_index,
        method=state["method"],
        info={"annotated": annotated, "quality": state.get("quality", {}), "labels": state.get("label_stats", {}),
              "image_digest": state["image_digest"]},
    )
    result.info["labels"] = {int(k): v for k, v in result.info["labels"].items()}
    planes = sorted(set(annotated) | set(edited))
    cleared = [i for i in planes if not np.take(support, i, axis=axis_index).any()]
    return result, planes, edited, cleared, state["axis_name"]


def save_state(state_dir, summary: dict, result, settings, image: sitk.Image, output_path,
               staged: StagedOutputs | None = None) -> Path:
    """Write ``state.json`` for the next update, after the outputs: staged and committed with
    ``staged`` (the update's refined adapter), so that both replace the old ones or neither does."""
    output = sitk.GetArrayFromImage(sitk.ReadImage(str(output_path)))
    labels = summary["labels"]
    state = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "model": settings.model,
        "image_size": settings.image_size,
        "random_weights": settings.random_weights,
        "method": summary["method"],
        "axis": summary["axis"],
        "axis_name": summary["axis_name"],
        "preset": summary["preset"],
        "labels": labels,
        "label_names": {str(k): v for k, v in summary["label_names"].items()},
        "annotated": [int(i) for i in result.info["annotated"]],
        "grid": _grid(image),
        "image_digest": summary["image_digest"],
        "output": str(output_path),
        "output_digest": label_digest(output),
        "quality": {str(label): {str(i): e for i, e in entries.items()} for label, entries in result.info["quality"].items()},
        "label_stats": {
            str(label): {"selected": stats["selected"]} for label, stats in result.info["labels"].items() if "selected" in stats
        },
    }
    folder = Path(state_dir)
    path = folder / STATE_FILE
    files = staged if staged is not None else StagedOutputs()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files.text(path, json.dumps(state, indent=1, default=_plain) + "\n")
        files.commit()
    except BaseException:
        files.discard()
        raise
    return path


def _plain(value):
    """numpy scalars in the JSON."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def segment_reviewed(
    *, image_path, support_path, out_path, seg_nrrd_path, method, axis, preset, labels, support_slices, references,
    settings, options, events, previous_path=None, state_dir=None, quality_out=None, suggest_count=None, engine=None,
    label_names=None,
) -> dict:
    """:func:`oflsam2.pipeline.segment_files` plus the review options (see the module doc).

    Returns its summary with ``quality_out``, ``suggested`` and, for an update, ``edited`` added.
    """
    import dataclasses

    from .api import Engine
    from .pipeline import refuse_inputs_as_output, segment_files

    check_review_options(method, options, quality_out, state_dir, previous_path)
    for output in (out_path, seg_nrrd_path):  # --previous is an input too: an update writes a new file
        if output is not None:
            refuse_inputs_as_output(output, [previous_path])
    previous = None
    edited = None
    cleared = ()
    if previous_path is not None:
        if support_slices is not None:
            raise InputError("--support-slices cannot be combined with --previous: the corrected slices are found by comparison.")
        state = load_state(state_dir, settings)
        previous, support_slices, edited, cleared, axis = prepare_update(
            state, image_path, support_path, previous_path, labels, axis, method
        )
        labels = state["labels"]
        label_names = _state_names(state, label_names)
        preset = state["preset"] if preset == "auto" else preset
        if method == "ofl" and options.adapter is None:
            options = dataclasses.replace(options, adapter=_state_adapter(state_dir))
    pending = None
    if state_dir is not None and method == "ofl":
        options = dataclasses.replace(options, save_adapter=str(Path(state_dir) / ADAPTER_FOLDER))
        pending = StagedOutputs()  # the refined adapter: committed with state.json, after the outputs
    recording = _RecordingEngine(engine or Engine(settings), previous)
    try:
        summary = segment_files(
            image_path, support_path, out_path,
            labels=labels, support_slices=support_slices, method=method, axis=axis, preset=preset, settings=settings,
            options=options, references=references, seg_nrrd_path=seg_nrrd_path, events=events, engine=recording,
            label_names=label_names, cleared_slices=cleared, adapter_files=pending,
        )
    except BaseException:
        if pending is not None:
            pending.discard()
        raise
    result = recording.result
    if edited is not None:
        summary["edited"] = edited
        summary["cleared"] = [i for i in cleared if i in edited]
    if suggest_count is not None:
        summary["suggested"] = suggest(result, suggest_count)
    try:
        if quality_out is not None:
            summary["quality_out"] = _write_after_outputs(
                summary, str(quality_out), lambda: write_quality_csv(quality_rows(result), quality_out)
            )
        if state_dir is not None:
            what = f"the state in {state_dir}" + (" (and its adapter)" if pending is not None else "")
            summary["state"] = _write_after_outputs(
                summary, what,
                lambda: save_state(state_dir, summary, result, settings, read_image(image_path), out_path, pending),
            )
    finally:
        if pending is not None:
            pending.discard()  # nothing left to discard once committed
    return summary


def _state_adapter(state_dir) -> str:
    """The ``ofl`` head an update warm-starts: the state's adapter folder, which must be there
    (without it the update would silently train a new head from scratch)."""
    folder = Path(state_dir) / ADAPTER_FOLDER
    if not folder.is_dir():
        raise InputError(
            f"The saved state in {state_dir} has no {ADAPTER_FOLDER}/ folder: the OFL-SAM2 head the previous run "
            f"trained is gone (moved or deleted), and an update refines it. Put {folder} back, or run a fresh "
            "segmentation with --save-state."
        )
    return str(folder)


def _state_names(state: dict, given) -> dict[int, str]:
    """The label names of the previous run (its adapters are saved under them); an update keeps them."""
    names = {int(k): v for k, v in state.get("label_names", {}).items()}
    if given and any(names.get(int(k)) != v for k, v in dict(given).items()):
        raise InputError(f"The previous run named its labels {names}; an update keeps those names (leave out --label-names).")
    return names


def _write_after_outputs(summary: dict, what: str, write) -> str:
    """``write()``'s path; a system error (a full disk) says that the outputs are in place already."""
    try:
        return str(write())
    except (OSError, OFLSAM2Error) as error:
        outputs = summary["outputs"]
        reason = error.strerror or error if isinstance(error, OSError) else error
        raise OFLSAM2Error(
            f"{' and '.join(outputs)} {'were' if len(outputs) > 1 else 'was'} written, but {what} could not be: "
            f"{reason}. Make room (or fix the folder) and run the same command again."
        ) from None


def describe(summary: dict) -> list[str]:
    """Lines the CLI prints for the review outputs."""
    lines = []
    if "edited" in summary:
        recomputed = summary["engine"].get("recomputed", {})
        cleared = f" (cleared: {summary['cleared']})" if summary.get("cleared") else ""
        lines.append(f"corrected slices {summary['edited']}{cleared}; recomputed: " + "; ".join(
            f"label {label} {format_indices(slices) or 'none'}" for label, slices in recomputed.items()
        ))
    if "suggested" in summary:
        for label, slices in summary["suggested"].items():
            name = summary["label_names"][label]
            lines.append(f"annotate next, label {label} ({name}): slices {', '.join(map(str, slices)) or 'none found'}")
    if "quality_out" in summary:
        lines.append(f"wrote {summary['quality_out']}")
    if "state" in summary:
        lines.append(f"saved state in {summary['state']}")
    return lines

