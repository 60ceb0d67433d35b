"""Few-shot experiments from a YAML file: ``oflsam2 experiment CONFIG``.

For every support group x query case x method the engine segments the query from support
volumes (cross-volume protocol: nothing is annotated in the query, unless a method run sets
``annotate_query``), the result is scored per label, and the prediction, a metrics CSV and a montage are written; at the end a table gives
mean ± std over groups (per method and label, and the mean over labels). A case whose metrics
file exists is skipped, so an interrupted run resumes where it stopped.

Config (paths relative to ``data_root``; ``data_root`` relative to the config file; the
``--data-root`` option, relative to the working folder, replaces it)::

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
      - method: sam2                  # needs annotated planes in the query itself:
        annotate_query: 1             # per label, N planes of the query's own reference
    model: {model: sam2.1-tiny, image_size: 1024}   # ModelSettings fields
    evaluation: {nsd_tolerance_mm: 1.0, both_empty: one}
    report: {montage: true, montage_slices: 12}

Support draws (group ``g`` uses ``numpy.random.default_rng([seed, g])``): ``volumes`` cases
from ``pool``; in slices mode, per label, ``slices_per_label`` planes holding that label,
split as evenly as possible over the support volumes that contain it, drawn at random within
each volume. Every plane handed to the engine as a :class:`~oflsam2.api.Reference` is support,
so each support volume becomes a Reference stacking only its drawn planes (one engine call per
label, since labels draw different planes); in volumes mode whole volumes are passed and all
labels share one call. Volumes are intensity-normalised whole (the preset's percentiles are
those of the full volume, never of a few drawn planes) and handed to the engine as ``[0, 1]``.

Output folder::

    run.json                          the draw and settings (a re-run must match them)
    group_<g>/<method>/<case>/        prediction.nii.gz, metrics.csv, montage.png, info.json
    group_<g>/supports/<case>.png     drawn support planes (slices mode)
    cases.csv  results.csv  results.md  dice_boxplot.png

``annotate_query: N`` gives the method, besides the support volumes, N planes per label of the
query's own reference (evenly spaced over the planes holding the label, the middle one for
N = 1; the middle plane of the volume, empty, when the query lacks the label), as a user would
annotate them. Plain SAM2 propagation (``sam2``) cannot run without them. Those planes are
copied into the output unchanged and are scored with the rest.

Metrics come from each label's own binary result; the prediction file holds them composed
into one label map (where two labels overlap the later one in ``labels`` wins).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .api import METHODS, LabelSupport, MethodOptions, ModelSettings, Reference
from .errors import InputError
from .evaluation import (
    SUMMARY_METRICS,
    check_same_grid,
    mean_std,
    natural_key,
    read_csv,
    read_label_map,
    summarize,
    summary_markdown,
    write_csv,
)
from .metrics import BOTH_EMPTY_CHOICES, METRIC_LIBRARIES, METRIC_NAMES, case_metrics
from .pipeline import refuse_inputs_as_output

SUPPORT_MODES = ("slices", "volumes")
# The engine gets volumes already normalised to [0, 1]; this preset passes them unchanged.
NORMALISED_PRESET = "window:0,1"
METRICS_FILE = "metrics.csv"
PREDICTION_FILE = "prediction.nii.gz"
CASE_COLUMNS = ("group", "method", "case", "label", "name", *METRIC_NAMES, "pred_empty", "ref_empty", "tp", "pred_voxels", "ref_voxels", "seconds")
RESULT_KEYS = ("method", "label", "name", "groups", "cases")
# Model settings that change speed or memory but not results: a resumed run may differ in them.
_RUNTIME_SETTINGS = ("device", "cache_megabytes", "encode_batch_size")

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


@dataclass
class ExperimentOutcome:
    rows: list[dict]  # every per-case row (CASE_COLUMNS)
    results: list[dict]  # mean ± std over groups (RESULT_KEYS + <metric>_mean/_std)
    computed: int  # cases run now
    skipped: int  # cases found finished
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Config


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
        entries = [{"id": i, "image": str(raw["image"]).replace("{id}", str(i)), "label": str(raw["label"]).replace("{id}", str(i))} for i in raw["ids"]]
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
        options = _dataclass_from(MethodOptions, entry.get("options") or {}, f"{key}.options", where)
        annotate = where.integer(entry.get("annotate_query", 0), f"{key}.annotate_query", 0)
        runs.append(MethodRun(name, method, options, annotate))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise where.fail("methods", f"gives two runs the same name ({', '.join(names)}); set `name` to tell them apart.")
    return runs


def _dataclass_from(cls, values, key: str, where: _Where):
    """``cls(**values)`` after checking every name and value type against ``cls``'s defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where.keys(values, key, tuple(fields))
    defaults = cls()
    checked = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        checked[name] = _typed(value, default, f"{key}.{name}", where)
    return cls(**checked)


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
    from .volume import check_preset

    try:
        check_preset(str(value))
    except InputError as error:
        raise where.fail("preset", str(error)) from None
    return str(value)


