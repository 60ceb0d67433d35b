"""The ``oflsam2`` command: segment, train, checkpoints, demo (and eval / experiment).

Problems the user can fix (:class:`~oflsam2.errors.OFLSAM2Error`) print ``error: <message>``
and exit with status 2; a cancelled or interrupted run exits with 130 (143 after SIGTERM).
Progress goes to stderr as one tqdm bar per stage; results go to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path

from .errors import Cancelled, InputError, OFLSAM2Error
from .settings import DEFAULT_METHOD, DEVICES, MAX_IMAGE_SIZE, METHODS, MIN_IMAGE_SIZE, OFL_PRESETS, REVSAM2_MODES, MethodOptions
from .version import __version__

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
TRAINING_SEGMENTATION = "training_segmentation.nii.gz"
_OPTIONAL_COMMANDS = (
    ("eval", "evaluation", "register_eval_command"),
    ("experiment", "experiment", "register_experiment_command"),
    ("serve", "server.command", "register_serve_command"),
)


def main(argv=None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    _show_warnings()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        with _terminate_as_interrupt():
            return args.func(args)
    except (Cancelled, KeyboardInterrupt) as exc:
        terminated = isinstance(exc, _Terminated) or _terminate_as_interrupt.received  # Ray re-raises it as KeyboardInterrupt
        what = "Terminated" if terminated else "Interrupted"
        # batch and experiment keep every finished case and resume from there
        kept = ("finished cases are kept; run the same command again to resume"
                if args.func.__name__ in ("run_batch_command", "run_experiment_command") else "no output was written")
        written = getattr(exc, "outputs_written", None)
        if written:  # it came while the outputs were moved into place, and waited for the last one
            kept = f"the outputs were written before it took effect ({', '.join(written)})"
        message = str(exc) if isinstance(exc, Cancelled) else f"{what}; {kept}."
        print(f"error: {message}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except OFLSAM2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the system refused a file operation (disk full, permissions): say which
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}.", file=sys.stderr)
        return EXIT_USER_ERROR


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised like Ctrl+C so that temporary files
    and folders a command created are removed on the way out instead of left half-written."""


class _terminate_as_interrupt:
    """Turn SIGTERM into :class:`_Terminated` for the block (main thread only; restored after);
    ``received`` says a SIGTERM came (a library may turn the exception into a plain KeyboardInterrupt)."""

    received = False

    def __enter__(self):
        self._previous = None
        _terminate_as_interrupt.received = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum, frame):
        _terminate_as_interrupt.received = True
        raise _Terminated


def _show_warnings() -> None:
    """Print the engine's warnings (``oflsam2.*`` loggers) on stderr as ``warning: ...``."""
    logger = logging.getLogger(__package__)
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))


