"""Run options as the Slicer logic receives them (``process(..., **options)``) -> engine objects.

Option names are the fields of :class:`oflsam2.api.ModelSettings` and
:class:`oflsam2.api.MethodOptions`, plus ``axis`` and ``preset``; each may be written in
snake_case (``image_size``) or Slicer's camelCase (``imageSize``). No slicer, qt or torch here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from oflsam2.api import METHODS, MethodOptions, ModelSettings
from oflsam2.errors import InputError

DEVICES = ("auto", "cuda", "mps", "cpu")
AXES = ("auto", "axial", "coronal", "sagittal")
LOCAL_MODEL = "local"  # the model selector's "Local file..." entry: identify the file by its hash
MIN_IMAGE_SIZE = 256

_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelSettings)}
_METHOD_FIELDS = {f.name: f for f in dataclasses.fields(MethodOptions)}
_RUN_FIELDS = ("axis", "preset")


@dataclass
class RunConfig:
    """Everything a run needs besides the nodes."""

    settings: ModelSettings
    options: MethodOptions
    method: str = "ofl"
    axis: str = "auto"  # auto | axial | coronal | sagittal (resolved against the volume later)
    preset: str = "auto"


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def option_names() -> list[str]:
    return sorted(set(_MODEL_FIELDS) | set(_METHOD_FIELDS) | set(_RUN_FIELDS))


def parse_options(method: str, options: dict) -> RunConfig:
    """Validate ``options`` and split them into model settings, method options, axis and preset.

    ``image_size`` 0 or None means the selected model's own training size (from the manifest).
    ``model="local"`` takes the model from the SHA256 of ``checkpoint`` (an official file).
    """
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    model_values, method_values, run_values = {}, {}, {"axis": "auto", "preset": "auto"}
    for key, value in options.items():
        name = snake_case(key)
        if name in _MODEL_FIELDS:
            model_values[name] = value
        elif name in _METHOD_FIELDS:
            method_values[name] = _coerce(name, value, _METHOD_FIELDS[name])
        elif name in _RUN_FIELDS:
            run_values[name] = str(value)
        else:
            raise InputError(f"Unknown option {key!r}. Known options: {', '.join(option_names())}.")
    settings = _model_settings(model_values)
    method_options = MethodOptions(**method_values)
    _check_method_options(method_options)
    axis = run_values["axis"].lower()
    if axis not in AXES:
        raise InputError(f"Unknown slice axis {run_values['axis']!r}; choose one of: {', '.join(AXES)}.")
    preset = run_values["preset"]
    from oflsam2.volume import check_preset

    check_preset(preset)
    return RunConfig(settings, method_options, method, axis, preset)


def needs_download(settings: ModelSettings) -> bool:
    """True when the run would need a checkpoint that is not on this computer yet."""
    from oflsam2.checkpoints import ENV_CHECKPOINT, cached_path

    if settings.random_weights or settings.checkpoint or os.environ.get(ENV_CHECKPOINT):
        return False
    return not cached_path(settings.model).is_file()


def model_choices() -> list[tuple[str, str]]:
    """(name, description) of every model in the manifest, for the model selector."""
    from oflsam2.checkpoints import load_manifest

    return [(name, entry.get("description", "")) for name, entry in load_manifest().items()]


def _model_settings(values: dict) -> ModelSettings:
    from oflsam2.checkpoints import model_entry

    checkpoint = values.get("checkpoint") or None
    values["checkpoint"] = str(checkpoint) if checkpoint else None
    model = str(values.get("model") or ModelSettings.model)
    if model == LOCAL_MODEL:
        model = _identify_local(values["checkpoint"])
    entry = model_entry(model)
    values["model"] = model
    if not values.get("image_size"):
        values["image_size"] = int(entry.get("image_size") or ModelSettings.image_size)
    for name in list(values):
        if name != "checkpoint":
            values[name] = _coerce(name, values[name], _MODEL_FIELDS[name])
    settings = ModelSettings(**values)
    if settings.device not in DEVICES:
        raise InputError(f"Unknown device {settings.device!r}; choose one of: {', '.join(DEVICES)}.")
    if settings.image_size < MIN_IMAGE_SIZE or settings.image_size % 32:
        raise InputError(
            f"Image size {settings.image_size} is not supported: use a multiple of 32, at least {MIN_IMAGE_SIZE} "
            "(1024 is SAM2's training size; 512 halves memory and time)."
        )
    return settings


def _identify_local(checkpoint: str | None) -> str:
    from oflsam2.checkpoints import identify, sha256_file

    if not checkpoint:
        raise InputError("'Local file' needs the path of a checkpoint file: fill in the local checkpoint field.")
    if not os.path.isfile(checkpoint):
        raise InputError(f"The local checkpoint {checkpoint} does not exist or is not a file.")
    model = identify(sha256_file(checkpoint))
    if model is None:
        raise InputError(
            f"{checkpoint} is not one of the official checkpoints, so its architecture is unknown. "
            "Choose the model it was trained from in the model list and keep the path in the local checkpoint field."
        )
    return model


def _check_method_options(options: MethodOptions) -> None:
    problems = []
    if not 0.0 <= options.gamma <= 1.0:
        problems.append(f"gamma (confidence gate) must lie in 0..1, got {options.gamma}")
    if options.num_retrieved < 1:
        problems.append(f"num_retrieved (K) must be at least 1, got {options.num_retrieved}")
    if options.epochs < 0:
        problems.append(f"epochs must be 0 or more, got {options.epochs}")
    if options.top_k < 1:
        problems.append(f"top_k must be at least 1, got {options.top_k}")
    if problems:
        raise InputError("Invalid option(s): " + "; ".join(problems) + ".")


def _coerce(name: str, value, field: dataclasses.Field):
    """Convert GUI/console values ("40", 40.0, Path) to the field's type; '' or None -> default."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if value is None or value == "":
        return default
    kind = type(default) if default is not None else str
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        if kind is float:
            return float(value)
        if kind is tuple:
            items = value.replace(",", " ").split() if isinstance(value, str) else value
            return tuple(int(v) for v in items)
        return str(value)
    except (TypeError, ValueError):
        raise InputError(f"Option {name!r} must be of type {kind.__name__}; got {value!r}.") from None