# ---------------------------------------------------------------------------------------------
# Data and support draws


@dataclass
class CaseInfo:
    shape: tuple[int, int, int]
    planes: dict[int, list[int]]  # label -> planes (along the run's axis) holding it


def scan_cases(config: ExperimentConfig) -> dict[str, CaseInfo]:
    """Check every case (readable, image and labels on one grid) and list its labelled planes.

    Raises :class:`InputError` when a configured label is found in no case.
    """
    infos = {}
    for case in config.cases.values():
        labels, label_image = read_label_map(case.label)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise InputError(f"Cannot read the image {case.image} of case {case.id}: {str(error).strip().splitlines()[-1]}") from None
        check_same_grid(label_image, reader, case.label, case.image, roles=("label map", "image"))
        other = tuple(a for a in range(3) if a != config.axis)
        planes = {value: np.flatnonzero((labels == value).any(axis=other)).tolist() for value in config.labels}
        infos[case.id] = CaseInfo(labels.shape, planes)
    for value, name in config.labels.items():
        if not any(info.planes[value] for info in infos.values()):
            raise InputError(f"{config.path}: label {value} ({name}) from `labels` is found in no label file of `cases`.")
    return infos


def draw_groups(config: ExperimentConfig, infos: dict[str, CaseInfo]) -> list[dict]:
    """The support volumes, query cases and (slices mode) drawn planes of every group.

    Returns JSON-ready dicts: ``{"group", "support": [ids], "queries": [ids], "slices":
    {label (str): {case id: [planes]}}}``.
    """
    protocol = config.support
    groups = []
    for group in range(protocol.groups):
        rng = np.random.default_rng([protocol.seed, group])
        if isinstance(protocol.volumes, list):
            support = list(protocol.volumes)
        else:
            support = sorted(rng.choice(protocol.pool, size=protocol.volumes, replace=False).tolist(), key=natural_key)
        queries = config.queries or [c for c in config.cases if c not in support]
        if not queries:
            raise InputError(f"{config.path}: group {group} has no query case left: every case is a support volume.")
        slices = {}
        if protocol.mode == "slices":
            for value, name in config.labels.items():
                available = {c: infos[c].planes[value] for c in support if infos[c].planes[value]}
                slices[str(value)] = _draw_planes(rng, available, protocol.slices_per_label, f"label {value} ({name}), group {group}")
        groups.append({"group": group, "support": support, "queries": queries, "slices": slices})
    return groups