class _StderrWarnings(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it)."""

    def emit(self, record) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oflsam2",
        description="Segment a CT/MRI volume from a few annotated slices with SAM2 (OFL-SAM2, RevSAM2, SAM2 propagation).",
    )
    parser.add_argument("--version", action="version", version=f"oflsam2 {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_segment(commands)
    _add_batch(commands)
    _add_train(commands)
    _add_checkpoints(commands)
    _add_demo(commands)
    for command, module, function in _OPTIONAL_COMMANDS:
        _register_optional(commands, command, module, function)
    return parser


# ---------------------------------------------------------------------------------------------
# segment / train


def _add_segment(commands) -> None:
    parser = commands.add_parser(
        "segment",
        help="segment a volume from annotated slices (or with a trained adapter)",
        description="Segment IMAGE from the annotated slices in LABELS and write the result.",
    )
    _add_inputs(parser, support_required=False)
    parser.add_argument("--out", required=True, help="output label volume (.nii.gz, .nii, .nrrd, .mha)")
    parser.add_argument("--seg-nrrd", help="also write a Slicer segmentation file (.seg.nrrd)")
    _add_method(parser, "segmentation method")
    _add_model_options(parser)
    _add_server_options(parser)
    parser.add_argument("--adapter", help="trained OFL-SAM2 adapter folder (segment without support, or warm start)")
    parser.add_argument("--save-adapter", help="write the trained OFL-SAM2 adapter into this folder")
    _add_method_options(parser, "epochs", "gamma", "num_retrieved", "top_k", "revsam2_mode", "seed", "warm_start_epochs")
    review = parser.add_argument_group("review and correct")
    review.add_argument("--quality-out", metavar="CSV", help="write per-slice quality as label,slice,quality,source rows")
    review.add_argument("--suggest", type=_at_least(0), metavar="N", help="print the N slices per label best worth annotating next")
    review.add_argument("--save-state", metavar="DIR", help="save what an update needs (settings, quality, OFL-SAM2 adapter) in DIR")
    review.add_argument(
        "--previous", metavar="PREV",
        help="update PREV (an output of a run with --save-state DIR) from the slices where --support differs from it",
    )
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=run_segment)


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train an OFL-SAM2 adapter on annotated slices",
        description=(
            "Train an OFL-SAM2 adapter on the annotated slices of IMAGE and save it in --out. "
            f"Training on a volume also segments it: the result is written to OUT/{TRAINING_SEGMENTATION}."
        ),
    )
    _add_inputs(parser, support_required=True)
    parser.add_argument("--out", required=True, help="adapter folder to write (created if absent)")
    _add_model_options(parser)
    _add_server_options(parser)
    parser.add_argument("--adapter", help="adapter folder to start from (warm start)")
    _add_method_options(parser, "epochs", "gamma", "num_retrieved", "seed")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=run_train)


def _add_inputs(parser, support_required: bool) -> None:
    parser.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, MetaImage, DICOM file or folder)")
    parser.add_argument(
        "--support", required=support_required, help="label map on the image's grid with the annotated slices"
    )
    parser.add_argument("--support-slices", type=_slice_list, help="use only these annotated slices, e.g. 12,20,30-33")
    parser.add_argument("--labels", type=_label_list, help="label values to segment, e.g. 1,3 (default: all in the support)")
    parser.add_argument(
        "--label-names", type=_label_names, metavar="V=NAME,...",
        help="names of the labels, e.g. 1=liver,3=spleen: the output's segments and the adapters are named so, and a "
        "named label uses the adapter of its name (default: label_V, which uses the adapter saved for value V)",
    )
    parser.add_argument(
        "--reference", action="append", default=[], type=_reference_pair, metavar="IMG:LABELS",
        help="another image and its label map used as extra support (repeatable)",
    )
    parser.add_argument("--axis", choices=("auto", "axial", "coronal", "sagittal"), default="auto", help="slice axis (default auto)")
    parser.add_argument(
        "--preset", default="auto",
        help="intensity preset: auto, ct-abdomen, ct-soft, ct-lung, ct-bone, mr, minmax, window:LO,HI, percentile:A,B",
    )


def _add_method(parser, what: str) -> None:
    """``--method``: the engine's registry, OFL-SAM2 unless told otherwise."""
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"{what} (default %(default)s)")


def _add_method_options(parser, *fields: str) -> None:
    """A flag for each named :class:`~oflsam2.settings.MethodOptions` field, its default taken from there."""
    flags = {  # field -> (argparse type or choices, help)
        "epochs": (_at_least(0), "OFL-SAM2 training epochs"),
        "gamma": (_fraction, "OFL-SAM2 confidence gate"),
        "num_retrieved": (_at_least(1), "OFL-SAM2 support memories retrieved per slice"),
        "top_k": (_at_least(1), "RevSAM2 supports kept per query"),
        "revsam2_mode": (REVSAM2_MODES, "RevSAM2 variant"),
        "seed": (int, "random seed"),
        "warm_start_epochs": (
            _at_least(0), "OFL-SAM2 epochs when a trained adapter is refined (--adapter with support, or an update), "
            "scaled by the share of support slices that are new to it and rounded up: an update with 1 corrected "
            "slice among 4 annotated trains a quarter of them",
        ),
    }
    defaults = MethodOptions()
    for field in fields:
        kind, text = flags[field]
        parse = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument(
            "--" + field.replace("_", "-"), default=getattr(defaults, field), help=f"{text} (default %(default)s)", **parse,
        )
    parser.add_argument(
        "--ofl-preset", choices=OFL_PRESETS, default="paper",
        help="OFL-SAM2 as its paper states it, or with the project's extensions (README: OFL-SAM2 choices; "
        "the options above apply on top) (default %(default)s)",
    )


