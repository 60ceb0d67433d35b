"""SAM2 checkpoints: the model manifest, the user cache, verified downloads and file checks.

Where a checkpoint comes from, in order: an explicit path (``--checkpoint``), the environment
variable ``OFLSAM2_CHECKPOINT``, then the cached download in :func:`cache_dir`. A cached file
must match the manifest's SHA256 (when one is published). A file the user names explicitly may
be their own fine-tuned weights, so a hash that differs from the official one is only logged;
every file is also checked structurally by :func:`read_state_dict` before use.

Downloads stream into ``<file>.part`` in the cache folder, resume with an HTTP Range request,
and are renamed into place only after the hash matched, so the cache never holds a bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .errors import Cancelled, CheckpointError, InputError

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("models.json")
ENV_CACHE_DIR = "OFLSAM2_CACHE_DIR"
ENV_CHECKPOINT = "OFLSAM2_CHECKPOINT"
# A mirror that serves the manifest's file names (an institute's server, or a test server).
ENV_DOWNLOAD_BASE = "OFLSAM2_DOWNLOAD_BASE"
DEFAULT_TIMEOUT = 15.0  # seconds for connecting and for each read: fail fast when offline
CHUNK_BYTES = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, total bytes; 0 when unknown)

# sha256 of files already hashed in this process, keyed by (path, size, mtime): the backend
# hashes the checkpoint again for its weights id, and large files take seconds.
_digests: dict[tuple[str, int, int], str] = {}


def load_manifest() -> dict[str, dict]:
    """Model name -> entry (``description, version, config, filename, url, sha256,
    size_bytes, image_size, license, _source``) from ``models.json``."""
    with open(MANIFEST_PATH, encoding="utf-8") as handle:
        return json.load(handle)["models"]


def model_entry(name: str) -> dict:
    """The manifest entry of ``name``; an unknown name is an :class:`InputError`."""
    manifest = load_manifest()
    if name not in manifest:
        raise InputError(f"Unknown model {name!r}; choose one of: {', '.join(manifest)}.")
    return manifest[name]


def cache_dir() -> Path:
    """The folder for downloaded checkpoints (not created here).

    ``$OFLSAM2_CACHE_DIR`` if set; else the platform's per-user cache: ``%LOCALAPPDATA%`` on
    Windows, ``~/Library/Caches`` on macOS, ``$XDG_CACHE_HOME`` or ``~/.cache`` elsewhere,
    each followed by ``oflsam2/checkpoints``. Never inside the installed package.
    """
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "oflsam2" / "checkpoints"


def cached_path(name: str) -> Path:
    """Where the download of ``name`` lives (whether or not it is there yet)."""
    return cache_dir() / model_entry(name)["filename"]


def resolve_checkpoint(name: str, path=None) -> Path:
    """The checkpoint file to load for model ``name``.

    ``path`` (the user's file) wins, then ``$OFLSAM2_CHECKPOINT``, then the cached download,
    which must match the manifest's SHA256. Raises :class:`CheckpointError` with the way to
    get the file when there is none.
    """
    entry = model_entry(name)
    explicit, origin = (path, "--checkpoint") if path else (os.environ.get(ENV_CHECKPOINT), ENV_CHECKPOINT)
    if explicit:
        chosen = Path(explicit).expanduser()
        if not chosen.is_file():
            raise CheckpointError(
                f"The checkpoint file {chosen} (from {origin}) does not exist or is not a file. "
                f"Fix the path, or remove it to use the cached download of {name!r}."
            )
        _note_unofficial(chosen, name, entry)
        return chosen
    cached = cache_dir() / entry["filename"]
    if not cached.is_file():
        raise CheckpointError(missing_message(name))
    if entry["sha256"] and sha256_file(cached) != entry["sha256"]:
        raise CheckpointError(
            f"The cached checkpoint {cached} is damaged (its SHA256 is not the published one). "
            f"Replace it with `oflsam2 checkpoints download {name}`, or put a good copy of "
            f"{entry['filename']} from {entry['url']} there."
        )
    return cached


def missing_message(name: str) -> str:
    """What to do when the checkpoint of ``name`` is not on this computer."""
    entry = model_entry(name)
    return (
        f"The SAM2 checkpoint for model {name!r} is not on this computer. Download it "
        f"({_size_text(entry['size_bytes'])}) with `oflsam2 checkpoints download {name}`, or, "
        f"without internet access, fetch {entry['filename']} from {entry['url']} on another "
        f"computer and put it in the folder {cache_dir()} (or give its path with --checkpoint "
        f"or the {ENV_CHECKPOINT} environment variable)."
    )


def sha256_file(path, progress: Progress | None = None) -> str:
    """Hex SHA256 of a file, read in 1 MiB chunks; ``progress(done, total)`` after each."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _digests:
        if progress is not None:
            progress(stat.st_size, stat.st_size)
        return _digests[key]
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, stat.st_size)
    _digests[key] = digest.hexdigest()
    return _digests[key]