def _draw_planes(rng: np.random.Generator, available: dict[str, list[int]], count: int, what: str) -> dict[str, list[int]]:
    """``count`` planes split as evenly as possible over the volumes of ``available``."""
    total = sum(len(p) for p in available.values())
    if total < count:
        raise InputError(
            f"Cannot draw {count} support planes for {what}: the support volumes hold only {total} "
            f"({', '.join(f'{c}: {len(p)}' for c, p in available.items()) or 'none'}). Lower support.slices_per_label."
        )
    quota = dict.fromkeys(available, 0)
    order = list(rng.permutation(list(available)))
    while sum(quota.values()) < count:
        # Round-robin in a random order over volumes with planes left: even split, fair remainder.
        for case in order:
            if sum(quota.values()) < count and quota[case] < len(available[case]):
                quota[case] += 1
    return {case: sorted(rng.choice(available[case], size=n, replace=False).tolist()) for case, n in quota.items() if n}


@dataclass
class LoadedCase:
    image: np.ndarray  # float32 (z, y, x), normalised to [0, 1] with the config's preset
    labels: np.ndarray  # int (z, y, x)
    grid: sitk.Image  # the label map as read: origin, spacing, direction for writing outputs


class _CaseLoader:
    """Reads cases on demand and keeps the last few (a group's supports and the current query)."""

    def __init__(self, config: ExperimentConfig, keep: int):
        self.config = config
        self.load = functools.lru_cache(maxsize=keep)(self._load)

    def _load(self, case_id: str) -> LoadedCase:
        from .volume import apply_preset

        case = self.config.cases[case_id]
        labels, grid = read_label_map(case.label)
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image))).astype(np.float32)
        if image.ndim != 3:
            raise InputError(f"The image {case.image} of case {case_id} is not a 3-D scalar volume.")
        return LoadedCase(apply_preset(image, self.config.preset), labels, grid)


def support_references(config: ExperimentConfig, group: dict, loader: _CaseLoader) -> list[tuple[list[int], list[Reference]]]:
    """The engine calls of a group: ``(labels, references)`` pairs.

    Volumes mode: one call, every support volume whole. Slices mode: one call per label whose
    references stack only that label's drawn planes of each support volume.
    """
    if config.support.mode == "volumes":
        references = [Reference(loader.load(c).image, loader.load(c).labels, name=c) for c in group["support"]]
        return [(list(config.labels), references)]
    calls = []
    for value in config.labels:
        references = []
        for case, planes in group["slices"][str(value)].items():
            loaded = loader.load(case)
            references.append(
                Reference(
                    np.take(loaded.image, planes, axis=config.axis),
                    np.take(loaded.labels, planes, axis=config.axis),
                    name=f"{case}:{','.join(map(str, planes))}",
                )
            )
        calls.append(([value], references))
    return calls


# ---------------------------------------------------------------------------------------------
# Running


def default_engine_factory(config: ExperimentConfig) -> Callable[[ModelSettings], object]:
    """Builds the real :class:`~oflsam2.api.Engine`, caching every support stack of a group."""
    from .api import Engine

    return functools.partial(Engine, max_cached_volumes=cached_volumes(config))


def cached_volumes(config: ExperimentConfig) -> int:
    """Feature caches an engine keeps: every support stack of a group, plus the query."""
    volumes = len(config.support.volumes) if isinstance(config.support.volumes, list) else config.support.volumes
    return volumes * (len(config.labels) if config.support.mode == "slices" else 1) + 1


