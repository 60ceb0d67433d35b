"""The ``oflsam2`` command: dispatches to one module per subcommand (segment, batch, train,
checkpoints, demo; eval, experiment and serve from their engine packages).

Problems the user can fix (:class:`~oflsam2.errors.OFLSAM2Error`) print ``error: <message>``
and exit with status 2; a cancelled or interrupted run exits with 130 (143 after SIGTERM).
Progress goes to stderr as one tqdm bar per stage; results go to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from ..errors import Cancelled, OFLSAM2Error
from ..version import __version__
from . import batch, checkpoints, demo, segment, train

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
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
    logger = logging.getLogger("oflsam2")
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
    segment.add_segment(commands)
    batch.add_batch(commands)
    train.add_train(commands)
    checkpoints.add_checkpoints(commands)
    demo.add_demo(commands)
    for command, module, function in _OPTIONAL_COMMANDS:
        _register_optional(commands, command, module, function)
    return parser


def _register_optional(commands, command: str, module: str, function: str) -> None:
    """Add a command whose module is optional; if it cannot load, the command says why."""
    try:
        register = getattr(importlib.import_module(f"..{module}", __package__), function)
    except (ImportError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        parser = commands.add_parser(command, help=f"(unavailable: {reason})")
        parser.set_defaults(func=lambda args: _unavailable(command, reason))
        return
    register(commands)


def _unavailable(command: str, reason: str) -> int:
    raise OFLSAM2Error(f"The '{command}' command is not available in this installation ({reason}).")
