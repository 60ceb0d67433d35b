"""``oflsam2 checkpoints``: list, download or verify SAM2 checkpoints."""

from __future__ import annotations

from pathlib import Path

from .progress_bars import ByteBar


def add_checkpoints(commands) -> None:
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

    from ..checkpoints import ENV_CHECKPOINT, cache_dir, load_manifest

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
    from ..checkpoints import download, model_entry

    entry = model_entry(args.name)
    with ByteBar(f"{args.name}", entry["size_bytes"]) as bar:
        path = download(args.name, progress=bar.update, timeout=args.timeout, url=args.url)
    print(f"{args.name}: {path} (verified)")
    return 0


def run_checkpoints_verify(args) -> int:
    from ..checkpoints import check_version, checkpoint_version, identify, model_entry, read_state_dict, verify

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