def run_experiment(
    config: ExperimentConfig,
    out_dir,
    *,
    engine_factory: Callable[[ModelSettings], object] | None = None,
    progress: bool = True,
    executor=None,
) -> ExperimentOutcome:
    """Run (or resume) every group x query x method of ``config`` into ``out_dir``.

    ``engine_factory(settings)`` returns an object with :meth:`Engine.segment`'s signature;
    it is called once, and only if some case is left to compute. ``executor`` (see
    :mod:`oflsam2.executors`; default: in this process) runs the cases left; the first case
    that fails stops the experiment.
    """
    from tqdm import tqdm

    from .events import Events
    from .executors import LocalExecutor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = draw_groups(config, scan_cases(config))
    _record_run(config, groups, out_dir / "run.json")
    factory = engine_factory or default_engine_factory(config)
    executor = executor or LocalExecutor(lambda: factory(config.model))
    loader = _CaseLoader(config, keep=len(groups[0]["support"]) + 1)
    total = sum(len(g["queries"]) for g in groups) * len(config.methods)
    found: dict[int, list[dict]] = {}  # position in the run order -> rows of a finished case
    tasks, positions, names = [], [], []
    for group in groups:
        group_dir = out_dir / f"group_{group['group']}"
        montages_due = config.montage and config.support.mode == "slices"
        for case in group["queries"]:
            for run in config.methods:
                folder = group_dir / run.name / case
                if (folder / METRICS_FILE).is_file():
                    found[len(positions) + len(found)] = read_csv(folder / METRICS_FILE)
                    continue
                if montages_due:
                    _support_montages(config, group, loader, group_dir / "supports")
                    montages_due = False
                positions.append(len(positions) + len(found))
                names.append(f"g{group['group']} {run.name} {case}")
                tasks.append(functools.partial(_case_task, config, group, case, run.name, folder))
    skipped = len(found)
    with tqdm(total=total, initial=skipped, desc=config.name, unit="case", disable=not progress, file=sys.stderr) as bar:

        def events_for(index: int):
            bar.set_description(f"{config.name} {names[index]}")
            return Events(on_progress=lambda stage, done, all_, message="": bar.set_postfix_str(f"{stage} {done}/{all_}"))

        def finished(outcome) -> None:
            if outcome.error:
                raise InputError(f"Case {names[outcome.index]} failed: {outcome.error}")
            found[positions[outcome.index]] = outcome.value
            bar.update()

        if tasks:
            executor.run(tasks, finished, events_for, catch_errors=False)
    rows = [row for position in sorted(found) for row in found[position]]
    return _finish(config, rows, out_dir, len(tasks), skipped)


_WORKER_LOADER: dict[str, _CaseLoader] = {}  # one per process: the last config's volumes


def _case_task(config: ExperimentConfig, group: dict, case: str, run_name: str, folder: Path, engine, events) -> list[dict]:
    """One query x method in a worker (this process or a Ray actor); returns its metric rows."""
    key = json.dumps([str(config.path), config.preset, config.axis, [[c.id, str(c.image), str(c.label)] for c in config.cases.values()]])
    if key not in _WORKER_LOADER:
        _WORKER_LOADER.clear()
        _WORKER_LOADER[key] = _CaseLoader(config, keep=len(group["support"]) + 1)
    loader = _WORKER_LOADER[key]
    run = next(r for r in config.methods if r.name == run_name)
    calls = support_references(config, group, loader)
    return _run_case(config, engine, run, group["group"], case, loader.load(case), calls, folder, events)


