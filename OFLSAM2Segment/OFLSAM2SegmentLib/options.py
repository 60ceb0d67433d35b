"""Run options as the Slicer logic receives them (``process(..., **options)``) -> engine objects.

Option names are the fields of :class:`oflsam2.settings.ModelSettings` and
:class:`oflsam2.settings.MethodOptions`, plus ``axis``, ``preset`` and ``ofl_preset`` (``paper``
or ``extended``: what the method options start from); each may be written in snake_case
(``image_size``) or Slicer's camelCase (``imageSize``). No slicer, qt or torch here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from oflsam2.errors import InputError
from oflsam2.settings import METHOD_TITLES, METHODS, OFL_PRESETS, MethodOptions, ModelSettings, default_model

AXES = ("auto", "axial", "coronal", "sagittal")
LOCAL_MODEL = "local"  # the model selector's "Local file..." entry: identify the file by its hash
METHOD_DEFAULT_MODEL = ""  # the model selector's "Method's default" entry: the method's paper's model

_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelSettings)}
_METHOD_FIELDS = {f.name: f for f in dataclasses.fields(MethodOptions)}
_RUN_FIELDS = ("axis", "preset", "ofl_preset")


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

    ``model`` empty or None (the selector's "Method's default") means the method's model
    (:func:`oflsam2.settings.default_model`), or, when ``adapter`` names an adapter folder, the
    model its adapters were trained with, as in the CLI. ``image_size`` 0 or None means the
    adapter's size, else the model's own training size (from the manifest). ``model="local"``
    takes the model from the SHA256 of ``checkpoint`` (an official file).
    """
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    model_values, method_values, run_values = {}, {}, {"axis": "auto", "preset": "auto", "ofl_preset": OFL_PRESETS[0]}
    given: dict[str, str] = {}
    for key, value in options.items():
        name = snake_case(key)
        if name in given:
            raise InputError(f"Option {key!r} was given twice (also as {given[name]!r}); give it once.")
        given[name] = key
        if name in _MODEL_FIELDS:
            model_values[name] = value
        elif name in _METHOD_FIELDS:
            method_values[name] = value
        elif name in _RUN_FIELDS:
            run_values[name] = str(value)
        else:
            raise InputError(f"Unknown option {key!r}. Known options: {', '.join(option_names())}.")
    if run_values["ofl_preset"] not in OFL_PRESETS:
        raise InputError(f"Unknown OFL-SAM2 preset {run_values['ofl_preset']!r}; choose one of: {', '.join(OFL_PRESETS)}.")
    base = MethodOptions.preset(run_values["ofl_preset"])  # empty values fall back to its values
    method_values = {name: _coerce(name, value, _METHOD_FIELDS[name], getattr(base, name)) for name, value in method_values.items()}
    method_options = MethodOptions.preset(run_values["ofl_preset"], **method_values)  # checks itself, as in the CLI
    settings = _model_settings(model_values, method, method_options.adapter)
    axis = run_values["axis"].lower()
    if axis not in AXES:
        raise InputError(f"Unknown slice axis {run_values['axis']!r}; choose one of: {', '.join(AXES)}.")
    preset = run_values["preset"]
    from oflsam2.volume import check_preset

    check_preset(preset)
    return RunConfig(settings, method_options, method, axis, preset)


ADAPTER_FIELDS = ("label", "model", "image_size", "preset", "axis")  # what a run with an adapter reads


def read_adapters(path) -> list[dict]:
    """Metadata of the labels saved in an adapter folder (only the JSON files are read); each
    must hold the fields of :data:`ADAPTER_FIELDS`."""
    from oflsam2.ofl.adapter_metadata import list_adapters

    if path and os.path.isfile(path):
        raise InputError(f"{path} is a file; give the adapter folder that holds it ({os.path.dirname(path) or '.'}), "
                         "the folder written by 'Save adapter'.")
    if not path or not os.path.isdir(path):
        raise InputError(f"The adapter folder {path} does not exist; give the folder written by 'Save adapter'.")
    adapters = list_adapters(path)
    if not adapters:
        raise InputError(f"{path} holds no OFL-SAM2 adapter; give the folder written by 'Save adapter'.")
    for adapter in adapters:
        missing = [f for f in ADAPTER_FIELDS if f not in adapter]
        if missing:
            raise InputError(
                f"The adapter file {adapter['path']} lacks the field(s) {', '.join(missing)}: it was not written by "
                "OFLSAM2's 'Save adapter' or was edited. Train and save the adapter again."
            )
    return adapters


