"""How arrays and planes cross the network between a client and ``oflsam2 serve``.

Shared by the server and its clients (the CLI, and the Slicer module, whose Python has numpy and
the standard library only): nothing here imports more. Arrays travel as ``.npy`` files, checked
from their header before a byte of data is read (never a pickle, never more voxels than allowed,
never a file whose length disagrees with its header); result planes travel inside the job's
events as packed bits; every upload is named by its SHA-256, so a damaged or swapped file is
refused and a volume sent once is not sent again for an update.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_BYTES = 16384  # more than numpy itself reads of a header (max_header_size 10000)
ARRAY_KINDS = "biuf"  # bool, integers, floats: every array a run takes
DIGEST = re.compile(r"[0-9a-f]{64}")
ADAPTER_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.(json|safetensors)")
CHUNK = 1 << 20


class TransferError(ValueError):
    """An array or plane that must not be read: malformed, pickled, too large or truncated."""


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # bytes before the array data

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.dtype.itemsize


def npy_header(head: bytes) -> NpyHeader:
    """The header of a ``.npy`` file from its first bytes (at most :data:`NPY_HEADER_BYTES`).

    Raises :class:`TransferError` for anything but a plain numeric array: another format, an
    object or structured dtype (those need pickle), a damaged header.
    """
    if not head.startswith(NPY_MAGIC):
        raise TransferError("not a .npy array file")
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise TransferError(f"unknown .npy format version {version}")
    except TransferError:
        raise
    except Exception as exc:  # numpy says ValueError mostly; a truncated header can end in others
        raise TransferError(f"damaged .npy header ({exc})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in ARRAY_KINDS:
        raise TransferError(f"a .npy array of {dtype} holds Python objects or records (it would need pickle); "
                            "only bool, integer and float arrays are accepted")
    return NpyHeader(tuple(int(n) for n in shape), dtype, bool(fortran_order), stream.tell())


def check_npy_file(path, max_voxels: int) -> NpyHeader:
    """The header of the ``.npy`` file ``path``, refused (:class:`TransferError`) when it is not a
    plain numeric array of at most ``max_voxels`` voxels whose data fills the rest of the file exactly."""
    path = Path(path)
    with open(path, "rb") as handle:
        header = npy_header(handle.read(NPY_HEADER_BYTES))
    if header.voxels > max_voxels:
        raise TransferError(f"an array of shape {header.shape} has {header.voxels} voxels, more than the "
                            f"{max_voxels} this server accepts")
    size = path.stat().st_size
    if size != header.data_offset + header.data_bytes:
        raise TransferError(f"the .npy file holds {size - header.data_offset} bytes of data, its header "
                            f"({header.shape}, {header.dtype}) says {header.data_bytes}")
    return header


def load_npy(path, max_voxels: int) -> np.ndarray:
    """``path`` as an array once :func:`check_npy_file` accepted it (never unpickled)."""
    check_npy_file(path, max_voxels)
    return np.load(path, allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def pack_plane(plane: np.ndarray) -> dict:
    """A 2-D 0/1 plane as ``{"shape": [h, w], "bits": base64 of the packed bits}``."""
    plane = np.asarray(plane)
    if plane.ndim != 2:
        raise TransferError(f"a result plane must be 2-D; got shape {plane.shape}")
    bits = np.packbits(plane.astype(bool).ravel())
    return {"shape": [int(n) for n in plane.shape], "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def unpack_plane(packed: dict, max_pixels: int) -> np.ndarray:
    """The uint8 0/1 plane of :func:`pack_plane`; its size is checked before it is decoded."""
    try:
        height, width = (int(n) for n in packed["shape"])
        text = packed["bits"]
    except (KeyError, TypeError, ValueError):
        raise TransferError("a result plane lacks its shape or bits") from None
    if height < 1 or width < 1 or height * width > max_pixels:
        raise TransferError(f"a result plane of shape {(height, width)} does not fit the volume")
    expected = (height * width + 7) // 8
    if not isinstance(text, str) or len(text) != 4 * ((expected + 2) // 3):
        raise TransferError("a result plane's bits do not match its shape")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise TransferError("a result plane's bits are not base64") from None
    if len(raw) != expected:
        raise TransferError("a result plane's bits do not match its shape")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width)


def sha256_of(source) -> str:
    """SHA-256 (hex) of ``bytes`` or of the file at a path."""
    digest = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(source)
        return digest.hexdigest()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def protocol_mismatch(client_protocol, server_protocol, client_version: str, server_version: str) -> str:
    """The one message both sides give when their protocol versions differ."""
    return (f"This OFLSAM2 client speaks protocol {client_protocol} (version {client_version}), the server protocol "
            f"{server_protocol} (version {server_version}). Install the same OFLSAM2 version on both: update the "
            "Slicer extension or the oflsam2 package on this computer, or the server.")