def _run_case(config, engine, run: MethodRun, group: int, case: str, query: LoadedCase, calls, folder: Path, events) -> list[dict]:
    """Segment one query with one method, write its files, return its metric rows."""
    from .outputs import write_label_volume

    started = time.perf_counter()
    masks, info, annotated = {}, [], {}
    for labels, references in calls:
        supports = [_query_support(query.labels, v, config.labels[v], config.axis, run.annotate_query) for v in labels]
        for support in supports:
            for plane in support.slices:
                annotated.setdefault(plane, []).append(str(support.label))
        result = engine.segment(
            query.image,
            supports,
            method=run.method,
            axis=config.axis,
            preset=NORMALISED_PRESET,
            options=run.options,
            references=references,
            events=events,
        )
        for value in labels:
            mask = result.masks.get(value)
            if mask is None or np.shape(mask) != query.image.shape:
                raise InputError(f"The engine returned no {query.image.shape} mask for label {value} of case {case}.")
            masks[value] = np.asarray(mask, dtype=bool)
        info.append(result.info)
    seconds = time.perf_counter() - started
    composed = np.zeros(query.labels.shape, dtype=np.uint16)
    for value in config.labels:
        composed[masks[value]] = value
    folder.mkdir(parents=True, exist_ok=True)
    write_label_volume(composed, query.grid, folder / PREDICTION_FILE)
    spacing = query.grid.GetSpacing()[::-1]
    rows = []
    for value, name in config.labels.items():
        metrics = case_metrics(
            masks[value], query.labels == value, spacing, nsd_tolerance_mm=config.nsd_tolerance_mm, both_empty=config.both_empty
        )
        rows.append({"group": group, "method": run.name, "case": case, "label": value, "name": name, **metrics, "seconds": seconds})
    if config.montage:
        from .report import write_case_montage

        reference = np.where(np.isin(query.labels, list(config.labels)), query.labels, 0)
        dice = np.nanmean([r["dice"] for r in rows])
        write_case_montage(
            folder / "montage.png",
            query.image,
            reference,
            composed,
            axis=config.axis,
            spacing=spacing,
            direction=query.grid.GetDirection(),
            marked_slices={plane: f"({','.join(labels)})" for plane, labels in annotated.items()},
            num_slices=config.montage_slices,
            title=f"{config.name} | group {group} | {run.name} | case {case} | mean Dice {dice:.3f}",
        )
    record = {"seconds": seconds, "annotated_planes": annotated, "engine": info}
    (folder / "info.json").write_text(json.dumps(record, indent=1, default=str))
    write_csv(rows, folder / METRICS_FILE, CASE_COLUMNS)  # last: its presence marks the case done
    return rows