def verify(path, expected_sha256: str | None, progress: Progress | None = None) -> str:
    """Hash ``path`` and compare it with ``expected_sha256``; returns the file's hash.

    ``expected_sha256=None`` (no published hash) only computes it. A mismatch raises
    :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint file {path} does not exist or is not a file.")
    actual = sha256_file(path, progress)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise CheckpointError(
            f"{path} has SHA256 {actual}, but {expected_sha256} was expected: the file is "
            "damaged, incomplete or a different file. Download it again."
        )
    return actual


def identify(digest: str) -> str | None:
    """The manifest model whose published SHA256 is ``digest``, if any."""
    return next((name for name, entry in load_manifest().items() if entry["sha256"] == digest), None)


def download(
    name: str,
    progress: Progress | None = None,
    cancel=None,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
) -> Path:
    """Download the checkpoint of ``name`` into :func:`cache_dir` and return its path.

    The source is ``url``, else ``$OFLSAM2_DOWNLOAD_BASE/<filename>``, else the manifest URL.
    A verified file already in the cache is returned at once. ``cancel`` is anything with
    ``is_cancelled()`` (a :class:`~oflsam2.events.CancelToken`); cancelling raises
    :class:`Cancelled` and keeps the partial file, which the next call resumes.
    """
    entry = model_entry(name)
    target = cache_dir() / entry["filename"]
    if target.is_file() and _is_good(target, entry):
        return target
    source = url or _mirror_url(entry["filename"]) or entry["url"]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"Cannot create the checkpoint folder {target.parent} ({exc.strerror}); set "
            f"{ENV_CACHE_DIR} to a writable folder."
        ) from exc
    part = target.with_name(target.name + ".part")
    digest = _fetch(source, part, name, entry, progress, cancel, timeout)
    if entry["sha256"]:
        if digest != entry["sha256"]:
            part.unlink()
            raise CheckpointError(
                f"The file downloaded from {source} has SHA256 {digest}, not the published "
                f"{entry['sha256']}; it was deleted. Try again; if it happens again, the server "
                f"sent a different file: download {entry['filename']} from {entry['url']} yourself "
                f"and put it in {target.parent}."
            )
    else:
        try:
            check_version(read_state_dict(part), entry, part)
        except CheckpointError as exc:
            part.unlink()
            raise CheckpointError(f"The file downloaded from {source} was deleted: {exc}") from exc
    os.replace(part, target)
    stat = target.stat()
    _digests[(str(target.resolve()), stat.st_size, stat.st_mtime_ns)] = digest
    return target


def read_state_dict(path, model: str | None = None) -> dict:
    """The ``model`` weights (name -> tensor) of a SAM2 ``.pt`` checkpoint, loaded on the CPU.

    Loads with ``weights_only=True`` (no arbitrary code from the file). A missing, truncated
    or non-PyTorch file, one that is not a SAM2 checkpoint, or weights holding NaN or infinite
    values raise :class:`CheckpointError`.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint file {path} does not exist or is not a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError...
        if "Weights only load failed" in str(exc):  # torch's text goes on to suggest weights_only=False: never
            reason = ("it is not a plain file of weights (another kind of file, or Python objects, which are never "
                      "loaded: they could run code)")
        else:
            detail = _first_line(exc)
            reason = "it may be truncated by an interrupted download, or not a .pt file" + (
                f" ({type(exc).__name__}: {detail})" if len(detail) <= 100 else ""
            )
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {reason}. Download it again with "
            f"`oflsam2 checkpoints download {model or 'NAME'}` (names: `oflsam2 checkpoints list`), or check the path."
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is a PyTorch file but not a SAM2 checkpoint: it has no 'model' weights "
            f"(found {found}). Use an official SAM2 .pt file (`oflsam2 checkpoints list`) or a "
            "checkpoint saved by SAM2's training code."
        )
    weights = state["model"]
    if not any(key.startswith("image_encoder.") for key in weights) or not any(
        key.startswith("sam_mask_decoder.") for key in weights
    ):
        raise CheckpointError(
            f"{path} holds model weights, but not SAM2's (no image_encoder / sam_mask_decoder "
            "weights). Use an official SAM2 .pt file (`oflsam2 checkpoints list`)."
        )
    broken = [key for key, value in weights.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:  # such a network runs to the end and predicts nothing
        raise CheckpointError(
            f"{path} holds {len(broken)} weight tensor(s) with NaN or infinite values (e.g. {broken[0]!r}): the file is "
            f"damaged, or was saved by a training run that diverged. Download it again with `oflsam2 checkpoints "
            f"download {model or 'NAME'}`, or use another checkpoint."
        )
    return weights


def checkpoint_version(state_dict) -> str:
    """``"2.1"`` for SAM 2.1 weights (they add ``no_obj_embed_spatial`` and
    ``obj_ptr_tpos_proj``), else ``"1"``."""
    if "no_obj_embed_spatial" in state_dict or any(key.startswith("obj_ptr_tpos_proj.") for key in state_dict):
        return "2.1"
    return "1"


def check_version(state_dict, entry: dict, path) -> None:
    """Refuse weights of the other SAM2 generation than the manifest entry's."""
    found = checkpoint_version(state_dict)
    if found != entry["version"]:
        raise CheckpointError(
            f"{path} holds SAM2 v{found} weights, but this model is SAM2 v{entry['version']}; "
            f"choose a {'sam2.1-' if found == '2.1' else 'sam2-'}... model that matches the file."
        )


def _fetch(source, part: Path, name, entry, progress, cancel, timeout) -> str:
    """Stream ``source`` into ``part`` (resuming it when the server honours Range); returns
    the SHA256 of the whole file."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(source, headers={"User-Agent": "oflsam2"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is not a prefix the server knows
            part.unlink()
            return _fetch(source, part, name, entry, progress, cancel, timeout)
        raise CheckpointError(_unreachable(name, entry, source, f"HTTP {exc.code} {exc.reason}")) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(_unreachable(name, entry, source, _reason(exc))) from exc
    with response:
        resumed = offset and response.status == 206 and _range_start(response) == offset
        if not resumed:
            offset = 0  # the server sent the whole file: start over cleanly
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else (entry["size_bytes"] or 0)
        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as existing:
                while chunk := existing.read(CHUNK_BYTES):
                    digest.update(chunk)
        done = offset
        with open(part, "ab" if resumed else "wb") as handle:
            if progress is not None:
                progress(done, total)
            while True:
                if cancel is not None and cancel.is_cancelled():
                    raise Cancelled(
                        f"Download cancelled; the partial file {part} is kept and the next "
                        f"`oflsam2 checkpoints download {name}` resumes it."
                    )
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, socket.timeout) as exc:
                    raise CheckpointError(_interrupted(name, entry, part, _reason(exc))) from exc
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if length and length.isdigit() and done != total:
        raise CheckpointError(_interrupted(name, entry, part, f"got {done} of {total} bytes"))
    return digest.hexdigest()


def _is_good(path: Path, entry: dict) -> bool:
    if entry["sha256"]:
        return sha256_file(path) == entry["sha256"]
    try:
        check_version(read_state_dict(path), entry, path)
    except CheckpointError:
        return False
    return True


def _note_unofficial(path: Path, name: str, entry: dict) -> None:
    """A user's file with another hash may be their own fine-tune: say so, don't refuse it."""
    if entry["sha256"] and path.name == entry["filename"] and sha256_file(path) != entry["sha256"]:
        log.warning(
            "%s is not the official %s file (its SHA256 differs); using it as your own weights. "
            "If it should be the official file, download it again.",
            path,
            name,
        )


def _mirror_url(filename: str) -> str | None:
    base = os.environ.get(ENV_DOWNLOAD_BASE)
    return f"{base.rstrip('/')}/{filename}" if base else None


def _range_start(response) -> int | None:
    """The first byte of a 206 response's ``Content-Range: bytes START-END/TOTAL``."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _unreachable(name: str, entry: dict, source: str, reason: str) -> str:
    return (
        f"Could not download the {name!r} checkpoint from {source} ({reason}). If this computer "
        f"is offline or behind a firewall, download {entry['filename']} ({_size_text(entry['size_bytes'])}) "
        f"from {entry['url']} on another computer and put it in the folder {cache_dir()}, or give "
        f"its path with --checkpoint or {ENV_CHECKPOINT}."
    )


def _interrupted(name: str, entry: dict, part: Path, reason: str) -> str:
    return (
        f"The download of {entry['filename']} was interrupted ({reason}). The partial file "
        f"{part} is kept: run `oflsam2 checkpoints download {name}` again to resume, or put a "
        f"complete copy from {entry['url']} in the folder {part.parent}."
    )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return str(reason) or type(reason).__name__


def _size_text(size_bytes: int | None) -> str:
    return f"{size_bytes / 1e6:.0f} MB" if size_bytes else "size not published"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
