"""WebDataset tar shards on any fsspec filesystem.

Writing goes through :class:`webdataset.TarWriter` into a local temporary file that is published
whole (:func:`pipeline.storage.open_atomic`). Reading streams through fsspec, so ``s3://`` and
``memory://`` work as well as local paths; webdataset 1.0 has no ``s3://`` opener, so
:func:`register_fsspec_gopen` teaches ``webdataset.gopen`` to open any fsspec URL.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline import storage

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


def iter_tar(url: str) -> Iterator[Sample]:
    """Yield the raw samples of one tar (``__key__``, ``__url__`` and extension -> bytes)."""
    with storage.open_read(url) as stream:
        # group_by_keys needs each file's ``__url__``
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            sample["__url__"] = url
            yield sample


def read_tar(url: str) -> list[Sample]:
    """All samples of one tar, in order."""
    return list(iter_tar(url))


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """A tar in memory (tests and small payloads)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for s in samples:
            sink.write(s)
    return buf.getvalue()
