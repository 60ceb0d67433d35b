"""Running an experiment: every group x query x method, resumable, through an executor.

A case whose metrics file exists is skipped, so an interrupted run resumes where it stopped;
``run.json`` records the draw and settings, and a re-run into the same folder must match them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..evaluation import read_csv, write_csv
from ..metrics import case_metrics
from ..settings import LabelSupport, ModelSettings, ofl_preset
from .config import ExperimentConfig, MethodRun
from .draws import CaseLoader, LoadedCase, draw_groups, run_seeds, scan_cases, support_references
from .tables import CASE_COLUMNS, ExperimentOutcome, write_tables

# The engine gets volumes already normalised to [0, 1]; this preset passes them unchanged.
NORMALISED_PRESET = "window:0,1"
METRICS_FILE = "metrics.csv"
PREDICTION_FILE = "prediction.nii.gz"
# Model settings that change speed or memory but not results: a resumed run may differ in them.
_RUNTIME_SETTINGS = ("device", "cache_megabytes", "encode_batch_size")


def default_engine_factory(config: ExperimentConfig) -> Callable[[ModelSettings], object]:
    """Builds the real :class:`~oflsam2.api.Engine`, caching every support stack of a group."""
    from ..api import Engine

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

    from ..events import Events
    from ..executors import LocalExecutor

    out_dir = Path(out_dir)
    groups = draw_groups(config, scan_cases(config))
    out_dir.mkdir(parents=True, exist_ok=True)  # after what may refuse the data: a refused run leaves no folder
    _record_run(config, groups, out_dir / "run.json")
    factory = engine_factory or default_engine_factory(config)
    executor = executor or LocalExecutor(lambda: factory(config.model))
    loader = CaseLoader(config, keep=len(groups[0]["support"]) + 1)
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
    return write_tables(config, rows, out_dir, len(tasks), skipped)


_WORKER_LOADER: dict[str, CaseLoader] = {}  # one per process: the last config's volumes


def _case_task(config: ExperimentConfig, group: dict, case: str, run_name: str, folder: Path, engine, events) -> list[dict]:
    """One query x method in a worker (this process or a Ray actor); returns its metric rows."""
    key = json.dumps([str(config.path), config.preset, config.axis, [[c.id, str(c.image), str(c.label)] for c in config.cases.values()]])
    if key not in _WORKER_LOADER:
        _WORKER_LOADER.clear()
        _WORKER_LOADER[key] = CaseLoader(config, keep=len(group["support"]) + 1)
    loader = _WORKER_LOADER[key]
    run = next(r for r in config.methods if r.name == run_name)
    calls = support_references(config, group, loader)
    return _run_case(config, engine, run, group["group"], case, loader.load(case), calls, folder, events)


def _run_case(config, engine, run: MethodRun, group: int, case: str, query: LoadedCase, calls, folder: Path, events) -> list[dict]:
    """Segment one query with one method, write its files, return its metric rows."""
    from ..outputs import write_label_volume

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
        from ..report import write_case_montage

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


def _support_montages(config, group: dict, loader: CaseLoader, folder: Path) -> None:
    from ..report import write_case_montage

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
                    r.name: {
                        "method": r.method, "options": dataclasses.asdict(r.options), "annotate_query": r.annotate_query,
                        **({"ofl_preset": ofl_preset(r.options)} if r.method == "ofl" else {}),
                    }
                    for r in config.methods
                },
                "seeds": run_seeds(config),
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
