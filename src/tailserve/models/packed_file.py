"""A packed model on disk: its structure pickled, its arrays raw and 64-byte aligned after it, read
back as read-only views of one memory map. Pages come in as the first steps read them, shared by every
process serving the same file, and neither writing nor reading needs PyTorch (torch.save and
torch.load did: ~1 s of `import torch` on every start).

Layout: magic, the pickle's length (8 bytes, little-endian), the pickle, zeros to a multiple of 64,
then the arrays. In the pickle each array is a reference (dtype, shape, offset from the data's start).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"TSPACK01"
ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Writer(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays: list[np.ndarray] = []
        self.size = 0

    def persistent_id(self, obj: Any) -> tuple | None:
        if not isinstance(obj, np.ndarray):
            return None
        a = np.ascontiguousarray(obj)
        ref = ("array", a.dtype.str, a.shape, self.size)
        self.arrays.append(a)
        self.size = _aligned(self.size + a.nbytes)
        return ref


class _Reader(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, data: mmap.mmap, start: int) -> None:
        super().__init__(file)
        self.data, self.start = data, start

    def persistent_load(self, pid: tuple) -> np.ndarray:
        kind, dtype, shape, offset = pid
        if kind != "array":
            raise pickle.UnpicklingError(f"unknown reference {kind!r}")
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.data, np.dtype(dtype), count, self.start + offset).reshape(shape)


def save(obj: Any, path: Path) -> None:
    """`obj` (any picklable structure holding numpy arrays) to `path`, atomically."""
    buf = io.BytesIO()
    writer = _Writer(buf)
    writer.dump(obj)
    head = buf.getvalue()
    start = _aligned(len(MAGIC) + 8 + len(head))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(head).to_bytes(8, "little") + head)
        f.write(b"\0" * (start - f.tell()))
        for a in writer.arrays:
            f.write(a.data)
            f.write(b"\0" * (_aligned(f.tell() - start) - (f.tell() - start)))
    tmp.replace(path)


def load(path: Path) -> Any:
    """The structure `save` wrote, its arrays read-only views of the file's memory map."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a packed model file")
    n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    head = data[len(MAGIC) + 8 : len(MAGIC) + 8 + n]
    return _Reader(io.BytesIO(head), data, _aligned(len(MAGIC) + 8 + n)).load()