def _add_model_options(parser) -> None:
    from .checkpoints import load_manifest

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", choices=list(load_manifest()),
        help="SAM2 model (default: the method's paper backbone, sam2.1-base-plus for ofl and train, sam2.1-tiny otherwise)",
    )
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="local checkpoint file (default: the verified cached download)")
    weights.add_argument("--random-weights", action="store_true", help="untrained SAM2 (tests and smoke runs only: masks are meaningless)")
    group.add_argument(
        "--image-size", type=_image_size,
        help="SAM2 input size, a multiple of 32 from 256 to 2048 (default: the model's own, 1024; 512 for medsam2)",
    )
    group.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default %(default)s)")
    group.add_argument(
        "--deterministic", action="store_true",
        help="deterministic kernels and one CPU thread: the same result whatever the thread count (slower)",
    )


def _add_server_options(parser) -> None:
    group = parser.add_argument_group("compute on a server (oflsam2 serve)")
    group.add_argument("--server", metavar="URL", help="run on this server, e.g. https://gpu-box:8765 (default: $OFLSAM2_SERVER)")
    group.add_argument("--token-file", metavar="FILE", help="file holding the server's token (default: $OFLSAM2_TOKEN_FILE)")
    group.add_argument("--server-ca", metavar="FILE", help="CA certificate the server's TLS certificate is signed by "
                       "(a self-signed server; default: $OFLSAM2_SERVER_CA, else the system's)")


def server_target(args):
    """The server named by ``--server``/``--token-file`` or their variables, else None (run here)."""
    from .client import target_from_options

    if not hasattr(args, "server"):
        return None
    return target_from_options(args.server, args.token_file, args.server_ca)


def engine_for_args(args, settings):
    """A :class:`~oflsam2.remote_engine.RemoteEngine` when a server is named, else None (a local Engine)."""
    target = server_target(args)
    if target is None:
        return None
    from .remote_engine import RemoteEngine

    return RemoteEngine(target, settings)


def _closing(engine):
    """Close a remote engine's session on the way out (a local one has nothing to close)."""
    import contextlib

    return contextlib.closing(engine) if engine is not None else contextlib.nullcontext()


def run_segment(args) -> int:
    if args.previous or args.save_state or args.quality_out or args.suggest is not None:
        return _run_reviewed(args)
    summary = _run_pipeline(args, args.method, Path(args.out), args.seg_nrrd, method_options(args))
    _print_summary(summary, args.json)
    return 0


def _run_reviewed(args) -> int:
    """``segment`` with the review options (quality, suggestions, saved state, update)."""
    from .run_state import describe, segment_reviewed

    settings = model_settings(args)
    engine = engine_for_args(args, settings)
    with _closing(engine):
        summary = segment_reviewed(
            image_path=args.image, support_path=args.support, out_path=Path(args.out), seg_nrrd_path=args.seg_nrrd,
            method=args.method, axis=args.axis, preset=args.preset, labels=args.labels, support_slices=args.support_slices,
            references=args.reference, settings=settings, options=method_options(args), events=progress_events(),
            previous_path=args.previous, state_dir=args.save_state, quality_out=args.quality_out,
            suggest_count=args.suggest, label_names=args.label_names, engine=engine,
        )
    if settings.random_weights:
        summary["warning"] = random_weights_banner()
    _print_summary(summary, args.json)
    if not args.json:
        for line in describe(summary):
            print(line)
    return 0


