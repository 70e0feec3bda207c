"""Random access to single samples inside WebDataset tars without reading the whole shard.

The first access to a tar scans its member headers once (seeking over the payloads) and keeps a
``member name -> (offset, size)`` table in memory and in the private on-disk cache
(:class:`~dataengine.pipeline.server.private_cache.PrivateCache`); later reads are one ranged read
of the payload. Works on any fsspec URL (local, ``s3://``, ``memory://``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import threading
from collections import OrderedDict

from dataengine.pipeline.core import storage
from dataengine.pipeline.server.private_cache import PrivateCache

logger = logging.getLogger(__name__)


class TarIndex:
    """Member offsets of tars, cached in memory (LRU) and in ``cache`` when given (a
    :class:`PrivateCache` or the folder of one)."""

    def __init__(self, cache: PrivateCache | str | None = None, max_tars: int = 256) -> None:
        self.cache = PrivateCache(cache) if isinstance(cache, str) else cache
        self.max_tars = max_tars
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()

    @staticmethod
    def _entry(url: str) -> str:
        return f"tarindex/{hashlib.sha256(url.encode()).hexdigest()[:24]}.json"

    def members(self, url: str) -> dict[str, tuple[int, int]]:
        """``{member name: (data offset, size)}`` of the tar at ``url``."""
        with self._lock:
            if url in self._mem:
                self._mem.move_to_end(url)
                return self._mem[url]
        table = self._load_disk(url)
        if table is None:
            table = self._scan(url)
            self._save_disk(url, table)
        with self._lock:
            self._mem[url] = table
            while len(self._mem) > self.max_tars:
                self._mem.popitem(last=False)
        return table

    def _scan(self, url: str) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for info in tf:
                if info.isfile():
                    out[info.name] = (info.offset_data, info.size)
        return out

    def _load_disk(self, url: str) -> dict[str, tuple[int, int]] | None:
        data = self.cache.get(self._entry(url)) if self.cache else None
        if data is None:
            return None
        try:
            return {k: (int(v[0]), int(v[1])) for k, v in json.loads(data).items()}
        except (ValueError, TypeError, IndexError, AttributeError):
            return None

    def _save_disk(self, url: str, table: dict[str, tuple[int, int]]) -> None:
        if self.cache:
            self.cache.put(self._entry(url), json.dumps(table).encode())

    def sample_members(self, url: str, key: str) -> dict[str, tuple[int, int]]:
        """``{extension: (offset, size)}`` of the sample ``key`` in the tar (empty if absent)."""
        prefix = key + "."
        return {name[len(prefix):]: loc for name, loc in self.members(url).items()
                if name.startswith(prefix)}

    def read(self, url: str, key: str, ext: str) -> bytes:
        """The payload ``<key>.<ext>`` of the tar at ``url``; KeyError when absent."""
        loc = self.sample_members(url, key).get(ext)
        if loc is None:
            raise KeyError(f"{key}.{ext} not in {url}")
        offset, size = loc
        fs, path = storage.get_fs(url)
        return storage.retry(lambda: fs.cat_file(path, start=offset, end=offset + size),
                             what=url)
