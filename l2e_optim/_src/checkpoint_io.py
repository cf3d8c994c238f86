"""Reading and writing safetensors files: sanity checks before parsing, a CRC-32 of every
tensor, atomic replacement.

Checksums: validation catches a flipped byte that makes a value NaN, negative or absurd, but not
one that turns 0.1 into 0.1000001. The header's ``checksums`` entry (JSON ``{key: crc32 hex}``)
lets the loader refuse any byte changed since the write, at ~0.6 GB/s on one core (well under
the cost of writing the file). It detects accidents (bit rot, truncated copies), not tampering:
anyone can recompute it, and what makes a hostile file harmless is that loading runs no code.
Files without the entry (older writers) load unchecked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import uuid
import zlib
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .state_dict import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger length is garbage
CHECKSUMS = "checksums"


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
            # Cloned: get_tensor's tensors view the memory-mapped file, and the loaded state would
            # keep viewing it (AdamW keeps a tensor of the right dtype as it is): a later in-place
            # rewrite or truncation of the file would then crash training with SIGBUS.
            tensors = {key: file.get_tensor(key).clone() for key in file.keys()}
    except Exception as error:  # SafetensorError and friends: corrupt or truncated data
        raise CheckpointError(f"header: not a valid safetensors file, truncated or corrupt ({error})") from error
    header = dict(header or {})
    if CHECKSUMS in header:
        _verify(header.pop(CHECKSUMS), tensors)
    return header, tensors


def checksum(tensor: Tensor) -> str:
    """CRC-32 of a contiguous CPU tensor's bytes, as 8 hex digits."""
    data: Any = tensor.reshape(-1).view(torch.uint8).numpy()  # no copy: zlib reads the buffer
    return f"{zlib.crc32(data):08x}"


def _verify(entry: str, tensors: dict[str, Tensor]) -> None:
    try:
        sums = json.loads(entry)
    except ValueError as error:
        raise CheckpointError(f"{CHECKSUMS}: invalid JSON in the header ({error})") from error
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise CheckpointError(f"{CHECKSUMS}: does not list exactly the file's tensors; the header is corrupt")
    for key in sorted(tensors):
        if sums[key] != checksum(tensors[key]):
            raise CheckpointError(
                f"{key}: checksum mismatch: the file changed since it was written (disk or copy "
                "corruption); use another copy of the checkpoint"
            )


def write_atomically(path: str, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Write a safetensors file to a temporary file beside ``path``, fsync it, rename it over ``path``.

    The file gets the mode ``torch.save`` gives (0666 less the umask). Temporary files that
    earlier saves of ``path`` left behind when their process was killed are removed first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        # Not created on the fly: a typo in a path should not scatter folders (torch.save agrees).
        raise CheckpointError(f"{path}: the folder {folder} does not exist; create it first (os.makedirs)")
    header = dict(header, **{CHECKSUMS: json.dumps({key: checksum(t) for key, t in tensors.items()})})
    remove_stale_temporaries(path)
    tmp = os.path.join(folder, _temporary_name(path, os.getpid()))
    # O_EXCL on a fresh unique name, mode 0o666 less the umask, as open() and torch.save create
    # files (mkstemp gives 0600); save_file may recreate the file, so the mode is set again.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write beside it ({error.strerror})") from error
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _temporary_name(path: str, pid: int) -> str:
    # Host and pid in the name: a later save can tell a dead writer's file from a live one's.
    return f".{os.path.basename(path)}.{_host()}.{pid}.{uuid.uuid4().hex[:8]}.tmp"


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove temporary files of ``path`` whose writer (this host, that pid) is no longer alive.

    A SIGKILL mid-save leaves its temporary file; nothing ever reads one (the loader opens
    ``path`` only). Files of live writers, of other hosts (a shared filesystem) or of another
    naming are left alone. Returns the names removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.{_host()}."
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            pid = name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a folder (Windows).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

