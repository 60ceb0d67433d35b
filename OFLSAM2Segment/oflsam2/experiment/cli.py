"""``oflsam2 experiment CONFIG``: the subcommand's options and handler."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..pipeline import refuse_inputs_as_output
from .config import load_config
from .run import cached_volumes, run_experiment
from .tables import results_markdown


def register_experiment_command(subparsers) -> None:
    """Add ``experiment CONFIG [CONFIG ...] [--out DIR] [--data-root DIR] [--random-weights] [--device D] [--executor E]``."""
    from ..executors import add_executor_options

    parser = subparsers.add_parser(
        "experiment",
        help="run a few-shot experiment described by a YAML file (resumable)",
        description="Run every support group x query case x method of an experiment file, score the results and "
        "write per-case files plus a table of mean ± std over groups. Finished cases are skipped on a re-run.",
    )
    parser.add_argument("config", nargs="+", help="experiment YAML file(s) (see Resources/experiments/), run one after the other")
    parser.add_argument("--out", help="output folder (default: results/<name> in the working folder; with several files, DIR/<name>)")
    parser.add_argument("--data-root", help="folder the case paths are relative to (replaces data_root of the file; one file only)")
    parser.add_argument("--random-weights", action="store_true", default=None, help="untrained SAM2: smoke tests only")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), help="where to run SAM2 (default: the file's, else auto)")
    parser.add_argument("--no-montage", action="store_true", help="skip the PNG montages")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_options(parser)
    parser.set_defaults(func=run_experiment_command)


def run_experiment_command(args) -> int:
    """Handler of ``oflsam2 experiment``; raises :class:`InputError` for a bad config. Every
    file is checked before the first one runs."""
    from ..executors import make_executor

    if args.data_root is not None and len(args.config) > 1:
        raise InputError("--data-root applies to one experiment file; with several, set each file's data folder variable.")
    configs = [load_config(path, data_root=args.data_root, random_weights=args.random_weights, device=args.device)
               for path in args.config]
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise InputError(f"The experiment files share a name ({', '.join(names)}); their results would mix. Rename one.")
    outs = []
    for config in configs:
        if args.no_montage:
            config.montage = False
        out = (Path(args.out) / config.name if len(configs) > 1 else Path(args.out)) if args.out else Path("results") / config.name
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; the experiment writes a folder. Give a folder name.")
        refuse_inputs_as_output(out, [config.path, *(p for case in config.cases.values() for p in (case.image, case.label))])
        outs.append(out)
    for config, out in zip(configs, outs):
        executor = make_executor(
            args.executor, config.model, max_cached_volumes=cached_volumes(config), address=args.address, workers=args.workers
        )
        with executor:
            outcome = run_experiment(config, out, progress=not args.quiet, executor=executor)
        print(results_markdown(config, outcome.results))
        print(f"{outcome.computed} case run(s) computed, {outcome.skipped} found finished; results in {out}")
    return 0
