"""The experiment file: its format and :func:`load_config`, whose errors name the key and file.

Paths are relative to ``data_root``; ``data_root`` is relative to the config file; the
``--data-root`` option, relative to the working folder, replaces it::

    name: chaos_revsam2               # default: the file name
    data_root: /data/CHAOS_T2
    cases:                            # a template ...
      ids: [1, 2, 3, 5]
      image: image_{id}.nii.gz
      label: label_{id}.nii.gz
    # ... or a list:  cases: [{id: a, image: a.nii.gz, label: a_seg.nii.gz}, ...]
    labels: {1: liver, 2: right kidney}
    axis: 0                           # array axis to slice along (0 = z)
    preset: mr                        # intensity preset, applied to each whole volume
    support:
      mode: slices                    # slices: N planes per label; volumes: every plane
      volumes: 3                      # support volumes drawn per group, or a list of case ids
      slices_per_label: 10            # slices mode: planes per label, split over the volumes
      pool: [1, 2, 3]                 # cases support volumes are drawn from (default: all)
      groups: 3                       # random groups (draws)
      seed: 0
    queries: [5]                      # default: every case that is not a support volume
    methods:
      - method: revsam2               # ofl | revsam2 | forward | sam2
        name: revsam2-k5              # default: the method
        options: {top_k: 5}           # MethodOptions fields
      - method: ofl
        name: ofl-extended
        options: {ofl_preset: extended}   # paper (default) | extended, then the fields given
      - method: sam2                  # needs annotated planes in the query itself:
        annotate_query: 1             # per label, N planes of the query's own reference
    model: {model: sam2.1-tiny, image_size: 1024}   # ModelSettings fields (default: sam2.1-base-plus)
    evaluation: {nsd_tolerance_mm: 1.0, both_empty: one}
    report: {montage: true, montage_slices: 12}

``annotate_query: N`` gives the method, besides the support volumes, N planes per label of the
query's own reference (evenly spaced over the planes holding the label, the middle one for
N = 1; the middle plane of the volume, empty, when the query lacks the label), as a user would
annotate them. Plain SAM2 propagation (``sam2``) cannot run without them. Those planes are
copied into the output unchanged and are scored with the rest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..metrics import BOTH_EMPTY_CHOICES
from ..settings import METHODS, OFL_PRESETS, MethodOptions, ModelSettings

SUPPORT_MODES = ("slices", "volumes")

_TOP_KEYS = ("name", "data_root", "cases", "labels", "axis", "preset", "support", "queries", "methods", "model", "evaluation", "report")
_SUPPORT_KEYS = ("mode", "volumes", "slices_per_label", "pool", "groups", "seed")


@dataclass
class Case:
    id: str
    image: Path
    label: Path


@dataclass
class MethodRun:
    """One column of the results: an engine method with its options under a unique name."""

    name: str
    method: str
    options: MethodOptions
    annotate_query: int = 0  # planes per label of the query's own reference given as annotation


@dataclass
class SupportProtocol:
    mode: str
    volumes: int | list[str]
    slices_per_label: int | None
    pool: list[str]
    groups: int
    seed: int


@dataclass
class ExperimentConfig:
    name: str
    path: Path
    cases: dict[str, Case]
    labels: dict[int, str]
    support: SupportProtocol
    queries: list[str] | None
    methods: list[MethodRun]
    model: ModelSettings
    axis: int = 0
    preset: str = "auto"
    nsd_tolerance_mm: float = 1.0
    both_empty: str = "one"
    montage: bool = True
    montage_slices: int = 12



def load_config(path, *, data_root=None, random_weights: bool | None = None, device: str | None = None) -> ExperimentConfig:
    """Read and check an experiment file; raises :class:`InputError` naming the key and file.

    ``data_root`` (relative to the working folder) replaces the file's own; ``random_weights``
    and ``device`` override the ``model`` section when given.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the experiment's YAML file.")
    if not path.is_file():
        raise InputError(f"The experiment file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {error}") from None
    where = _Where(path)
    where.keys(raw, "the top level", _TOP_KEYS, required=("cases", "labels", "support", "methods"))
    root = _data_root(raw.get("data_root"), data_root, where)
    cases = _parse_cases(raw["cases"], root, where)
    support = _parse_support(raw["support"], cases, where)
    queries = None if raw.get("queries") is None else where.case_ids(raw["queries"], "queries", cases)
    _check_disjoint(support, queries, where)
    model = _dataclass_from(ModelSettings, raw.get("model") or {}, "model", where)
    if random_weights is not None:
        model.random_weights = random_weights
    if device is not None:
        model.device = device
    evaluation = raw.get("evaluation") or {}
    where.keys(evaluation, "evaluation", ("nsd_tolerance_mm", "both_empty"))
    report = raw.get("report") or {}
    where.keys(report, "report", ("montage", "montage_slices"))
    config = ExperimentConfig(
        name=str(raw.get("name") or path.name.split(".")[0]),
        path=path.resolve(),
        cases=cases,
        labels=_parse_labels(raw["labels"], where),
        support=support,
        queries=queries,
        methods=_parse_methods(raw["methods"], where),
        model=model,
        axis=where.integer(raw.get("axis", 0), "axis", 0, 2),
        preset=_parse_preset(raw.get("preset", "auto"), where),
        nsd_tolerance_mm=where.number(evaluation.get("nsd_tolerance_mm", 1.0), "evaluation.nsd_tolerance_mm"),
        both_empty=where.choice(evaluation.get("both_empty", "one"), "evaluation.both_empty", BOTH_EMPTY_CHOICES),
        montage=where.boolean(report.get("montage", True), "report.montage"),
        montage_slices=where.integer(report.get("montage_slices", 12), "report.montage_slices", 1),
    )
    if not re.fullmatch(r"[\w.-]+", config.name):
        raise InputError(f"{path}: `name` {config.name!r} must be a plain file name (letters, digits, _ . -).")
    return config