def method_options(args):
    """:class:`~oflsam2.settings.MethodOptions` from the ``segment`` options (also used by ``batch``)."""
    return MethodOptions.preset(
        args.ofl_preset, epochs=args.epochs, gamma=args.gamma, num_retrieved=args.num_retrieved, top_k=args.top_k,
        revsam2_mode=args.revsam2_mode, seed=args.seed, adapter=args.adapter,
        save_adapter=getattr(args, "save_adapter", None), warm_start_epochs=args.warm_start_epochs,
    )


def run_train(args) -> int:
    from .pipeline import check_folder_writable, refuse_inputs_as_output

    adapter_dir = Path(args.out)
    check_folder_writable(adapter_dir, "--out")
    inputs = [args.image, args.support, *(p for pair in args.reference for p in pair)]
    for output in (adapter_dir, adapter_dir / TRAINING_SEGMENTATION):
        refuse_inputs_as_output(output, inputs)
    options = MethodOptions.preset(
        args.ofl_preset, epochs=args.epochs, gamma=args.gamma, num_retrieved=args.num_retrieved, seed=args.seed,
        adapter=args.adapter, save_adapter=str(adapter_dir),
    )
    created = _create_folder(adapter_dir)
    try:
        summary = _run_pipeline(args, "ofl", adapter_dir / TRAINING_SEGMENTATION, None, options)
    except BaseException:
        if created:  # a failed or interrupted run leaves no empty adapter folder behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    summary["adapter"] = str(adapter_dir)
    _print_summary(summary, args.json)
    if not args.json:
        print(f"adapter saved in {adapter_dir}")
    return 0


def _create_folder(folder: Path) -> Path | None:
    """Create ``folder`` (and missing parents); return the topmost folder created, if any."""
    if folder.is_dir():
        return None
    top = folder
    while not top.parent.exists():
        top = top.parent
    try:
        folder.mkdir(parents=True)
    except OSError as error:
        raise InputError(f"Cannot create the folder {folder}: {error.strerror or error}.") from None
    return top


def _run_pipeline(args, method: str, out_path: Path, seg_nrrd, options) -> dict:
    """Check the checkpoint first (a missing one should not cost a volume read), then run."""
    from . import pipeline

    settings = model_settings(args)
    engine = engine_for_args(args, settings)
    with _closing(engine):
        summary = pipeline.segment_files(
            args.image, args.support, out_path,
            labels=args.labels, support_slices=args.support_slices, method=method, axis=args.axis,
            preset=args.preset, settings=settings, options=options, references=args.reference,
            seg_nrrd_path=seg_nrrd, events=progress_events(), label_names=args.label_names, engine=engine,
        )
    if settings.random_weights:
        summary["warning"] = random_weights_banner()
    return summary


def model_settings(args):
    """:class:`~oflsam2.api.ModelSettings` from the model options; resolves the checkpoint
    now (raising :class:`CheckpointError` with what to do) unless random weights are asked for."""
    from .api import ModelSettings, default_model
    from .checkpoints import model_entry, resolve_checkpoint

    trained = adapter_settings(getattr(args, "adapter", None))
    name = args.model or trained.get("model") or default_model(getattr(args, "method", "ofl"))
    entry = model_entry(name)
    remote = server_target(args) is not None
    if remote and args.checkpoint:
        raise InputError("--checkpoint names a file on this computer, which a server cannot use: leave it out (the "
                         "server runs the models it has downloaded) and name the model with --model.")
    if args.random_weights:
        print(random_weights_banner(), file=sys.stderr)
    elif not remote:  # a server checks its own checkpoints
        resolve_checkpoint(name, args.checkpoint)
    return ModelSettings(
        model=name, checkpoint=args.checkpoint, random_weights=args.random_weights,
        device=args.device, image_size=args.image_size or trained.get("image_size") or entry["image_size"],
        deterministic=getattr(args, "deterministic", False),
    )


