"""Saved OFL-SAM2 adapters: the trained parts of one label, reusable on new volumes.

An adapter is two files in a directory, named after the label (name, or id if unnamed; see
:mod:`oflsam2.adapter_labels` for how a run's label finds its adapter):
``<label>.safetensors`` (the tensors: lift, AFM, λ and whatever else the caller saves) and
``<label>.json`` (what it was trained with and on which SAM2). The JSON records the SHA256 of
the tensor file and is written last, so it is the commit record: an interrupted save leaves
either the previous adapter intact, or files that refuse to load — never a mix that loads.
Both files get the permissions of the files they replace, or the umask's for new ones.

Loading trusts nothing in the files: the tensor file must lie in the adapter's folder, every
tensor must be finite and of a plausible magnitude, and metadata fields must have their types.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_labels import adapter_stem, find_adapter
from ..errors import AdapterError
from ..outputs import StagedOutputs, apply_destination_mode
from ..version import __version__
from .learner import FewShotLearner

FORMAT_VERSION = 1
KIND = "oflsam2-adapter"
TENSORS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
REQUIRED_METADATA = ("model", "config", "checkpoint_sha256", "image_size", "preset", "axis", "label", "label_name")
# A trained head and its support features are far below this; a larger (or non-finite) value is
# a damaged or forged file, whose masks would be empty or garbage without any other sign.
MAX_TENSOR_MAGNITUDE = 1e6
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


def save_adapter(
    directory: str | os.PathLike,
    modules: Mapping[str, nn.Module | torch.Tensor],
    metadata: dict,
    staged: StagedOutputs | None = None,
) -> Path:
    """Write one label's adapter into ``directory`` (created if needed); return the tensor file.

    ``modules``: named modules (their state dicts are stored as ``<name>.<key>``) and/or named
    tensors. ``metadata``: JSON-serialisable; it must hold REQUIRED_METADATA (the identity of
    the SAM2 model, preprocessing and label) and should hold the training settings. The format
    version, engine version, creation time and — found among ``modules`` — the learner's kernel
    size are added. An existing adapter of the same label is replaced; on any error the
    directory keeps what it had before (or, at worst, files that refuse to load).

    ``staged``: write the files under temporary names and let that
    :class:`~oflsam2.outputs.StagedOutputs` move them into place (tensors, then JSON) when it
    commits, together with the caller's other outputs; until then the previous adapter stays.
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"Adapter metadata lacks {', '.join(missing)}.")
    tensors = _flatten(modules)
    record = dict(metadata)
    for module in modules.values():
        learners = [m for m in module.modules() if isinstance(m, FewShotLearner)] if isinstance(module, nn.Module) else []
        if learners:
            record["learner_kernel_size"] = learners[0].kernel_size
    stem = adapter_stem(metadata["label_name"], metadata["label"])
    record.update(
        kind=KIND,
        format_version=FORMAT_VERSION,
        engine_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tensors_file=stem + TENSORS_SUFFIX,
    )
    directory = Path(directory)
    try:
        if staged is not None:  # folders made for the adapter go again if it is discarded
            for folder in reversed([d for d in (directory, *directory.parents) if not d.exists()]):
                staged.remove_if_empty(folder)
        directory.mkdir(parents=True, exist_ok=True)
        _refuse_other_label(directory / (stem + METADATA_SUFFIX), metadata)
        return _write(directory, stem, tensors, record, staged)
    except OSError as error:
        raise AdapterError(f"Cannot write the adapter into {directory}: {error}. Choose a writable directory with free space.") from error


