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
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn

from ..adapter_labels import adapter_stem
from ..errors import AdapterError
from ..outputs import StagedOutputs, apply_destination_mode, missing_folders, remove_empty_folders
from ..version import __version__
from .adapter_metadata import (  # noqa: F401  (the names and list_adapters: this module's API too)
    FORMAT_VERSION,
    KIND,
    METADATA_SUFFIX,
    REQUIRED_METADATA,
    TENSORS_SUFFIX,
    check_expected,
    file_sha256,
    find_metadata_file,
    list_adapters,
    read_metadata,
    tensors_file_path,
)
from .learner import FewShotLearner

# A trained head and its support features are far below this; a larger (or non-finite) value is
# a damaged or forged file, whose masks would be empty or garbage without any other sign.
MAX_TENSOR_MAGNITUDE = 1e6


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
    created = missing_folders(directory)
    try:
        if staged is not None:  # folders made for the adapter go again if it is discarded
            for folder in reversed(created):
                staged.remove_if_empty(folder)
        directory.mkdir(parents=True, exist_ok=True)
        _refuse_other_label(directory / (stem + METADATA_SUFFIX), metadata)
        return _write(directory, stem, tensors, record, staged)
    except BaseException as error:
        remove_empty_folders(created)
        if isinstance(error, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
            raise AdapterError(
                f"Cannot write the adapter into {directory}: {error}. Choose a writable directory with free space."
            ) from error
        raise


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
    metadata_path = find_metadata_file(Path(path), label)
    metadata = read_metadata(metadata_path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"Adapter {metadata_path}: format_version is {metadata.get('format_version')!r}, this engine "
            f"({__version__}) reads {FORMAT_VERSION}. Train the adapter again with this version."
        )
    missing = [key for key in (*REQUIRED_METADATA, "tensors_file", "tensors_sha256") if key not in metadata]
    if missing:
        raise AdapterError(f"Adapter {metadata_path} lacks {', '.join(missing)}: it was edited or is damaged. Train it again.")
    check_expected(metadata_path, metadata, expected or {})
    tensors_path = tensors_file_path(metadata_path, metadata["tensors_file"])
    try:
        # Read, not memory-mapped (safetensors' load_file keeps the file mapped while its tensors
        # live): Windows refuses to replace a mapped file, and an Update saves over the adapter it
        # loaded. The bytes checked are the bytes loaded.
        data = tensors_path.read_bytes()
    except OSError as error:
        raise AdapterError(
            f"Adapter {metadata_path}: its tensor file {tensors_path.name} cannot be read ({error}). "
            "Restore it or train the adapter again."
        ) from error
    if hashlib.sha256(data).hexdigest() != metadata.get("tensors_sha256"):
        raise AdapterError(
            f"Adapter {metadata_path}: {tensors_path.name} does not match its metadata (truncated, modified, "
            "or left by an interrupted save). Train the adapter again."
        )
    try:
        tensors = load_tensors(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"Adapter {metadata_path}: {tensors_path.name} is not a readable tensor file ({error}).") from error
    _check_values(metadata_path, tensors)
    return tensors, metadata


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
        record["tensors_sha256"] = file_sha256(Path(tensors_tmp))
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