def adapter_settings(folder) -> dict:
    """The model and image size every adapter in ``folder`` was trained with (the defaults of a
    run that uses them); empty when there is no readable adapter there or they disagree."""
    from .errors import AdapterError
    from .ofl.adapter_metadata import list_adapters

    if folder is None or not Path(folder).is_dir():
        return {}

    try:
        adapters = list_adapters(folder)
    except AdapterError:
        return {}
    agreed = {}
    for key in ("model", "image_size"):
        values = {a.get(key) for a in adapters}
        if len(values) == 1 and None not in values:
            agreed[key] = values.pop()
    return agreed


def random_weights_banner() -> str:
    line = "!" * 78
    return (
        f"{line}\n!! RANDOM WEIGHTS: SAM2 is built untrained. Every mask and every score of this\n"
        f"!! run is MEANINGLESS; use it only to test the installation.\n{line}"
    )


def json_summary(summary: dict) -> dict:
    """The summary as ``--json`` prints it: ``labels`` maps each label value to its name,
    annotated slices, voxel count and what the engine did for it (for ``ofl``: ``initial_fit``,
    ``retrieval_with_object``, ``accepted``, ``rejected``, ``gate_mean_w``, ...), so that
    ``labels.1.accepted`` reads one label's figures; ``engine.labels`` keeps the engine's own."""
    engine_labels = summary.get("engine", {}).get("labels", {})
    per_label = {}
    for value in summary["labels"]:
        entry = {
            "name": summary.get("label_names", {}).get(value),
            "slices": summary.get("slices", {}).get(value),
            "voxels": summary.get("voxels", {}).get(value),
        }
        entry.update(engine_labels.get(value, {}))
        per_label[str(value)] = entry
    return {**summary, "labels": per_label}


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(json_summary(summary), indent=2, default=str))
        return
    print(f"method {summary['method']} along the {summary['axis_name']} axis (array axis {summary['axis']}), preset {summary['preset']}")
    for label in summary["labels"]:
        name = summary["label_names"][label]
        slices = summary["slices"][label]
        print(f"  label {label} ({name}): {summary['voxels'][label]} voxels; annotated slices {slices}")
    for path in summary["outputs"]:
        print(f"wrote {path}")
    if "model" in summary.get("engine", {}):
        print(f"model {summary['engine']['model']}")
    if "ofl_preset" in summary.get("engine", {}):
        print(f"OFL-SAM2 preset {summary['engine']['ofl_preset']}")
    print(f"took {summary['timings']['total']:.1f} s")
    if "warning" in summary:
        print(summary["warning"])


# ---------------------------------------------------------------------------------------------
# batch

EXIT_SOME_FAILED = 1
# segment's options that name one case's files or review one run; batch has its own (INPUT, --support-dir, --out).
_PER_CASE_OPTIONS = {"help", "image", "support", "out", "seg_nrrd", "save_adapter", "quality_out", "suggest", "save_state", "previous"}


