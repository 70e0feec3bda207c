"""WebDataset tar shards on any fsspec filesystem.

Writing goes through :class:`webdataset.TarWriter` into a local temporary file that is published
whole (:func:`dataengine.pipeline.core.storage.open_atomic`); the sharding stage's image tars, whose
samples are bytes already, go through :class:`BytesTarWriter` (the same members, written faster).
Reading streams through fsspec, so ``s3://`` and ``memory://`` work as well as local paths;
webdataset 1.0 has no ``s3://`` opener, so :func:`register_fsspec_gopen` teaches
``webdataset.gopen`` to open any fsspec URL.
"""

from __future__ import annotations

import io
import logging
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from dataengine.pipeline.core import storage

logger = logging.getLogger(__name__)
# ``webdataset.gopen`` is shadowed by the function of that name; take the module itself.
_gopen = sys.modules["webdataset.gopen"]

Sample = dict[str, Any]
FSSPEC_SCHEMES = ("s3", "s3a", "memory", "file", "gcs", "abfs", "az")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    if mode[0] != "r":
        raise ValueError(f"{url}: dataengine opens shards for reading only through gopen")
    return storage.open_read(url)


def register_fsspec_gopen() -> None:
    """Let ``webdataset.WebDataset`` open ``s3://``, ``memory://`` ... URLs through fsspec."""
    for scheme in FSSPEC_SCHEMES:
        _gopen.gopen_schemes[scheme] = _fsspec_gopen


register_fsspec_gopen()


def write_tar(url: str, samples: Iterable[Sample]) -> int:
    """Write ``samples`` (dicts with ``__key__`` and extension -> bytes/str/obj) to one tar at
    ``url``, published atomically. Returns the number of samples written."""
    n = 0
    with storage.open_atomic(url) as f:
        with wds.TarWriter(f) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
    return n


def create_tar(url: str, samples: Iterable[Sample]) -> tuple[bool, int]:
    """Write ``samples`` to one tar published at ``url`` only if nothing is there yet
    (:class:`storage.Staged`). Returns (created, samples written)."""
    n = 0
    with storage.Staged(url) as staged:
        with wds.TarWriter(staged.file) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
        return staged.create(), n


class BytesTarWriter:
    """Sequential ustar writer for samples whose values are already bytes (image shards): the
    members ``webdataset.TarWriter`` writes, without its per-sample encoder pass and
    ``tarfile``'s copy loop (measured: 0.07 vs 0.17-0.22 ms per image). Members are written in
    sorted extension order, mode 0444, owner ``bigdata``, as webdataset does."""

    def __init__(self, fileobj: Any, mtime: float | None = None) -> None:
        self.f = fileobj
        self.mtime = time.time() if mtime is None else mtime

    def write(self, sample: Sample) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            value = sample[ext]
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext}: BytesTarWriter takes bytes, not "
                                 f"{type(value).__name__}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(value), self.mtime, 0o444
            info.uname = info.gname = "bigdata"
            self.f.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self.f.write(value)
            pad = -len(value) % tarfile.BLOCKSIZE
            if pad:
                self.f.write(b"\0" * pad)

    def close(self) -> None:
        """The end-of-archive marker: two zero blocks."""
        self.f.write(b"\0" * (2 * tarfile.BLOCKSIZE))

    def __enter__(self) -> BytesTarWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()


def iter_tar(url: str) -> Iterator[Sample]:
    """Yield the raw samples of one tar (``__key__``, ``__url__`` and extension -> bytes)."""
    with storage.open_read(url) as stream:
        # group_by_keys needs each file's ``__url__``
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            sample["__url__"] = url
            yield sample


def npy_bytes(array: Any) -> bytes:
    """``.npy`` bytes of a numeric array (never pickled)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> Any:
    """The array of ``.npy`` bytes, read with ``allow_pickle=False``."""
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)
