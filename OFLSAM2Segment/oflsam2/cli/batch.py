"""``oflsam2 batch``: segment a folder or CSV manifest of volumes, resumable, one row per case."""

from __future__ import annotations

import json
import sys

from ..errors import InputError
from .engine_options import closing_engine, engine_for_args, method_options, model_settings, random_weights_banner
from .progress_bars import StageBars

EXIT_SOME_FAILED = 1
# segment's options that name one case's files or review one run; batch has its own (INPUT, --support-dir, --out).
_PER_CASE_OPTIONS = {"help", "image", "support", "out", "seg_nrrd", "save_adapter", "quality_out", "suggest", "save_state", "previous"}


def add_batch(commands) -> None:
    """``batch``: every ``segment`` option (copied from its parser, so none is forgotten) plus the cohort's own."""
    import copy

    from ..batch import CASES_FILE, OUTPUT_SUFFIX
    from ..executors import add_executor_options

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
    from ..batch import BatchJob, check_job, collect_cases, run_batch
    from ..executors import LocalExecutor, make_executor

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
    with closing_engine(engine), executor, _BatchBars(len(cases), show) as bars:
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
        from ..events import Events

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
