"""A cohort in one command: ``oflsam2 batch INPUT --out DIR``.

INPUT is a folder of volumes (NIfTI, NRRD, MetaImage files and DICOM series folders) or a CSV
manifest with an ``image`` column and optional ``support`` and ``out`` columns (relative paths
are relative to the manifest's folder). Every case is segmented by
:func:`oflsam2.pipeline.segment_files` with the same method, model and options, on an Engine
that an executor (:mod:`oflsam2.executors`) loads once per worker.

Naming rule: case ``NAME`` is the image's file name without its image suffix (a DICOM folder:
the folder's name); its label map is ``DIR/NAME_seg.nii.gz`` (a manifest's ``out`` column may
name it instead) and, with ``--seg-nrrd``, its Slicer segmentation is ``DIR/NAME_seg.seg.nrrd``
beside it. With ``--support-dir``, the support of ``NAME`` is the file or DICOM folder in that
folder whose own case name is ``NAME`` (so ``image_2.nii.gz`` pairs with ``image_2.nrrd`` there).

A case is its input (its image, and support): two cases may share a name (``a/img.nii.gz``
and ``b/img.nii.gz`` in a manifest, with distinct ``out`` names), never an input. Outputs that
collide (two cases, or a case's label map and another's ``.seg.nrrd``, on one path) are refused
before any work.

Per case the batch writes a settings record named after the label map, ``DIR/NAME_seg.nii.gz.run.json``
(the hash of everything that decides the result: method, model, options, adapter files, inputs'
sizes and dates) before the outputs, then the outputs atomically, then marks the record done. A
re-run skips a case whose outputs exist and whose done record has the same hash; it never
replaces a file that has no record (one the batch did not write). A record of an older version,
``DIR/NAME_seg.run.json``, is taken over. ``DIR/cases.csv`` lists every case: ``case, image,
status (done|skipped|failed), seconds, slices, quality, attempts, error``; the summary and the
exit status count every one of them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import AdapterError, CheckpointError, InputError
from .outputs import apply_destination_mode
from .settings import MethodOptions, ModelSettings

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
OUTPUT_SUFFIX = "_seg.nii.gz"
RECORD_SUFFIX = ".run.json"
CASES_FILE = "cases.csv"
CASE_COLUMNS = ("case", "image", "status", "seconds", "slices", "quality", "attempts", "error")
# Model settings that change speed or memory but not results: a resumed batch may differ in them.
_RUNTIME_SETTINGS = ("device", "cache_megabytes", "encode_batch_size")
# Errors that every case would repeat: the batch stops at the first instead of failing each case.
# (An adapter's model and input size are checked before the batch; its preset and axis may fit
# some cases and not others, so an AdapterError fails only its case.)
_BATCH_WIDE_ERRORS = (CheckpointError,)


@dataclass
class BatchCase:
    name: str
    image: Path
    support: Path | None
    out: Path  # the label map
    seg_nrrd: Path | None = None

    @property
    def key(self) -> tuple:
        """The case's identity: its inputs (resolved), not its name."""
        return tuple(_path_key(p) for p in (self.image, self.support) if p is not None)

    @property
    def record(self) -> Path:
        return self.out.with_name(self.out.name + RECORD_SUFFIX)

    @property
    def legacy_record(self) -> Path:
        """Before: ``NAME_seg.run.json``, one record for ``NAME_seg.nii.gz`` and ``NAME_seg.nrrd`` alike."""
        return self.out.with_name(_strip_suffix(self.out.name) + RECORD_SUFFIX)

    @property
    def outputs(self) -> list[Path]:
        return [self.out] + ([self.seg_nrrd] if self.seg_nrrd else [])

    @property
    def written(self) -> list[Path]:
        """Every file the batch writes for this case."""
        return [*self.outputs, self.record]


@dataclass
class BatchJob:
    """What every case of a batch shares (the ``segment`` options)."""

    method: str
    settings: ModelSettings
    options: MethodOptions = field(default_factory=MethodOptions)
    labels: list[int] | None = None
    support_slices: list[int] | None = None
    axis: str = "auto"
    preset: str = "auto"
    references: list[tuple[str, str]] = field(default_factory=list)
    label_names: dict[int, str] | None = None