def _query_support(labels: np.ndarray, value: int, name: str, axis: int, count: int) -> LabelSupport:
    """The query's support for one label: nothing, or ``count`` planes of its own reference."""
    mask = np.zeros(labels.shape, dtype=bool)
    if count == 0:
        return LabelSupport(value, name, mask, [])
    holding = np.flatnonzero((labels == value).any(axis=tuple(a for a in range(3) if a != axis)))
    if holding.size:
        n = min(count, holding.size)
        planes = sorted({int(holding[int((k + 0.5) * holding.size / n)]) for k in range(n)})
    else:  # an "object absent" annotation
        planes = [labels.shape[axis] // 2]
    index = [slice(None)] * 3
    index[axis] = planes
    mask[tuple(index)] = labels[tuple(index)] == value
    return LabelSupport(value, name, mask, planes)


def _support_montages(config, group: dict, loader: _CaseLoader, folder: Path) -> None:
    from .report import write_case_montage

    folder.mkdir(parents=True, exist_ok=True)
    for case in group["support"]:
        path = folder / f"{case}.png"
        marked: dict[int, list[str]] = {}
        for label, per_case in group["slices"].items():
            for plane in per_case.get(case, []):
                marked.setdefault(plane, []).append(label)
        if path.exists() or not marked:
            continue
        loaded = loader.load(case)
        reference = np.where(np.isin(loaded.labels, list(config.labels)), loaded.labels, 0)
        write_case_montage(
            path,
            loaded.image,
            reference,
            axis=config.axis,
            spacing=loaded.grid.GetSpacing()[::-1],
            direction=loaded.grid.GetDirection(),
            marked_slices={plane: f"({','.join(labels)})" for plane, labels in marked.items()},
            num_slices=0,
            title=f"{config.name} | group {group['group']} | support volume {case} | S plane (labels drawn there)",
        )


def _seeds(config: ExperimentConfig) -> dict:
    """Every seed of the run: support draws (group g uses [support, g]), each method run's seed
    and the per-label seeds OFL-SAM2 derives from it, and the random-weight SAM2's seed."""
    from .backend import RANDOM_WEIGHTS_SEED
    from .methods.ofl import label_seed

    protocol = config.support
    return {
        "support": protocol.seed,
        "support_groups": {str(g): [protocol.seed, g] for g in range(protocol.groups)},
        "methods": {
            r.name: {
                "seed": r.options.seed,
                "label_seeds": {str(v): label_seed(r.options.seed, v) for v in config.labels} if r.method == "ofl" else {},
            }
            for r in config.methods
        },
        "random_weights": RANDOM_WEIGHTS_SEED if config.model.random_weights else None,
    }


def _record_run(config: ExperimentConfig, groups: list[dict], path: Path) -> None:
    """Write the run's draw and settings, or check them against an earlier run's."""
    settings = {k: v for k, v in dataclasses.asdict(config.model).items() if k not in _RUNTIME_SETTINGS}
    record = json.loads(
        json.dumps(
            {
                "labels": {str(k): v for k, v in config.labels.items()},
                "axis": config.axis,
                "preset": config.preset,
                "model": settings,
                "evaluation": {"nsd_tolerance_mm": config.nsd_tolerance_mm, "both_empty": config.both_empty},
                "groups": groups,
                "methods": {
                    r.name: {"method": r.method, "options": dataclasses.asdict(r.options), "annotate_query": r.annotate_query}
                    for r in config.methods
                },
                "seeds": _seeds(config),
            }
        )
    )
    if path.is_file():
        earlier = json.loads(path.read_text())
        for key in ("labels", "axis", "preset", "model", "evaluation", "groups"):
            if earlier.get(key) != record[key]:
                raise InputError(
                    f"{path.parent} holds results made with a different `{key}` ({earlier.get(key)!r} then, "
                    f"{record[key]!r} now); choose another --out folder or delete it."
                )
        for name, method in record["methods"].items():
            if name in earlier.get("methods", {}) and earlier["methods"][name] != method:
                raise InputError(
                    f"{path.parent} holds results of method run {name!r} with other options; rename the run "
                    "(`name` in methods) or choose another --out folder."
                )
        record["methods"] = {**earlier.get("methods", {}), **record["methods"]}
    path.write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------------------------------------
# Tables


def summarize_groups(rows: list[dict], config: ExperimentConfig) -> list[dict]:
    """Mean ± std over groups of the per-group mean over query cases, per method and label.

    Each method ends with a ``label = "mean"`` row: per group the mean over labels, then mean ±
    std over groups. Columns: :data:`RESULT_KEYS`, ``<metric>_mean``, ``<metric>_std``.
    """
    results = []
    for run in config.methods:
        chosen = [r for r in rows if r["method"] == run.name]
        if not chosen:
            continue
        groups = sorted({r["group"] for r in chosen})
        per_group = [{e["label"]: e for e in summarize([r for r in chosen if r["group"] == g])} for g in groups]
        for label in [*config.labels, "mean"]:
            entries = [p[label] for p in per_group if label in p]
            counted = [r for r in chosen if label == "mean" or r["label"] == label]
            entry = {
                "method": run.name,
                "label": label,
                "name": config.labels.get(label, "mean over labels"),
                "groups": len(entries),
                "cases": len({(r["group"], r["case"]) for r in counted}),
            }
            for metric in SUMMARY_METRICS:
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std([e[f"{metric}_mean"] for e in entries])
            results.append(entry)
    return results


def _finish(config: ExperimentConfig, rows: list[dict], out_dir: Path, computed: int, skipped: int) -> ExperimentOutcome:
    from .report import write_dice_boxplot

    results = summarize_groups(rows, config)
    files = {
        "cases": write_csv(rows, out_dir / "cases.csv", CASE_COLUMNS),
        "results": write_csv(results, out_dir / "results.csv", [*RESULT_KEYS, *(f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std"))]),
    }
    markdown = out_dir / "results.md"
    markdown.write_text(results_markdown(config, results))
    files["markdown"] = markdown
    per_case: dict[str, list[float]] = {}
    for run in config.methods:
        keys = sorted({(r["group"], r["case"]) for r in rows if r["method"] == run.name})
        per_case[run.name] = [
            float(np.nanmean([r["dice"] for r in rows if r["method"] == run.name and (r["group"], r["case"]) == k] or [math.nan])) for k in keys
        ]
    if any(per_case.values()):
        files["boxplot"] = write_dice_boxplot(out_dir / "dice_boxplot.png", per_case, title=f"{config.name}: Dice per query case (mean over labels)")
    return ExperimentOutcome(rows, results, computed, skipped, files)


def results_markdown(config: ExperimentConfig, results: list[dict]) -> str:
    """The results table with a header saying how it was made."""
    protocol = config.support
    volumes = protocol.volumes if isinstance(protocol.volumes, int) else f"{len(protocol.volumes)} fixed ({', '.join(protocol.volumes)})"
    draw = f"{protocol.slices_per_label} planes per label from {volumes} support volume(s)" if protocol.mode == "slices" else f"every plane of {volumes} support volume(s)"
    annotated = [f"- {r.name}: also given {r.annotate_query} annotated plane(s) per label of the query itself (kept in its output)" for r in config.methods if r.annotate_query]
    weights = "RANDOM WEIGHTS (smoke test, meaningless scores)" if config.model.random_weights else "pretrained weights"
    return "\n".join(
        [
            f"# {config.name}",
            "",
            f"- config: `{config.path.name}`; support: {draw}, {protocol.groups} group(s), seed {protocol.seed}",
            f"- model: {config.model.model}, image size {config.model.image_size}, {weights}; axis {config.axis}, preset {config.preset}",
            f"- metrics: {METRIC_LIBRARIES}; NSD tolerance {config.nsd_tolerance_mm:g} mm; empty-vs-empty: {config.both_empty}",
            "- each cell: mean ± std over groups of the mean over query cases; HD95 vox is the SAMed/OFL-SAM2 headline HD",
            *annotated,
            "",
            summary_markdown(results, RESULT_KEYS[:3]),
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Command line


def register_experiment_command(subparsers) -> None:
    """Add ``experiment CONFIG [--out DIR] [--data-root DIR] [--random-weights] [--device D] [--executor E]``."""
    from .executors import add_executor_options

    parser = subparsers.add_parser(
        "experiment",
        help="run a few-shot experiment described by a YAML file (resumable)",
        description="Run every support group x query case x method of an experiment file, score the results and "
        "write per-case files plus a table of mean ± std over groups. Finished cases are skipped on a re-run.",
    )
    parser.add_argument("config", help="experiment YAML file (see Resources/experiments/)")
    parser.add_argument("--out", help="output folder (default: results/<name> in the working folder)")
    parser.add_argument("--data-root", help="folder the case paths are relative to (replaces data_root of the file)")
    parser.add_argument("--random-weights", action="store_true", default=None, help="untrained SAM2: smoke tests only")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="where to run SAM2 (default: the file's, else auto)")
    parser.add_argument("--no-montage", action="store_true", help="skip the PNG montages")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_options(parser)
    parser.set_defaults(func=run_experiment_command)


def run_experiment_command(args) -> int:
    """Handler of ``oflsam2 experiment``; raises :class:`InputError` for a bad config."""
    from .executors import make_executor

    config = load_config(args.config, data_root=args.data_root, random_weights=args.random_weights, device=args.device)
    if args.no_montage:
        config.montage = False
    out = Path(args.out) if args.out else Path("results") / config.name
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; the experiment writes a folder. Give a folder name.")
    refuse_inputs_as_output(out, [config.path, *(p for case in config.cases.values() for p in (case.image, case.label))])
    with make_executor(args.executor, config.model, max_cached_volumes=cached_volumes(config), address=args.address, workers=args.workers) as executor:
        outcome = run_experiment(config, out, progress=not args.quiet, executor=executor)
    print(results_markdown(config, outcome.results))
    print(f"{outcome.computed} case run(s) computed, {outcome.skipped} found finished; results in {out}")
    return 0
