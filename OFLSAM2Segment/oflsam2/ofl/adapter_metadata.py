"""The metadata side of saved OFL-SAM2 adapters (see :mod:`.adapter`): the JSON records, their
fields and types, listing them and finding one. No torch and no safetensors: Slicer's process
lists and checks adapters with this module, and only the worker loads their tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from ..adapter_labels import adapter_stem, find_adapter
from ..errors import AdapterError

FORMAT_VERSION = 1
KIND = "oflsam2-adapter"
TENSORS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
REQUIRED_METADATA = ("model", "config", "checkpoint_sha256", "image_size", "preset", "axis", "label", "label_name")
# The type each metadata field must have when present (int excludes bool; float accepts int).
_FIELD_TYPES = {
    "label": int, "label_name": str, "model": str, "config": str, "checkpoint_sha256": str, "image_size": int,
    "preset": str, "axis": int, "tensors_file": str, "tensors_sha256": str, "format_version": int,
    "learner_kernel_size": int, "intensity": dict, "training": dict,
}

# What to do when a field of the adapter differs from the current run.
_ADVICE = {
    "model": "select the model the adapter was trained with, or train a new adapter",
    "config": "select the model the adapter was trained with, or train a new adapter",
    "checkpoint_sha256": "use the checkpoint the adapter was trained with, or train a new adapter",
    "image_size": "set the image size to the adapter's value, or train a new adapter",
    "preset": "use the adapter's intensity preset, or train a new adapter",
    "axis": "segment along the adapter's slice axis, or train a new adapter",
}



def list_adapters(directory: str | os.PathLike) -> list[dict]:
    """Metadata of every adapter in ``directory`` (plus ``path``: its JSON file), by label id.

    Only the JSON files are read (:func:`load_adapter` verifies the tensors); an adapter's JSON
    whose fields have the wrong types is refused (:class:`AdapterError` naming the file).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"Adapter directory {directory} does not exist.")
    found = []
    for json_path in sorted(directory.glob("*" + METADATA_SUFFIX)):
        try:
            metadata = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(metadata, dict) and metadata.get("kind") == KIND:
            check_types(json_path, metadata)
            found.append({**metadata, "path": str(json_path)})
    return sorted(found, key=_label_order)


def _label_order(metadata: dict) -> tuple:
    """Integer label ids in numeric order, anything else after them."""
    label = metadata.get("label")
    return (0, label, "") if isinstance(label, int) else (1, 0, str(label))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_metadata_file(path: Path, label: str | int | None) -> Path:
    """The JSON file of the adapter meant by ``path`` (and ``label`` for a directory: a name,
    or a label value, as :func:`oflsam2.adapter_labels.find_adapter` matches them)."""
    if path.suffix in (TENSORS_SUFFIX, METADATA_SUFFIX):
        return path.with_suffix(METADATA_SUFFIX)
    if not path.is_dir():
        raise AdapterError(f"No adapter at {path}: give an adapter directory or its .safetensors/.json file.")
    adapters = list_adapters(path)
    names = ", ".join(str(a.get("label_name") or a.get("label")) for a in adapters) or "none"
    if label is None:
        if len(adapters) == 1:
            return Path(adapters[0]["path"])
        raise AdapterError(f"{path} holds adapters for: {names}. Say which label to use.")
    if isinstance(label, str):
        found = find_adapter(adapters, None, label, path)
    else:
        found = find_adapter(adapters, int(label), adapter_stem("", int(label)), path)
    if found is None:
        raise AdapterError(f"No adapter for label {label!r} in {path} (it holds: {names}). Train one for this label first.")
    return Path(found["path"])


