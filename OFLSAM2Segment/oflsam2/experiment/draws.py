"""Which support volumes, queries and planes each group gets, and the seeds of a run.

Group ``g`` draws with ``numpy.random.default_rng([seed, g])``: ``volumes`` cases from
``pool``; in slices mode, per label, ``slices_per_label`` planes holding that label, split as
evenly as possible over the support volumes that contain it, drawn at random within each
volume. Every plane handed to the engine as a :class:`~oflsam2.settings.Reference` is support, so
each support volume becomes a Reference stacking only its drawn planes (one engine call per
label, since labels draw different planes); in volumes mode whole volumes are passed and all
labels share one call. Volumes are intensity-normalised whole (the preset's percentiles are
those of the full volume, never of a few drawn planes) and handed to the engine as ``[0, 1]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..evaluation import check_same_grid, natural_key, read_label_map
from ..settings import Reference
from .config import ExperimentConfig


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


class CaseLoader:
    """Reads cases on demand and keeps the last few (a group's supports and the current query)."""

    def __init__(self, config: ExperimentConfig, keep: int):
        self.config = config
        self.load = functools.lru_cache(maxsize=keep)(self._load)

    def _load(self, case_id: str) -> LoadedCase:
        from ..volume import apply_preset

        case = self.config.cases[case_id]
        labels, grid = read_label_map(case.label)
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image))).astype(np.float32)
        if image.ndim != 3:
            raise InputError(f"The image {case.image} of case {case_id} is not a 3-D scalar volume.")
        return LoadedCase(apply_preset(image, self.config.preset), labels, grid)


def support_references(config: ExperimentConfig, group: dict, loader: CaseLoader) -> list[tuple[list[int], list[Reference]]]:
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


def run_seeds(config: ExperimentConfig) -> dict:
    """Every seed of the run: support draws (group g uses [support, g]), each method run's seed
    and the per-label seeds OFL-SAM2 derives from it, and the random-weight SAM2's seed."""
    from ..backend import RANDOM_WEIGHTS_SEED
    from ..methods.ofl import label_seed

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