def _add_batch(commands) -> None:
    """``batch``: every ``segment`` option (copied from its parser, so none is forgotten) plus the cohort's own."""
    import copy

    from .batch import CASES_FILE, OUTPUT_SUFFIX
    from .executors import add_executor_options

    parser = commands.add_parser(
        "batch",
        help="segment every volume of a folder or CSV manifest (one model load; resumable; local or Ray)",
        description=(
            "Segment every case of INPUT (a folder of NIfTI/NRRD/MetaImage files and DICOM series folders, or a CSV "
            "manifest with columns image[,support][,out]) with the same method and options, using a trained adapter "
            f"(--adapter) or per-case support maps (--support-dir). Case NAME (the file name without its suffix) is "
            f"written to OUT/NAME{OUTPUT_SUFFIX}; OUT/{CASES_FILE} lists every case. Finished cases are skipped on a "
            "re-run with the same settings. Exit status 1 when some case failed."
        ),
    )
    parser.add_argument("input", help="folder of volumes, or a CSV manifest (image[,support][,out])")
    parser.add_argument("--out", required=True, help="output folder (created if absent)")
    parser.add_argument("--support-dir", help="folder of support label maps, matched to cases by name")
    parser.add_argument("--seg-nrrd", action="store_true", help="also write OUT/NAME_seg.seg.nrrd (Slicer segmentation)")
    add_executor_options(parser)
    segment = commands.choices["segment"]
    copies = {}
    for action in segment._actions:
        if action.dest not in _PER_CASE_OPTIONS:
            copies[action] = parser._add_action(copy.copy(action))
    for group in segment._mutually_exclusive_groups:  # e.g. --checkpoint / --random-weights
        exclusive = parser.add_mutually_exclusive_group(required=group.required)
        exclusive._group_actions.extend(copies[a] for a in group._group_actions if a in copies)
    parser.set_defaults(func=run_batch_command)


def run_batch_command(args) -> int:
    from .batch import BatchJob, check_job, collect_cases, run_batch
    from .executors import LocalExecutor, make_executor

    job = BatchJob(
        method=args.method, settings=model_settings(args), options=method_options(args), labels=args.labels,
        support_slices=args.support_slices, axis=args.axis, preset=args.preset, references=args.reference,
        label_names=args.label_names,
    )
    out_dir = check_job(job, args.out)
    cases = collect_cases(args.input, out_dir, support_dir=args.support_dir, seg_nrrd=args.seg_nrrd)
    if job.options.adapter is None and not any(case.support for case in cases):
        raise InputError(
            "No case has a support map: give --support-dir (a label map per case, named like its image), "
            "a support column in the manifest, or a trained --adapter."
        )
    show = not args.json and sys.stderr.isatty()
    engine = engine_for_args(args, job.settings)
    if engine is None:
        executor = make_executor(args.executor, job.settings, max_cached_volumes=1 + len(job.references),
                                 address=args.address, workers=args.workers)
    elif args.executor != "local":
        raise InputError("--server runs every case on the server: leave out --executor ray.")
    else:  # one server session for the whole cohort
        executor = LocalExecutor(lambda: engine)
    with _closing(engine), executor, _BatchBars(len(cases), show) as bars:
        local = executor.name == "local"
        outcome = run_batch(job, cases, out_dir, executor, on_case_done=bars.case_done, events_for=bars.events_for if local else None)
    if args.json:
        print(json.dumps({"cases": outcome.rows, "failed": outcome.failed, "cases_file": str(outcome.cases_file)}, indent=2))
    else:
        counts = {status: sum(r["status"] == status for r in outcome.rows) for status in ("done", "skipped", "failed")}
        for row in outcome.rows:
            if row["status"] == "failed":
                print(f"failed {row['case']} ({row['image']}): {row['error']}")
        print(f"{counts['done']} case(s) done, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
              f"see {outcome.cases_file}")
        if job.settings.random_weights:
            print(random_weights_banner())
    return EXIT_SOME_FAILED if outcome.failed else 0


class _BatchBars:
    """An overall bar (cases, with ETA) and, for in-process runs, the running case's stage bar."""

    def __init__(self, total: int, show: bool):
        from tqdm import tqdm

        self._show = show
        self._overall = tqdm(total=total, desc="cases", unit="case", file=sys.stderr, disable=not show, position=0)
        self._stages = StageBars(position=1, leave=False)

    def events_for(self, case):
        from .events import Events

        self._overall.set_postfix_str(case.name)
        return Events(on_progress=self._stages.update if self._show else None)

    def case_done(self, row: dict) -> None:
        self._stages.close()
        self._overall.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stages.close()
        self._overall.close()