def load_adapter(
    path: str | os.PathLike,
    label: str | int | None = None,
    expected: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter -> (CPU tensors by name, metadata).

    ``path``: an adapter's ``.safetensors`` or ``.json`` file, or a directory; in a directory
    ``label`` (name or id) picks the adapter, and may be left out when there is only one.
    ``expected``: the current run's values of metadata fields (``model``, ``config``,
    ``checkpoint_sha256``, ``image_size``, ``preset``, ``axis``...); every field given must
    match. Raises :class:`AdapterError` for a missing, incomplete, corrupt or mismatched adapter.
    """
    metadata_path = _metadata_path(Path(path), label)
    metadata = _read_metadata(metadata_path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"Adapter {metadata_path}: format_version is {metadata.get('format_version')!r}, this engine "
            f"({__version__}) reads {FORMAT_VERSION}. Train the adapter again with this version."
        )
    missing = [key for key in (*REQUIRED_METADATA, "tensors_file", "tensors_sha256") if key not in metadata]
    if missing:
        raise AdapterError(f"Adapter {metadata_path} lacks {', '.join(missing)}: it was edited or is damaged. Train it again.")
    _check_expected(metadata_path, metadata, expected or {})
    tensors_path = _tensors_path(metadata_path, metadata["tensors_file"])
    try:
        digest = _sha256(tensors_path)
    except OSError as error:
        raise AdapterError(
            f"Adapter {metadata_path}: its tensor file {tensors_path.name} cannot be read ({error}). "
            "Restore it or train the adapter again."
        ) from error
    if digest != metadata.get("tensors_sha256"):
        raise AdapterError(
            f"Adapter {metadata_path}: {tensors_path.name} does not match its metadata (truncated, modified, "
            "or left by an interrupted save). Train the adapter again."
        )
    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"Adapter {metadata_path}: {tensors_path.name} is not a readable tensor file ({error}).") from error
    _check_values(metadata_path, tensors)
    return tensors, metadata


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
            _check_types(json_path, metadata)
            found.append({**metadata, "path": str(json_path)})
    return sorted(found, key=_label_order)


def _label_order(metadata: dict) -> tuple:
    """Integer label ids in numeric order, anything else after them."""
    label = metadata.get("label")
    return (0, label, "") if isinstance(label, int) else (1, 0, str(label))


def _flatten(modules: Mapping[str, nn.Module | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named modules and tensors -> independent contiguous CPU tensors (safetensors refuses shared storage)."""
    flat = {}
    for name, item in modules.items():
        entries = {f"{name}.{k}": v for k, v in item.state_dict().items()} if isinstance(item, nn.Module) else {name: item}
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"Adapter entry {key!r} is a {type(value).__name__}, not a tensor.")
            flat[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    if not flat:
        raise ValueError("An adapter needs at least one tensor.")
    return flat


def _refuse_other_label(metadata_path: Path, metadata: dict) -> None:
    """Two labels whose names map to the same file must not overwrite each other (the same
    name again replaces its adapter, even under a new label id)."""
    try:
        existing = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(existing, dict) and existing.get("label_name") != metadata["label_name"]:
        raise AdapterError(
            f"{metadata_path} belongs to label {existing.get('label_name')!r} ({existing.get('label')}), not "
            f"{metadata['label_name']!r} ({metadata['label']}). Save into another directory or rename the label."
        )


def _write(directory: Path, stem: str, tensors: dict[str, torch.Tensor], record: dict, staged: StagedOutputs | None) -> Path:
    """Temp files first, then the tensors and finally the JSON are moved into place (by
    ``staged`` when it commits, if given)."""
    tensors_path = directory / (stem + TENSORS_SUFFIX)
    metadata_path = directory / (stem + METADATA_SUFFIX)
    temporary = []
    replaced_tensors = False
    try:
        tensors_tmp = _temporary(directory, stem, temporary)
        save_file(tensors, tensors_tmp)
        _fsync(tensors_tmp)
        record["tensors_sha256"] = _sha256(Path(tensors_tmp))
        metadata_tmp = _temporary(directory, stem, temporary)
        Path(metadata_tmp).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync(metadata_tmp)
        if staged is not None:
            staged.adopt(Path(tensors_tmp), tensors_path)
            staged.adopt(Path(metadata_tmp), metadata_path)
            return tensors_path
        apply_destination_mode(tensors_tmp, tensors_path)
        apply_destination_mode(metadata_tmp, metadata_path)
        os.replace(tensors_tmp, tensors_path)
        replaced_tensors = True
        os.replace(metadata_tmp, metadata_path)
    except BaseException:
        for leftover in temporary:
            Path(leftover).unlink(missing_ok=True)
        if replaced_tensors:  # the old JSON (if any) no longer matches; leave no new tensors behind
            tensors_path.unlink(missing_ok=True)
        raise
    return tensors_path


def _temporary(directory: Path, stem: str, registry: list[str]) -> str:
    handle, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=directory)
    os.close(handle)
    registry.append(name)
    return name


def _fsync(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata_path(path: Path, label: str | int | None) -> Path:
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


def _tensors_path(metadata_path: Path, name) -> Path:
    """The tensor file the metadata names: a plain file name in the adapter's own folder."""
    if (not isinstance(name, str) or not name.endswith(TENSORS_SUFFIX) or os.path.basename(name) != name
            or "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name)):
        raise AdapterError(
            f"Adapter {metadata_path}: tensors_file {name!r} is not a file name in the adapter's folder (a path "
            "elsewhere, or not a .safetensors name); the metadata was edited. Train the adapter again."
        )
    return metadata_path.parent / name


def _check_types(metadata_path: Path, metadata: dict) -> None:
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


def _check_values(metadata_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse non-finite or implausibly large tensors (they load, then segment nothing)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.float()
        if not bool(torch.isfinite(values).all()):
            raise AdapterError(f"Adapter {metadata_path}: tensor {name!r} holds NaN or infinite values; the adapter is "
                               "damaged (or was trained into divergence). Train it again.")
        largest = float(values.abs().max())
        if largest > MAX_TENSOR_MAGNITUDE:
            raise AdapterError(f"Adapter {metadata_path}: tensor {name!r} holds values up to {largest:.3g}, far beyond "
                               f"what training produces (at most {MAX_TENSOR_MAGNITUDE:.0e}); the adapter is damaged. "
                               "Train it again.")


def _read_metadata(metadata_path: Path) -> dict:
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


def _check_expected(metadata_path: Path, metadata: dict, expected: dict) -> None:
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