def check_outputs(config: RunConfig, target_names: list[str]) -> None:
    """What a run would only find out late, checked before any model work, with the engine's
    (and so the CLI's) checks where it has them: an adapter is used by OFL-SAM2 only, fits the
    run's model and image size, and holds a label for every target (one is loaded per target
    name); the folder to save a trained adapter into can be created and written; a local
    checkpoint (unless random weights are asked for) is a file."""
    from oflsam2.batch import check_adapter_fits
    from oflsam2.pipeline import check_folder_writable

    settings = config.settings
    if settings.checkpoint and not settings.random_weights and not os.path.isfile(settings.checkpoint):
        raise InputError(  # the engine's words (checkpoints.resolve_checkpoint), before the worker starts
            f"The checkpoint file {settings.checkpoint} does not exist or is not a file. Fix the path, or leave the "
            f"checkpoint empty to use the cached download of {settings.model!r}."
        )
    options = config.options
    for name, value in (("An adapter", options.adapter), ("Saving an adapter", options.save_adapter)):
        if value and config.method != "ofl":
            raise InputError(f"{name} is for OFL-SAM2 only; method {config.method!r} cannot use one. Choose method 'ofl'.")
    if options.adapter and not os.path.isfile(str(options.adapter)):
        read_adapters(str(options.adapter))  # the folder exists, holds adapters, each with its fields
        check_adapter_fits(str(options.adapter), config.settings, options)
        _check_adapter_labels(str(options.adapter), target_names)
    if options.save_adapter:
        check_folder_writable(Path(options.save_adapter), "The folder to save the adapter in,")


def _check_adapter_labels(path: str, target_names: list[str]) -> None:
    """Each segment uses the adapter of its name (:mod:`oflsam2.adapter_labels`; segment label
    values are only the selection's order, so never by value)."""
    from oflsam2.adapter_labels import check_distinct_names, describe, find_adapter
    from oflsam2.errors import AdapterError

    adapters = read_adapters(path)
    check_distinct_names(enumerate(target_names, start=1))
    for name in target_names:
        try:
            found = find_adapter(adapters, None, name, path)
        except AdapterError as error:  # the module reports every option problem as an InputError
            raise InputError(str(error)) from None
        if found is None:
            raise InputError(f"No adapter for label {name!r} in {path} (it holds: {describe(adapters)}). Name the "
                             "segment like the adapter's label, or train one for this label first.")


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


def default_model_entry(method: str) -> tuple[str, str]:
    """Text and tooltip of the model selector's "Method's default" entry while ``method`` is chosen."""
    model = default_model(method)
    return (f"Method's default ({model})",
            f"{METHOD_TITLES.get(method, method)} runs {model} unless you choose another model (with an adapter: "
            "the model the adapter was trained with).")


def _model_settings(values: dict, method: str, adapter) -> ModelSettings:
    """ModelSettings from the model options; ModelSettings checks the device and image size itself."""
    from oflsam2.checkpoints import model_entry
    from oflsam2.cli.engine_options import adapter_settings

    checkpoint = values.get("checkpoint") or None
    values["checkpoint"] = str(checkpoint) if checkpoint else None
    trained = adapter_settings(adapter)  # empty without an adapter folder
    model = str(values.get("model") or trained.get("model") or default_model(method))
    if model == LOCAL_MODEL:
        model = _identify_local(values["checkpoint"])
    entry = model_entry(model)
    values["model"] = model
    if not values.get("image_size"):
        values["image_size"] = int(trained.get("image_size") or entry.get("image_size") or ModelSettings.image_size)
    for name in list(values):
        if name != "checkpoint":
            values[name] = _coerce(name, values[name], _MODEL_FIELDS[name])
    return ModelSettings(**values)


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


def _coerce(name: str, value, field: dataclasses.Field, default=dataclasses.MISSING):
    """Convert GUI/console values ("40", 40.0, Path) to the field's type; '' or None -> ``default``
    (the field's own unless given)."""
    if default is dataclasses.MISSING:
        default = field.default if field.default is not dataclasses.MISSING else None
    if value is None or (isinstance(value, str) and value == ""):
        return default
    if default is not None:
        kind = type(default)
    else:  # an optional field ("int | None"): its declared type, not str
        declared = str(field.type)
        kind = int if declared.startswith("int") else float if declared.startswith("float") else str
    try:
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # True is not a number of epochs
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
