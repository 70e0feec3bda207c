"""Images for the latent-diffusion stages: center-square crops at a resolution, as batches in
[-1, 1] (in shard order for encoding and evaluation, endless and shuffled for training)."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch

from dataengine.pipeline.core.imagecodec import image_bytes
from dataengine.pipeline.core.shards import iter_tar

logger = logging.getLogger(__name__)


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centered square (left, top, right, bottom) that every image and mask is cut to."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode_square(data: bytes, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (``HxWx3`` uint8 center crop at ``resolution``, original (w, h))."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        size = im.size
        im = im.convert("RGB").crop(crop_box(*size)).resize((resolution, resolution),
                                                             Image.BICUBIC)
        return np.asarray(im), size


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """``HxWx3`` uint8 images -> ``Bx3xHxW`` float in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def image_batches(shards: list[str], resolution: int, batch_size: int, *, split: str | None,
                  limit: int | None = None, exclude: set[str] | None = None
                  ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(``Bx3xHxW`` batch in [-1, 1], keys) over ``shards`` in order, images of ``split`` only
    (None: all), at most ``limit``; undecodable images are skipped with a warning."""
    n, buf, keys = 0, [], []
    for url in shards:
        for s in iter_tar(url):
            meta = json.loads(s.get("json", b"{}"))
            if (split and meta.get("split", "train") != split) or s["__key__"] in (exclude or ()):
                continue
            try:
                img, _ = decode_square(image_bytes(s), resolution)
            except Exception as exc:  # noqa: BLE001 - a bad image never stops the reader
                logger.warning("%s/%s: skipped (%s)", url, s["__key__"], exc)
                continue
            buf.append(img)
            keys.append(s["__key__"])
            n += 1
            if len(buf) == batch_size or (limit and n >= limit):
                yield to_tensor(buf), keys
                buf, keys = [], []
            if limit and n >= limit:
                return
    if buf:
        yield to_tensor(buf), keys


def image_stream(shards: list[str], resolution: int, batch_size: int, *, rank: int, world: int,
                 seed: int, split: str = "train", exclude: set[str] | None = None,
                 buffer: int = 256) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (``Bx3xHxW`` in [-1, 1], random flips) of this worker's share
    of ``shards`` (webdataset node splitting, shards resampled)."""
    import webdataset as wds

    mine = list(wds.split_by_node(list(shards))) if world > 1 else list(shards)
    if not mine:
        raise ValueError(f"worker {rank}/{world}: no image shards ({len(shards)} for {world} "
                         f"workers)")
    rng = random.Random(seed * 1000 + rank)
    exclude = exclude or set()

    def decode(sample):
        meta = json.loads(sample.get("json", b"{}"))
        if meta.get("split", "train") != split or sample["__key__"] in exclude:
            return None
        try:
            img, _ = decode_square(image_bytes(sample), resolution)
        except Exception as exc:  # noqa: BLE001
            logger.warning("%s: skipped (%s)", sample["__key__"], exc)
            return None
        return img[:, ::-1] if rng.random() < 0.5 else img

    pipe = wds.DataPipeline(
        wds.ResampledShards(mine, seed=seed, worker_seed=lambda: rank, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.map(decode), wds.select(lambda x: x is not None),
        wds.shuffle(buffer, initial=min(buffer, 32), rng=rng),
    )
    buf = []
    for img in pipe:
        buf.append(np.ascontiguousarray(img))
        if len(buf) == batch_size:
            yield to_tensor(buf)
            buf = []
