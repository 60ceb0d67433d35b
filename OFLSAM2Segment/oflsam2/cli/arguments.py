"""The argument groups and argument types the subcommands share (inputs, method, model, server)."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..settings import DEFAULT_METHOD, DEVICES, MAX_IMAGE_SIZE, METHODS, MIN_IMAGE_SIZE, OFL_PRESETS, REVSAM2_MODES, MethodOptions


def add_inputs(parser, support_required: bool) -> None:
    parser.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, MetaImage, DICOM file or folder)")
    parser.add_argument(
        "--support", required=support_required, help="label map on the image's grid with the annotated slices"
    )
    parser.add_argument("--support-slices", type=slice_list, help="use only these annotated slices, e.g. 12,20,30-33")
    parser.add_argument("--labels", type=label_list, help="label values to segment, e.g. 1,3 (default: all in the support)")
    parser.add_argument(
        "--label-names", type=label_names, metavar="V=NAME,...",
        help="names of the labels, e.g. 1=liver,3=spleen: the output's segments and the adapters are named so, and a "
        "named label uses the adapter of its name (default: label_V, which uses the adapter saved for value V)",
    )
    parser.add_argument(
        "--reference", action="append", default=[], type=reference_pair, metavar="IMG:LABELS",
        help="another image and its label map used as extra support (repeatable)",
    )
    parser.add_argument("--axis", choices=("auto", "axial", "coronal", "sagittal"), default="auto", help="slice axis (default auto)")
    parser.add_argument(
        "--preset", default="auto",
        help="intensity preset: auto, ct-abdomen, ct-soft, ct-lung, ct-bone, mr, minmax, window:LO,HI, percentile:A,B",
    )


def add_method(parser, what: str) -> None:
    """``--method``: the engine's registry, OFL-SAM2 unless told otherwise."""
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"{what} (default %(default)s)")


def add_method_options(parser, *fields: str) -> None:
    """A flag for each named :class:`~oflsam2.settings.MethodOptions` field, its default taken from there."""
    flags = {  # field -> (argparse type or choices, help)
        "epochs": (at_least(0), "OFL-SAM2 training epochs"),
        "gamma": (fraction, "OFL-SAM2 confidence gate"),
        "num_retrieved": (at_least(1), "OFL-SAM2 support memories retrieved per slice"),
        "top_k": (at_least(1), "RevSAM2 supports kept per query"),
        "revsam2_mode": (REVSAM2_MODES, "RevSAM2 variant"),
        "seed": (int, "random seed"),
        "warm_start_epochs": (
            at_least(0), "OFL-SAM2 epochs when a trained adapter is refined (--adapter with support, or an update), "
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
        "--ofl-preset", choices=OFL_PRESETS, default=None,
        help="OFL-SAM2 as its paper states it, or with the project's extensions (docs/methods.md; the options "
        "above apply on top); --method ofl only (default paper)",
    )


def add_model_options(parser) -> None:
    from ..checkpoints import load_manifest

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", choices=list(load_manifest()),
        help="SAM2 model (default: the method's paper backbone, sam2.1-base-plus for ofl and train, sam2.1-tiny otherwise)",
    )
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="local checkpoint file (default: the verified cached download)")
    weights.add_argument("--random-weights", action="store_true", help="untrained SAM2 (tests and smoke runs only: masks are meaningless)")
    group.add_argument(
        "--image-size", type=image_size,
        help="SAM2 input size, a multiple of 32 from 256 to 2048 (default: the model's own, 1024; 512 for medsam2)",
    )
    group.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default %(default)s)")
    group.add_argument(
        "--deterministic", action="store_true",
        help="deterministic kernels and one CPU thread: the same result whatever the thread count (slower)",
    )


def add_server_options(parser) -> None:
    group = parser.add_argument_group("compute on a server (oflsam2 serve)")
    group.add_argument("--server", metavar="URL", help="run on this server, e.g. https://gpu-box:8765 (default: $OFLSAM2_SERVER)")
    group.add_argument("--token-file", metavar="FILE", help="file holding the server's token (default: $OFLSAM2_TOKEN_FILE)")
    group.add_argument("--server-ca", metavar="FILE", help="CA certificate the server's TLS certificate is signed by "
                       "(a self-signed server; default: $OFLSAM2_SERVER_CA, else the system's)")


def slice_list(text: str) -> list[int]:
    from ..volume import parse_slices

    try:
        return parse_slices(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def label_list(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give positive label values separated by commas, e.g. 1,3")
        values.append(int(item))
    return values


def label_names(text: str) -> dict[int, str]:
    """``1=liver,3=left kidney`` -> {1: "liver", 3: "left kidney"}."""
    names = {}
    for item in text.split(","):
        value, _, name = item.partition("=")
        value, name = value.strip(), name.strip()
        if not value.isdigit() or int(value) == 0 or not name or int(value) in names:
            raise argparse.ArgumentTypeError(f"{text!r}: give VALUE=NAME pairs separated by commas, each value once, e.g. 1=liver,3=spleen")
        names[int(value)] = name
    return names


def reference_pair(text: str) -> tuple[str, str]:
    """``IMG:LABELS`` -> (IMG, LABELS); a Windows drive colon (``C:\\``) is not a separator."""
    separators = [i for i, char in enumerate(text) if char == ":" and not _is_drive_colon(text, i)]
    if len(separators) != 1 or separators[0] in (0, len(text) - 1):
        raise argparse.ArgumentTypeError(f"{text!r}: write the reference as IMAGE:LABELS (two paths joined by ':')")
    return text[: separators[0]], text[separators[0] + 1 :]


def _is_drive_colon(text: str, i: int) -> bool:
    starts_path = i == 1 or (i >= 2 and text[i - 2] == ":")
    return starts_path and text[i - 1].isalpha() and text[i + 1 : i + 2] in ("\\", "/")


def image_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE or value % 32:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a multiple of 32 from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (SAM2 uses 1024, MedSAM2 512)"
        )
    return value


def at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least {minimum}")
        return value

    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number between 0 and 1")
    return value


def ofl_preset(args) -> str:
    """``--ofl-preset`` (``paper`` unless given); refused with another method, which would ignore it."""
    method = getattr(args, "method", "ofl")
    if args.ofl_preset is not None and method != "ofl":
        raise InputError(f"--ofl-preset applies to OFL-SAM2 only; method {method!r} would ignore it. "
                         "Leave it out, or use --method ofl.")
    return args.ofl_preset or OFL_PRESETS[0]
