"""Images, thumbnails and mask overlays for the dashboard, rendered on demand and cached.

Image bytes come from the image shard named in the index (one ranged read through
:class:`~dataengine.pipeline.server.tar_index.TarIndex`); rendered JPEGs are kept in a small
in-memory LRU and in the private disk cache
(:class:`~dataengine.pipeline.server.private_cache.PrivateCache`: a per-user 0700 folder whose
entries are checked against their SHA-256 before use), so a restart keeps the disk cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from PIL import Image

from dataengine.pipeline.core import masks as masklib
from dataengine.pipeline.core.imagecodec import IMAGE_EXTS
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.server.private_cache import PrivateCache
from dataengine.pipeline.server.tar_index import TarIndex

logger = logging.getLogger(__name__)

MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def mask_color(mask_id: str) -> tuple[int, int, int]:
    """A stable, saturated colour for a mask id."""
    h = int(hashlib.md5(mask_id.encode()).hexdigest()[:6], 16)
    hue = (h % 360) / 360.0
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


class LRU:
    """A tiny thread-safe LRU of bytes by total size."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, k: str) -> bytes | None:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: str, v: bytes) -> None:
        with self._lock:
            if k in self._d:
                self._size -= len(self._d.pop(k))
            self._d[k] = v
            self._size += len(v)
            while self._size > self.max_bytes and self._d:
                self._size -= len(self._d.popitem(last=False)[1])


class Renderer:
    """Reads images out of shards and renders thumbnails / overlays with caching."""

    def __init__(self, corpus: Corpus, cache: PrivateCache | None,
                 max_memory: int = 64 << 20) -> None:
        self.corpus = corpus
        self.cache = cache
        self.tars = TarIndex(cache)
        self.mem = LRU(max_memory)

    # raw images ---------------------------------------------------------------------------
    def image_bytes(self, key: str, shard: str) -> tuple[bytes, str]:
        """Original stored bytes of image ``key`` from image shard ``shard`` and its mime type."""
        url = self.corpus.image_shard(shard)
        members = self.tars.sample_members(url, key)
        for ext in IMAGE_EXTS:
            if ext in members:
                return self.tars.read(url, key, ext), MIME[ext]
        raise KeyError(f"image {key!r} has no image payload in {url}")

    def decoded(self, key: str, shard: str, max_side: int | None = None) -> Image.Image:
        """The image as RGB PIL, optionally reduced at decode time (JPEG draft) toward max_side."""
        data, _ = self.image_bytes(key, shard)
        im = Image.open(io.BytesIO(data))
        if max_side:
            im.draft("RGB", (max_side, max_side))
        return im.convert("RGB")

    # caching ------------------------------------------------------------------------------
    def _cached(self, name: str, render: Callable[[], bytes]) -> bytes:
        v = self.mem.get(name)
        if v is not None:
            return v
        v = self.cache.get(f"render/{name}") if self.cache else None
        if v is None:
            v = render()
            if self.cache:
                self.cache.put(f"render/{name}", v)
        self.mem.put(name, v)
        return v

    # renders ------------------------------------------------------------------------------
    def thumbnail(self, key: str, shard: str, size: int) -> bytes:
        """JPEG of the image with its longest side at most ``size``."""
        def render() -> bytes:
            im = self.decoded(key, shard, size)
            im.thumbnail((size, size), Image.Resampling.BILINEAR)
            return _jpeg(im)
        return self._cached(f"thumb/{size}/{key}.jpg", render)

    def overlay(self, key: str, shard: str, rles: list[tuple[str, dict]], size: int,
                crop: tuple[float, float, float, float] | None = None,
                outline_id: str | None = None) -> bytes:
        """JPEG of the image (or ``crop`` = x, y, w, h of it) with ``rles`` (mask id, RLE)
        blended in their colours, longest side at most ``size``; ``outline_id`` is drawn
        strongest."""
        ids = ",".join(sorted(m for m, _ in rles))
        crop_s = ",".join(f"{v:.0f}" for v in crop) if crop else "full"
        name = hashlib.sha256(f"{key}|{ids}|{crop_s}|{size}|{outline_id}".encode()).hexdigest()

        def render() -> bytes:
            im = self.decoded(key, shard, None if crop else size * 2)
            w0, h0 = im.size
            if crop is not None:
                x, y, w, h = crop
                box = (int(max(0, x)), int(max(0, y)), int(min(w0, x + w)), int(min(h0, y + h)))
            else:
                box = (0, 0, w0, h0)
            region = np.asarray(im.crop(box), dtype=np.float32)
            for mask_id, rle in rles:
                m = masklib.decode(rle)
                mh, mw = m.shape
                if (mw, mh) != (w0, h0):  # draft-reduced decode: sample the mask down
                    ys = (np.arange(h0) * mh // h0)[:, None]
                    xs = (np.arange(w0) * mw // w0)[None, :]
                    m = m[ys, xs]
                m = m[box[1]:box[3], box[0]:box[2]]
                if not m.any():
                    continue
                color = np.asarray(mask_color(mask_id), dtype=np.float32)
                alpha = 0.55 if mask_id == outline_id else 0.4
                region[m] = region[m] * (1 - alpha) + color * alpha
                edge = m & ~(_erode(m))
                region[edge] = color if mask_id != outline_id else (255, 255, 255)
            out = Image.fromarray(region.clip(0, 255).astype(np.uint8))
            out.thumbnail((size, size), Image.Resampling.BILINEAR)
            return _jpeg(out)
        return self._cached(f"overlay/{name[:2]}/{name}.jpg", render)


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:, :] &= m[:-1, :]
    out[:-1, :] &= m[1:, :]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def _jpeg(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
