"""Which saved OFL-SAM2 adapter a label of a run uses. No torch: the CLI's checks before the
model loads, the OFL-SAM2 loader and the Slicer module apply this one rule.

An adapter folder holds one adapter per label *name*, stored as ``<stem>.json`` and
``<stem>.safetensors`` where the stem is the name made filesystem-safe (:func:`adapter_stem`;
an unnamed label is ``label_<value>``). A run's label finds its adapter so:

1. by name: the adapter whose stem is the label's, ignoring case (``Liver``, ``liver`` and
   ``Liver!`` are one name);
2. a label without a name of its own (its name is ``label_<value>``, the CLI's default without
   ``--label-names``) and no adapter of that name: by value, the one adapter recorded with that
   label value. Several adapters with that value (saved from different runs) are refused: the
   label must be named.

Two labels of one run that saves or uses adapters must therefore have different names
(:func:`check_distinct_names`): one would overwrite the other's adapter, or both would load one.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from .errors import AdapterError, InputError

UNNAMED = "label_{}"


def adapter_stem(label_name: str | None, label: int) -> str:
    """File name (without suffix) of a label's adapter: its name made filesystem-safe, else ``label_<id>``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label_name or "").strip("._")
    return safe or UNNAMED.format(label)


def _key(name: str | None, label) -> str:
    return adapter_stem(name, label).casefold()


def adapter_key(adapter: dict) -> str:
    """The name an adapter answers to (case-insensitive stem of its label's name)."""
    return _key(str(adapter.get("label_name") or ""), adapter.get("label"))


def describe(adapters: Sequence[dict]) -> str:
    """``name (value), ...`` of the adapters of a folder, for messages."""
    return ", ".join(f"{a.get('label_name') or adapter_stem('', a.get('label'))} ({a.get('label')})" for a in adapters) or "none"


def find_adapter(adapters: Sequence[dict], value: int | None, name: str, folder=None) -> dict | None:
    """The adapter (metadata dict) that label ``value`` named ``name`` uses, or None.

    ``value`` None: match by name only (the Slicer module, whose label values are only the
    order of the selected segments). Raises :class:`AdapterError` when two adapters answer to
    the name, or when an unnamed label's value is held by several adapters.
    """
    wanted = _key(name, value)
    by_name = [a for a in adapters if adapter_key(a) == wanted]
    if len(by_name) > 1:
        raise AdapterError(
            f"The adapter folder {folder} holds {len(by_name)} adapters named like {name!r} "
            f"({', '.join(str(a.get('path')) for a in by_name)}); keep one of them."
        )
    if by_name or value is None or wanted != UNNAMED.format(value).casefold():
        return by_name[0] if by_name else None
    by_value = [a for a in adapters if a.get("label") == value and not isinstance(a.get("label"), bool)]
    if len(by_value) > 1:
        raise AdapterError(
            f"The adapter folder {folder} holds several adapters for label value {value}: {describe(by_value)}. "
            "Say which one by naming the label (--label-names VALUE=NAME)."
        )
    return by_value[0] if by_value else None


def require_adapter(adapters: Sequence[dict], value: int | None, name: str, folder) -> dict:
    """:func:`find_adapter`, refusing a label without adapter with what the folder holds."""
    found = find_adapter(adapters, value, name, folder)
    if found is None:
        if value is None:
            label = f"label {name!r}"
        else:
            label = f"label {value}" if name == UNNAMED.format(value) else f"label {value} ({name})"
        raise AdapterError(
            f"The adapter folder {folder} has no adapter for {label}; it holds: {describe(adapters)}. Name the label "
            "like its adapter (--label-names VALUE=NAME), or train one for this label first."
        )
    return found


def check_distinct_names(labels: Iterable[tuple[int, str]]) -> None:
    """Refuse two labels whose names map to one adapter file (see the module's rule)."""
    seen: dict[str, tuple[int, str]] = {}
    for value, name in labels:
        key = _key(name, value)
        if key in seen:
            other = seen[key]
            raise InputError(
                f"Labels {other[0]} ({other[1]!r}) and {value} ({name!r}) have the same name: an adapter is saved and "
                "found by its label's name, so one would overwrite or replace the other's. Give each label its own name."
            )
        seen[key] = (value, name)


def intensity_warning(adapter: dict, label: str, target: dict) -> str | None:
    """A warning when the volume (``target``: :func:`oflsam2.volume.intensity_summary`) does not
    look like the ones the adapter was trained on (CT vs MR), else None."""
    trained = adapter.get("intensity")
    if not isinstance(trained, dict) or trained.get("modality") in (None, target["modality"]):
        return None
    return (
        f"The adapter for {label} was trained on {trained.get('modality')}-like intensities "
        f"({_number(trained.get('low'))}..{_number(trained.get('high'))}), but this volume looks like "
        f"{target['modality']} ({target['low']:.0f}..{target['high']:.0f}); its masks may be poor."
    )


def _number(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"