# ---------------------------------------------------------------------------------------------
# checkpoints


def _add_checkpoints(commands) -> None:
    parser = commands.add_parser("checkpoints", help="list, download or verify SAM2 checkpoints")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action", required=True)
    listing = actions.add_parser("list", help="known models and whether they are downloaded")
    listing.set_defaults(func=run_checkpoints_list)
    fetch = actions.add_parser("download", help="download a model's checkpoint into the cache (resumable, verified)")
    fetch.add_argument("name", help="model name (see `oflsam2 checkpoints list`)")
    fetch.add_argument("--url", help="download from this URL instead (a mirror); the file is still verified")
    fetch.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the server (default 15)")
    fetch.set_defaults(func=run_checkpoints_download)
    check = actions.add_parser("verify", help="check a checkpoint file: hash, readability, SAM2 version")
    check.add_argument("path", help="checkpoint file")
    check.add_argument("--model", help="require the official file of this model")
    check.set_defaults(func=run_checkpoints_verify)


def run_checkpoints_list(args) -> int:
    import os

    from .checkpoints import ENV_CHECKPOINT, cache_dir, load_manifest

    folder = cache_dir()
    print(f"checkpoint folder: {folder}")
    if os.environ.get(ENV_CHECKPOINT):
        print(f"{ENV_CHECKPOINT} = {os.environ[ENV_CHECKPOINT]} (used instead of the folder)")
    rows = [("NAME", "VERSION", "SIZE", "STATUS", "DESCRIPTION")]
    for name, entry in load_manifest().items():
        size = f"{entry['size_bytes'] / 1e6:.0f} MB" if entry["size_bytes"] else "?"
        rows.append((name, entry["version"], size, _cache_status(folder / entry["filename"], entry), entry["description"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def _cache_status(path: Path, entry: dict) -> str:
    """Cheap status (no hashing: the list must be instant); files are verified when used."""
    if not path.is_file():
        partial = path.with_name(path.name + ".part")
        return "partial" if partial.is_file() else "-"
    if entry["size_bytes"] and path.stat().st_size != entry["size_bytes"]:
        return "wrong size"
    return "downloaded"


def run_checkpoints_download(args) -> int:
    from .checkpoints import download, model_entry

    entry = model_entry(args.name)
    with ByteBar(f"{args.name}", entry["size_bytes"]) as bar:
        path = download(args.name, progress=bar.update, timeout=args.timeout, url=args.url)
    print(f"{args.name}: {path} (verified)")
    return 0


def run_checkpoints_verify(args) -> int:
    from .checkpoints import check_version, checkpoint_version, identify, model_entry, read_state_dict, verify

    entry = model_entry(args.model) if args.model else None
    with ByteBar("sha256", Path(args.path).stat().st_size if Path(args.path).is_file() else None) as bar:
        digest = verify(args.path, entry["sha256"] if entry else None, progress=bar.update)
    weights = read_state_dict(args.path, args.model)
    version = checkpoint_version(weights)
    if entry is not None:
        check_version(weights, entry, args.path)
    official = identify(digest)
    print(f"{args.path}")
    print(f"  sha256   {digest}")
    print(f"  weights  SAM2 v{version}, {len(weights)} tensors")
    if official:
        print(f"  matches  the official {official} checkpoint")
    elif entry is not None:
        print(f"  no SHA256 is published for {args.model}: checked structurally only")
    else:
        print("  not an official file of any known model (your own weights?)")
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="segment the bundled MNI152 brain template's white matter (works offline)",
        description=(
            "Segment the white matter of a 24-slice axial slab of the MNI152 T1 template (bundled with "
            "nilearn) from 3 annotated slices, write the inputs, the result and a PNG overlay, and print Dice."
        ),
    )
    parser.add_argument("--out", default="oflsam2-demo", help="output folder (default ./oflsam2-demo)")
    _add_method(parser, "method")
    _add_model_options(parser)
    _add_method_options(parser, "epochs")
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from . import demo

    settings = model_settings(args)
    result = demo.run(Path(args.out), args.method, settings, MethodOptions.preset(args.ofl_preset, epochs=args.epochs), progress_events())
    for path in result["files"]:
        print(f"wrote {path}")
    print(f"Dice vs the MNI152 white-matter map (> {demo.WM_THRESHOLD}): {result['dice']:.3f} "
          f"(on the {result['unannotated_slices']} unannotated slices: {result['dice_unannotated']:.3f})")
    if settings.random_weights:
        print(random_weights_banner())
        print("!! The Dice above comes from an untrained network and means nothing.")
    return 0


# ---------------------------------------------------------------------------------------------
# progress


def progress_events():
    """:class:`~oflsam2.events.Events` that draw one tqdm bar per stage on stderr."""
    from .events import Events

    bars = StageBars()
    return Events(on_progress=bars.update)


class StageBars:
    """One tqdm bar per run stage; a new stage closes the previous bar."""

    def __init__(self, **bar_options):
        self._stage = None
        self._bar = None
        self._bar_options = {"leave": True, **bar_options}

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=stage, file=sys.stderr, mininterval=0.5, **self._bar_options)
        bar = self._bar
        if total != bar.total:
            bar.total = total
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


class ByteBar:
    """A tqdm bar in bytes fed as ``update(done, total)`` (download and hashing progress)."""

    def __init__(self, desc: str, total: int | None):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.5)

    def update(self, done: int, total: int) -> None:
        if total and total != self._bar.total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


