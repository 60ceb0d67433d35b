"""The metadata side of saved OFL-SAM2 adapters (see :mod:`.adapter`): file names, the JSON
records, listing and checking them. No torch and no safetensors: Slicer's process lists and
checks adapters with this module, and only the worker loads their tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import AdapterError

FORMAT_VERSION = 1
KIND = "oflsam2-adapter"
TENSORS_SUFFIX = ".safetensors"
METADATA_SUFFIX = ".json"
REQUIRED_METADATA = ("model", "config", "checkpoint_sha256", "image_size", "preset", "axis", "label", "label_name")

# What to do when a field of the adapter differs from the current run.
_ADVICE = {
    "model": "select the model the adapter was trained with, or train a new adapter",
    "config": "select the model the adapter was trained with, or train a new adapter",
    "checkpoint_sha256": "use the checkpoint the adapter was trained with, or train a new adapter",
    "image_size": "set the image size to the adapter's value, or train a new adapter",
    "preset": "use the adapter's intensity preset, or train a new adapter",
    "axis": "segment along the adapter's slice axis, or train a new adapter",
}


def adapter_stem(label_name: str | None, label: int) -> str:
    """File name (without suffix) of a label's adapter: its name made filesystem-safe, else its id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label_name or "").strip("._")
    return safe or f"label_{label}"


def list_adapters(directory: str | os.PathLike) -> list[dict]:
    """Metadata of every adapter in ``directory`` (plus ``path``: its JSON file), by label id.

    Only the JSON files are read; :func:`load_adapter` verifies the tensors.
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
    """The JSON file of the adapter meant by ``path`` (and ``label`` for a directory)."""
    if path.suffix in (TENSORS_SUFFIX, METADATA_SUFFIX):
        return path.with_suffix(METADATA_SUFFIX)
    if not path.is_dir():
        raise AdapterError(f"No adapter at {path}: give an adapter directory or its .safetensors/.json file.")
    adapters = list_adapters(path)
    if label is None:
        if len(adapters) == 1:
            return Path(adapters[0]["path"])
        names = ", ".join(str(a.get("label_name") or a.get("label")) for a in adapters) or "none"
        raise AdapterError(f"{path} holds adapters for: {names}. Say which label to use.")
    if isinstance(label, str):
        by_file = path / (adapter_stem(label, 0) + METADATA_SUFFIX)
        if by_file.is_file():
            return by_file
    for adapter in adapters:
        if str(label).casefold() in (str(adapter.get("label_name")).casefold(), str(adapter.get("label"))):
            return Path(adapter["path"])
    names = ", ".join(str(a.get("label_name") or a.get("label")) for a in adapters) or "none"
    raise AdapterError(f"No adapter for label {label!r} in {path} (it holds: {names}). Train one for this label first.")


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
