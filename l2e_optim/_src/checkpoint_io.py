"""Reading and writing safetensors files: sanity checks before parsing, atomic replacement."""

from __future__ import annotations

import contextlib
import os
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .state_dict import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger length is garbage


def read_file(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Header metadata and all tensors (CPU), after checking the file is a sane safetensors file.

    Raises CheckpointError naming ``header`` for an empty, truncated, oversized or corrupt file.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
    except OSError as error:
        raise CheckpointError(f"header: cannot read the file ({error})") from error
    if size == 0:
        raise CheckpointError("header: the file is empty")
    if len(prefix) < 8:
        raise CheckpointError(f"header: truncated ({size} bytes, less than the 8-byte length)")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"header: declares {length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > size:
        raise CheckpointError(f"header: truncated (declares {length} bytes, the file has {size - 8})")
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            header = file.metadata()
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # SafetensorError and friends: corrupt or truncated data
        raise CheckpointError(f"header: not a valid safetensors file, truncated or corrupt ({error})") from error
    return dict(header or {}), tensors


def write_atomically(path: str, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Write a safetensors file to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        # Not created on the fly: a typo in a path should not scatter folders (torch.save agrees).
        raise CheckpointError(f"{path}: the folder {folder} does not exist; create it first (os.makedirs)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write beside it ({error.strerror})") from error
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a folder (Windows).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