# ---------------------------------------------------------------------------------------------
# optional commands and argument types


def _register_optional(commands, command: str, module: str, function: str) -> None:
    """Add a command whose module is optional; if it cannot load, the command says why."""
    try:
        register = getattr(importlib.import_module(f".{module}", __package__), function)
    except (ImportError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        parser = commands.add_parser(command, help=f"(unavailable: {reason})")
        parser.set_defaults(func=lambda args: _unavailable(command, reason))
        return
    register(commands)


def _unavailable(command: str, reason: str) -> int:
    raise OFLSAM2Error(f"The '{command}' command is not available in this installation ({reason}).")


def _slice_list(text: str) -> list[int]:
    from .volume import parse_slices

    try:
        return parse_slices(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _label_list(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give positive label values separated by commas, e.g. 1,3")
        values.append(int(item))
    return values


def _label_names(text: str) -> dict[int, str]:
    """``1=liver,3=left kidney`` -> {1: "liver", 3: "left kidney"}."""
    names = {}
    for item in text.split(","):
        value, _, name = item.partition("=")
        value, name = value.strip(), name.strip()
        if not value.isdigit() or int(value) == 0 or not name or int(value) in names:
            raise argparse.ArgumentTypeError(f"{text!r}: give VALUE=NAME pairs separated by commas, each value once, e.g. 1=liver,3=spleen")
        names[int(value)] = name
    return names


def _reference_pair(text: str) -> tuple[str, str]:
    """``IMG:LABELS`` -> (IMG, LABELS); a Windows drive colon (``C:\\``) is not a separator."""
    separators = [i for i, char in enumerate(text) if char == ":" and not _is_drive_colon(text, i)]
    if len(separators) != 1 or separators[0] in (0, len(text) - 1):
        raise argparse.ArgumentTypeError(f"{text!r}: write the reference as IMAGE:LABELS (two paths joined by ':')")
    return text[: separators[0]], text[separators[0] + 1 :]


def _is_drive_colon(text: str, i: int) -> bool:
    starts_path = i == 1 or (i >= 2 and text[i - 2] == ":")
    return starts_path and text[i - 1].isalpha() and text[i + 1 : i + 2] in ("\\", "/")


def _image_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE or value % 32:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a multiple of 32 from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (SAM2 uses 1024, MedSAM2 512)"
        )
    return value


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least {minimum}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number between 0 and 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