class _Where:
    """Checks of config values whose errors name the key and the file."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> InputError:
        return InputError(f"{self.path}: `{key}` {message}")

    def keys(self, mapping, key: str, allowed, required=()) -> None:
        if not isinstance(mapping, dict):
            raise self.fail(key, f"must be a mapping of keys to values; got {type(mapping).__name__}.")
        unknown = sorted(str(k) for k in mapping if k not in allowed)
        if unknown:
            raise self.fail(key, f"has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}.")
        missing = [k for k in required if mapping.get(k) is None]
        if missing:
            raise self.fail(key, f"lacks the required key(s) {', '.join(missing)}.")

    def integer(self, value, key: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be a whole number; got {value!r}.")
        if high is not None and not low <= value <= high:
            raise self.fail(key, f"must lie in {low}..{high}; got {value}.")
        if low is not None and value < low:
            raise self.fail(key, f"must be at least {low}; got {value}.")
        return value

    def number(self, value, key: str) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise self.fail(key, f"must be a number >= 0; got {value!r}.")
        return number

    def boolean(self, value, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false; got {value!r}.")
        return value

    def choice(self, value, key: str, choices) -> str:
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}; got {value!r}.")
        return value

    def case_ids(self, value, key: str, cases) -> list[str]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list of case ids; got {value!r}.")
        ids = [str(v) for v in value]
        unknown = [i for i in ids if i not in cases]
        if unknown:
            raise self.fail(key, f"names unknown case(s) {', '.join(unknown)}; the cases are {', '.join(cases)}.")
        if len(set(ids)) != len(ids):
            raise self.fail(key, "lists a case twice.")
        return ids


def _data_root(from_file, from_command_line, where: _Where) -> Path:
    if from_command_line is not None:
        root, origin = Path(os.path.expandvars(str(from_command_line))).expanduser(), "--data-root"
    elif from_file is not None:
        root = Path(os.path.expandvars(str(from_file))).expanduser()
        root, origin = (root if root.is_absolute() else where.path.parent / root), f"`data_root` in {where.path}"
    else:
        return where.path.parent
    if not root.is_dir():
        hint = " Set the environment variable it names, or" if "$" in str(root) else ""
        raise InputError(f"The data folder {root} (from {origin}) does not exist.{hint} Pass --data-root DIR.")
    return root


def _parse_cases(raw, root: Path, where: _Where) -> dict[str, Case]:
    if isinstance(raw, dict):
        where.keys(raw, "cases", ("ids", "image", "label"), required=("ids", "image", "label"))
        if not isinstance(raw["ids"], list) or not raw["ids"]:
            raise where.fail("cases.ids", "must be a non-empty list.")
        for key in ("image", "label"):
            if "{id}" not in str(raw[key]):
                raise where.fail(f"cases.{key}", f"must contain {{id}}; got {raw[key]!r}.")
        entries = [
            {"id": i, "image": str(raw["image"]).replace("{id}", str(i)), "label": str(raw["label"]).replace("{id}", str(i))}
            for i in raw["ids"]
        ]
    elif isinstance(raw, list) and raw:
        entries = raw
        for n, entry in enumerate(entries):
            where.keys(entry, f"cases[{n}]", ("id", "image", "label"), required=("id", "image", "label"))
    else:
        raise where.fail("cases", "must be a list of {id, image, label} or a mapping {ids, image, label}.")
    cases: dict[str, Case] = {}
    missing = []
    for entry in entries:
        case_id = str(entry["id"])
        if case_id in cases:
            raise where.fail("cases", f"lists the case {case_id!r} twice.")
        files = [root / Path(os.path.expandvars(str(entry[k]))).expanduser() for k in ("image", "label")]
        missing += [str(f) for f in files if not f.is_file()]
        cases[case_id] = Case(case_id, *files)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise where.fail("cases", f"names file(s) that do not exist: {shown} (data folder {root}).")
    return cases


def _parse_labels(raw, where: _Where) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise where.fail("labels", "must map label values to names, e.g. {1: liver, 2: spleen}.")
    labels = {}
    for value, name in raw.items():
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number <= 0 or str(number) != str(value).strip():
            raise where.fail("labels", f"keys must be positive whole numbers; got {value!r}.")
        if not isinstance(name, str) or not name.strip():
            raise where.fail(f"labels.{number}", f"must be a name; got {name!r}.")
        labels[number] = name.strip()
    return labels


def _parse_support(raw, cases: dict[str, Case], where: _Where) -> SupportProtocol:
    where.keys(raw, "support", _SUPPORT_KEYS, required=("mode", "volumes"))
    mode = where.choice(raw["mode"], "support.mode", SUPPORT_MODES)
    pool = list(cases) if raw.get("pool") is None else where.case_ids(raw["pool"], "support.pool", cases)
    volumes = raw["volumes"]
    if isinstance(volumes, list):
        volumes = where.case_ids(volumes, "support.volumes", cases)
    else:
        volumes = where.integer(volumes, "support.volumes", 1, len(pool))
    slices = raw.get("slices_per_label")
    if mode == "slices":
        if slices is None:
            raise where.fail("support.slices_per_label", "is required when support.mode is slices.")
        slices = where.integer(slices, "support.slices_per_label", 1)
    elif slices is not None:
        raise where.fail("support.slices_per_label", "only applies to support.mode slices (volumes mode uses every plane).")
    return SupportProtocol(
        mode=mode,
        volumes=volumes,
        slices_per_label=slices,
        pool=pool,
        groups=where.integer(raw.get("groups", 1), "support.groups", 1),
        seed=where.integer(raw.get("seed", 0), "support.seed", 0),
    )


def _check_disjoint(support: SupportProtocol, queries, where: _Where) -> None:
    candidates = support.volumes if isinstance(support.volumes, list) else support.pool
    shared = sorted(set(candidates) & set(queries or ()))
    if shared:
        key = "support.volumes" if isinstance(support.volumes, list) else "support.pool"
        raise where.fail("queries", f"shares case(s) {', '.join(shared)} with `{key}`: a query must never be support.")


def _parse_methods(raw, where: _Where) -> list[MethodRun]:
    if not isinstance(raw, list) or not raw:
        raise where.fail("methods", "must be a non-empty list of {method, name, options}.")
    runs = []
    for n, entry in enumerate(raw):
        key = f"methods[{n}]"
        where.keys(entry, key, ("method", "name", "options", "annotate_query"), required=("method",))
        method = where.choice(entry["method"], f"{key}.method", METHODS)
        name = str(entry.get("name") or method)
        if not re.fullmatch(r"[\w.+-]+", name):
            raise where.fail(f"{key}.name", f"must be a plain folder name (letters, digits, _ . + -); got {name!r}.")
        values = entry.get("options") or {}
        where.keys(values, f"{key}.options", tuple(f.name for f in dataclasses.fields(MethodOptions)) + ("ofl_preset",))
        values = dict(values)
        preset = where.choice(values.pop("ofl_preset", "paper"), f"{key}.options.ofl_preset", OFL_PRESETS)
        options = _dataclass_from(MethodOptions, values, f"{key}.options", where, MethodOptions.preset(preset))
        annotate = where.integer(entry.get("annotate_query", 0), f"{key}.annotate_query", 0)
        runs.append(MethodRun(name, method, options, annotate))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise where.fail("methods", f"gives two runs the same name ({', '.join(names)}); set `name` to tell them apart.")
    return runs


def _dataclass_from(cls, values, key: str, where: _Where, base=None):
    """``base`` (default ``cls()``) with ``values`` after checking every name and value type
    against its values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where.keys(values, key, tuple(fields))
    defaults = cls() if base is None else base
    checked = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        checked[name] = _typed(value, default, f"{key}.{name}", where)
    return dataclasses.replace(defaults, **checked)


def _typed(value, default, key: str, where: _Where):
    """``value`` converted to the type of ``default`` (YAML reads ``1e-3`` as text)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        return where.boolean(value, key)
    if isinstance(default, int):
        return where.integer(value, key)
    if isinstance(default, float):
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise where.fail(key, f"must be a number; got {value!r}.")
    if isinstance(default, tuple):
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise where.fail(key, f"must be a list of whole numbers; got {value!r}.")
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise where.fail(key, f"must be text; got {value!r}.")
    return value


def _parse_preset(value, where: _Where) -> str:
    from ..volume import check_preset

    try:
        check_preset(str(value))
    except InputError as error:
        raise where.fail("preset", str(error)) from None
    return str(value)