def tensors_file_path(metadata_path: Path, name) -> Path:
    """The tensor file the metadata names: a plain file name in the adapter's own folder."""
    if (not isinstance(name, str) or not name.endswith(TENSORS_SUFFIX) or os.path.basename(name) != name
            or "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name)):
        raise AdapterError(
            f"Adapter {metadata_path}: tensors_file {name!r} is not a file name in the adapter's folder (a path "
            "elsewhere, or not a .safetensors name); the metadata was edited. Train the adapter again."
        )
    return metadata_path.parent / name


def check_types(metadata_path: Path, metadata: dict) -> None:
    """Refuse metadata fields of the wrong type (a hand-edited file) before anything uses them."""
    problems = []
    for field, kind in _FIELD_TYPES.items():
        value = metadata.get(field)
        if field in metadata and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            problems.append(f"{field} is {value!r}, not {'a whole number' if kind is int else 'a ' + kind.__name__}")
    if not problems:
        if not 0 <= metadata.get("axis", 0) <= 2:
            problems.append(f"axis is {metadata['axis']!r}, not 0, 1 or 2")
        if metadata.get("label", 1) < 1 or metadata.get("image_size", 1) < 1:
            problems.append("label and image_size must be positive")
        intensity = metadata.get("intensity", {})
        if intensity and not (isinstance(intensity.get("modality"), str) and all(
                _is_number(intensity.get(k)) for k in ("low", "high"))):
            problems.append(f"intensity is {intensity!r}, not a modality name with low and high numbers")
    if problems:
        raise AdapterError(f"Adapter {metadata_path} cannot be used: {'; '.join(problems)}. The file was edited or "
                           "damaged; train and save the adapter again.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metadata(metadata_path: Path) -> dict:
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise AdapterError(
            f"Adapter metadata {metadata_path} is missing: the adapter is incomplete (an interrupted save?). "
            "Train and save it again."
        ) from error
    except (OSError, ValueError) as error:
        raise AdapterError(f"Adapter metadata {metadata_path} cannot be read ({error}). Train and save it again.") from error
    if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
        raise AdapterError(f"{metadata_path} is not an OFLSAM2 adapter's metadata file.")
    return metadata


def check_expected(metadata_path: Path, metadata: dict, expected: dict) -> None:
    """Refuse the adapter if any field given in ``expected`` differs (JSON-normalised)."""
    current = json.loads(json.dumps(expected))
    problems = [
        f"{field} is {metadata.get(field)!r} in the adapter but {value!r} now; "
        f"{_ADVICE.get(field, 'match it or train a new adapter')}"
        for field, value in current.items()
        if metadata.get(field) != value
    ]
    if problems:
        raise AdapterError(f"Adapter {metadata_path} does not fit this run: " + "; ".join(problems) + ".")


# Options that decide what the trained weights mean (λ's scale, τ0): an adapter is used only
# with its own values. Adapters written before they were recorded had these.
TRAINED_WITH = {"sample_weights": "mean", "tau_init": "zero"}


def check_trained_with(metadata: dict, options) -> None:
    """Refuse an adapter whose weights mean something else under this run's options: another
    value of a :data:`TRAINED_WITH` field, or the other OFL-SAM2 preset (its head was trained,
    and its support bank kept, under the other preset's choices). ``custom`` options on either
    side were chosen field by field and are not compared as presets."""
    from ..settings import ofl_preset

    training = metadata.get("training") if isinstance(metadata.get("training"), dict) else {}
    trained = training.get("options") if isinstance(training.get("options"), dict) else {}
    recorded = training.get("ofl_preset", "extended")
    name = metadata.get("label_name")
    for field, before in TRAINED_WITH.items():
        value = trained.get(field, before)
        if value != getattr(options, field):
            raise AdapterError(
                f"The adapter for {name!r} was trained with {field}={value!r}, this run uses {getattr(options, field)!r}: "
                f"its trained weights would mean something else. Run with {field}={value!r} (its preset: {recorded}) "
                "or train the adapter again."
            )
    current = ofl_preset(options)
    presets = ("paper", "extended")
    if "ofl_preset" in training and recorded in presets and current in presets and recorded != current:
        raise AdapterError(
            f"The adapter for {name!r} was trained with the OFL-SAM2 preset {recorded!r}, this run uses {current!r}: "
            f"its head was trained for the other preset's choices. Run with --ofl-preset {recorded} (Slicer: Advanced > "
            "OFL-SAM2 preset), or train the adapter again with this preset."
        )