@dataclass
class BatchOutcome:
    rows: list[dict]  # one per case, CASE_COLUMNS
    cases_file: Path

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)


# ---------------------------------------------------------------------------------------------
# Cases


def collect_cases(source, out_dir, *, support_dir=None, seg_nrrd: bool = False) -> list[BatchCase]:
    """The cases of a folder or CSV manifest, with their support and output paths.

    Raises :class:`InputError` for an empty folder, a manifest without an ``image`` column,
    two cases with one name, or a ``support`` column together with ``--support-dir``.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise InputError(f"The batch input {source} does not exist; give a folder of volumes or a CSV manifest.")
    if source.is_dir():
        if out_dir.resolve() == source.resolve():
            raise InputError(
                f"--out {out_dir} is the input folder: its outputs would be read as cases on the next run. "
                "Give another folder (for example a subfolder)."
            )
        # An output folder inside the input folder is not a DICOM series case.
        entries = [{"image": path} for path in _volumes_in(source) if path.resolve() != out_dir.resolve()]
        if not entries:
            raise InputError(
                f"The folder {source} holds no volume (NIfTI, NRRD, MetaImage or a DICOM series folder)."
            )
    else:
        entries = _read_manifest(source)
        if any(e.get("support") for e in entries) and support_dir is not None:
            raise InputError(f"The manifest {source} has a support column; leave out --support-dir.")
    supports = _supports_by_name(Path(support_dir)) if support_dir is not None else {}
    cases = []
    for entry in entries:
        name = case_name(entry["image"])
        out = _output_path(entry.get("out"), name, out_dir)
        support = entry.get("support") or supports.get(name)
        seg = out.with_name(_strip_suffix(out.name) + ".seg.nrrd") if seg_nrrd else None
        cases.append(BatchCase(name, Path(entry["image"]), Path(support) if support else None, out, seg))
    _refuse_repeated_inputs(cases)
    _refuse_colliding_outputs(cases, out_dir)
    _refuse_overwriting_inputs(cases, source, out_dir)
    return cases


def _refuse_repeated_inputs(cases: Sequence[BatchCase]) -> None:
    seen: dict[tuple, BatchCase] = {}
    for case in cases:
        if case.key in seen:
            support = f" with the support {case.support}" if case.support else ""
            raise InputError(f"The image {case.image}{support} is listed twice; list each case once.")
        seen[case.key] = case


def _refuse_colliding_outputs(cases: Sequence[BatchCase], out_dir: Path) -> None:
    """No two files the batch writes (any case's label map, .seg.nrrd, run record, and
    cases.csv) may be one file: the later would replace the earlier, or its record."""
    writers: dict[str, tuple[Path, BatchCase | None]] = {_path_key(out_dir / CASES_FILE): (out_dir / CASES_FILE, None)}
    for case in cases:
        for path in case.written:
            key = _path_key(path)
            if key in writers:
                other_path, other = writers[key]
                first = f"case {other.image} ({other_path.name})" if other is not None else "the cases table"
                raise InputError(
                    f"Case {case.image} would write {path}, which {first} writes too; give the cases distinct "
                    "output names (the manifest's out column)."
                )
            writers[key] = (path, case)


def _path_key(path) -> str:
    """A path as the file system tells paths apart (case-insensitive on Windows and macOS)."""
    key = os.path.normcase(os.path.realpath(path))
    return key.casefold() if sys.platform == "darwin" else key


def _refuse_overwriting_inputs(cases: Sequence[BatchCase], source: Path, out_dir: Path) -> None:
    """No output of the batch (a case's files, ``cases.csv``) may be the manifest or any case's
    image or support: a manifest's out column or an --out beside the manifest could name one."""
    inputs = [source, *(p for case in cases for p in (case.image, case.support) if p is not None)]
    by_path = {os.path.normcase(os.path.realpath(p)): p for p in inputs}
    by_inode = {(s.st_dev, s.st_ino): p for p in inputs if (s := _stat(p)) is not None}
    outputs = (p for case in cases for p in (case.out, case.seg_nrrd, case.record) if p is not None)
    for output in [out_dir / CASES_FILE, *outputs]:
        stat = _stat(output)
        source_file = by_path.get(os.path.normcase(os.path.realpath(output))) or (
            by_inode.get((stat.st_dev, stat.st_ino)) if stat is not None else None
        )
        if source_file is not None:
            raise InputError(
                f"The batch would write {output} over its input {source_file}; choose another --out folder "
                "(or another name in the manifest's out column)."
            )


def _stat(path: Path):
    try:
        return os.stat(path)
    except OSError:
        return None


def case_name(path) -> str:
    """``image_2.nii.gz`` -> ``image_2``; a DICOM series folder -> the folder's name."""
    path = Path(str(path).rstrip("/\\"))
    return path.name if path.is_dir() else _strip_suffix(path.name)


def _strip_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.lower().endswith(".seg.nrrd"):
            found.append(path)
        elif path.is_dir() and any(child.is_file() for child in path.iterdir()):
            found.append(path)  # a DICOM series folder; an unreadable one fails as its own case
    return found


def _supports_by_name(folder: Path) -> dict[str, Path]:
    if folder.is_file():
        raise InputError(f"--support-dir {folder} is a file; give the folder that holds the support label maps.")
    if not folder.is_dir():
        raise InputError(f"The support folder {folder} does not exist.")
    supports: dict[str, Path] = {}
    for path in _volumes_in(folder):
        name = case_name(path)
        if name in supports:
            raise InputError(f"The support folder {folder} holds two maps for case {name!r}: {supports[name].name} and {path.name}.")
        supports[name] = path
    return supports


def _read_manifest(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read the manifest {path}: {exc}. Give a CSV file or a folder of volumes.") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = [c.strip() for c in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    unknown = sorted(set(columns) - {"image", "support", "out"})
    if "image" not in columns or unknown:
        raise InputError(
            f"The manifest {path} must be a CSV with a header: image[,support][,out]; it has columns {columns or 'none'}."
        )
    entries = []
    for number, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if not row.get("image"):
            raise InputError(f"{path}, line {number}: the image column is empty.")
        entry = {"image": _relative_to(row["image"], path.parent)}
        if row.get("support"):
            entry["support"] = _relative_to(row["support"], path.parent)
        if row.get("out"):
            entry["out"] = row["out"]
        entries.append(entry)
    if not entries:
        raise InputError(f"The manifest {path} lists no case.")
    return entries


def _relative_to(text: str, folder: Path) -> Path:
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else folder / path


def _output_path(given, name: str, out_dir: Path) -> Path:
    if not given:
        return out_dir / f"{name}{OUTPUT_SUFFIX}"
    path = Path(given)
    return path if path.is_absolute() else out_dir / path


# ---------------------------------------------------------------------------------------------
# Settings records (resume)


def settings_hash(job: BatchJob, case: BatchCase) -> str:
    """SHA256 of everything that decides this case's result."""
    options = dataclasses.asdict(job.options)
    options["adapter"] = _folder_digest(job.options.adapter) if job.options.adapter else None
    model = {k: v for k, v in dataclasses.asdict(job.settings).items() if k not in _RUNTIME_SETTINGS}
    record = {
        "method": job.method,
        "model": model,
        "options": options,
        "labels": job.labels,
        "label_names": job.label_names,
        "support_slices": job.support_slices,
        "axis": job.axis,
        "preset": job.preset,
        "references": [[_file_identity(p) for p in pair] for pair in job.references],
        "image": _file_identity(case.image),
        "support": _file_identity(case.support) if case.support else None,
        "outputs": [p.name for p in case.outputs],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path) -> list:
    """Absolute path, total size and latest modification time (a DICOM folder: over its files)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files if p.exists()]
    return [str(path.resolve()), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def _folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _read_record(case: BatchCase) -> dict | None:
    try:
        return json.loads(case.record.read_text())
    except (OSError, ValueError):
        return None


def _adopt_legacy_record(case: BatchCase, digest: str) -> None:
    """A record of an older version (``NAME_seg.run.json``, shared by every output of that stem)
    becomes this case's when it is exactly this case's (the settings hash covers the inputs and
    the output names), or when it lists this case's label map among the outputs it wrote (then
    the case runs again); any other is left alone."""
    if case.record.exists() or not case.legacy_record.is_file():
        return
    try:
        legacy = json.loads(case.legacy_record.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(legacy, dict):
        return
    if legacy.get("settings") == digest:
        os.replace(case.legacy_record, case.record)
        return
    written = (legacy.get("summary") or {}).get("outputs") or []
    if isinstance(written, list) and _path_key(case.out) in {_path_key(str(p)) for p in written}:
        _write_record(case, {**legacy, "status": "writing"})  # the batch's file, but not for these settings


def _write_record(case: BatchCase, record: dict) -> None:
    _atomic_text(case.record, json.dumps(record, indent=1, default=str))


def _atomic_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        apply_destination_mode(temporary, path)  # mkstemp's 0600 would ignore the umask
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def plan_case(job: BatchJob, case: BatchCase) -> tuple[str, str]:
    """``("skip", hash)`` when finished with these settings, ``("run", hash)`` when to compute;
    raises :class:`InputError` when an output exists that this batch did not write."""
    digest = settings_hash(job, case)
    _adopt_legacy_record(case, digest)
    record = _read_record(case)
    if record is not None and record.get("settings") == digest and record.get("status") == "done":
        if all(p.is_file() for p in case.outputs):
            return "skip", digest
    if record is None:
        foreign = [p for p in case.outputs if p.exists()]
        if foreign:
            raise InputError(
                f"{foreign[0]} exists and was not written by oflsam2 batch (no {case.record.name}); "
                "move it or choose another --out folder."
            )
    return "run", digest


# ---------------------------------------------------------------------------------------------
# Running


def segment_case(job: BatchJob, case: BatchCase, digest: str, engine, events) -> dict:
    """One case, in a worker: record the settings, segment and write atomically, mark done.

    Returns ``{"slices", "quality"}`` for the cases table.
    """
    from . import pipeline

    if case.support is None and job.options.adapter is None:
        raise InputError(f"No support map for case {case.name}: give a file named {case.name}.nii.gz (or .nrrd, ...) in --support-dir.")
    _write_record(case, {"case": case.name, "settings": digest, "status": "writing"})
    try:
        summary = pipeline.segment_files(
            case.image, case.support, case.out,
            labels=job.labels, support_slices=job.support_slices, method=job.method, axis=job.axis,
            preset=job.preset, settings=job.settings, options=job.options, references=job.references,
            seg_nrrd_path=case.seg_nrrd, events=events, engine=engine, label_names=job.label_names,
        )
    except BaseException:
        if not any(p.exists() for p in case.outputs):
            case.record.unlink(missing_ok=True)  # nothing of ours is left to mark
        raise
    summary["planes"] = _planes(case.out, summary["axis"])
    _write_record(case, {"case": case.name, "settings": digest, "status": "done", "summary": summary})
    return {"slices": summary["planes"], "quality": mean_quality(summary)}


def _planes(label_map: Path, axis: int) -> int:
    """Planes along the slice axis (array axis ``axis``) of a written label map, from its header."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(label_map))
    reader.ReadImageInformation()
    return int(reader.GetSize()[::-1][axis])


def mean_quality(summary: dict) -> float | None:
    """Mean per-slice quality (``info["quality"][label][slice]["quality"]``) over labels and slices."""
    values = [
        float(entry["quality"])
        for per_label in ((summary.get("engine") or {}).get("quality") or {}).values()
        for entry in per_label.values()
        if isinstance(entry, dict) and entry.get("quality") is not None
    ]
    return sum(values) / len(values) if values else None


def check_job(job: BatchJob, out_dir) -> Path:
    """Check the shared options and the output folder before any case runs (the folder is made
    only by :func:`run_batch`, so a refused batch leaves none behind)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; give a folder for the batch's outputs.")
    if job.options.save_adapter:
        raise InputError("A batch does not save adapters (every case would overwrite it); train one with `oflsam2 train`.")
    if job.options.adapter is not None:
        check_adapter_fits(job.options.adapter, job.settings, job.options)
        check_adapter_labels(job.options.adapter, job.labels, job.label_names)
    return out_dir


def check_adapter_fits(folder, settings: ModelSettings, options=None) -> None:
    """Refuse, before any case runs, an adapter folder trained on another model or input size,
    or (``options`` given) under other OFL-SAM2 options (the checkpoint hash, preset and axis are
    checked per case when it is loaded)."""
    from .ofl.adapter_metadata import check_trained_with, list_adapters

    adapters = list_adapters(folder)
    if not adapters:
        raise AdapterError(f"The folder {folder} holds no OFL-SAM2 adapter; train one with `oflsam2 train`.")
    for metadata in adapters:
        problems = [
            f"{key} {metadata.get(key)!r} (this run: {now!r})"
            for key, now in (("model", settings.model), ("image_size", settings.image_size))
            if metadata.get(key) != now
        ]
        if problems:
            raise AdapterError(
                f"The adapter {metadata['path']} was trained with {' and '.join(problems)}; run the batch with the "
                "adapter's --model and --image-size, or train an adapter for this model."
            )
        if options is not None:
            check_trained_with(metadata, options)


def check_adapter_labels(folder, labels, names) -> None:
    """Refuse, before the model loads, a label the adapter folder has no adapter for (by the
    rule the loader applies, :mod:`oflsam2.adapter_labels`); no ``labels``: the folder's own."""
    from .adapter_labels import UNNAMED, describe, require_adapter
    from .ofl.adapter_metadata import list_adapters

    adapters = list_adapters(folder)
    values = [a.get("label") for a in adapters]
    if labels is None and len(set(map(str, values))) != len(values):
        raise AdapterError(f"The adapters in {folder} share label values ({describe(adapters)}); say which to use with "
                           "--labels and --label-names VALUE=NAME.")
    for value in labels or ():
        require_adapter(adapters, value, (names or {}).get(value, UNNAMED.format(value)), folder)


def run_batch(
    job: BatchJob,
    cases: Sequence[BatchCase],
    out_dir,
    executor,
    *,
    on_case_done: Callable[[dict], None] | None = None,
    events_for: Callable[[BatchCase], object] | None = None,
) -> BatchOutcome:
    """Run every case not already done on ``executor``; keep going when one fails.

    ``cases.csv`` is rewritten (atomically) after every case, so a killed batch still lists
    what it finished. A checkpoint that cannot be used stops the batch (every case would fail
    the same way) with that error.
    """
    import functools

    out_dir = check_job(job, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases_file = out_dir / CASES_FILE
    rows: dict[tuple, dict] = {}  # by case.key: every case has its own row, whatever its name
    todo: list[BatchCase] = []
    tasks = []
    for case in cases:
        try:
            action, digest = plan_case(job, case)
        except InputError as exc:
            rows[case.key] = _row(case, "failed", error=str(exc))
            continue
        if action == "skip":
            record = _read_record(case) or {}
            summary = record.get("summary") or {}
            rows[case.key] = _row(case, "skipped", slices=summary.get("planes"), quality=mean_quality(summary))
            continue
        todo.append(case)
        tasks.append(functools.partial(segment_case, job, case, digest))

    def write_table() -> None:
        ordered = [rows[c.key] for c in cases if c.key in rows]
        _atomic_text(cases_file, _csv_text(ordered))

    for row in rows.values():
        if on_case_done:
            on_case_done(row)
    write_table()

    def finished(outcome) -> None:
        case = todo[outcome.index]
        value = outcome.value or {}
        status = "failed" if outcome.error else "done"
        rows[case.key] = _row(
            case, status, seconds=outcome.seconds, slices=value.get("slices"), quality=value.get("quality"),
            attempts=outcome.attempts, error=outcome.error,
        )
        write_table()
        if on_case_done:
            on_case_done(rows[case.key])
        if outcome.error_kind in {e.__name__ for e in _BATCH_WIDE_ERRORS}:
            raise CheckpointError(f"Case {case.name}: {outcome.error} The batch stopped: every case would fail the same way.")

    if tasks:
        executor.run(tasks, finished, (lambda index: events_for(todo[index])) if events_for else None)
    return BatchOutcome([rows[c.key] for c in cases if c.key in rows], cases_file)


def _row(case: BatchCase, status: str, *, seconds=None, slices=None, quality=None, attempts=None, error=None) -> dict:
    return {
        "case": case.name,
        "image": str(case.image),
        "status": status,
        "seconds": "" if seconds is None else f"{seconds:.2f}",
        "slices": "" if slices is None else slices,
        "quality": "" if quality is None else f"{quality:.4f}",
        "attempts": "" if attempts is None else attempts,
        "error": error or "",
    }


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CASE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
