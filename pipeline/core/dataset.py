"""Reading the corpus back: index and splits, image shards (webdataset, Ray Data), round joins.

- :func:`image_shard_urls`: URLs of the published image shards (those with a done record).
- :func:`iter_corpus`: a ``webdataset.WebDataset`` over the image shards, split across nodes
  (``torch.distributed`` ranks) and DataLoader workers, optionally filtered to one split and
  joined with the masks of annotation rounds.
- :func:`ray_dataset`: the same shards as a Ray Data dataset (``ray.data.read_webdataset``).
- :func:`round_annotations` / :func:`join_rounds`: per-image annotations of rounds, for a shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset as wds

from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import iter_round_shard
from dataengine.pipeline.core.shards import register_fsspec_gopen

logger = logging.getLogger(__name__)


def _corpus(root: str | Corpus) -> Corpus:
    return root if isinstance(root, Corpus) else Corpus(root)





def image_shard_urls(root: str | Corpus) -> list[str]:
    """URLs of every published image shard, in shard order."""
    corpus = _corpus(root)
    return [corpus.image_shard(n) for n in corpus.image_shards()]


def round_annotations(root: str | Corpus, shard: str, rounds: Iterable[int]
                      ) -> dict[str, list[dict[str, Any]]]:
    """``key -> annotations`` of one image shard across ``rounds`` (in round order)."""
    corpus = _corpus(root)
    out: dict[str, list[dict[str, Any]]] = {}
    for number in rounds:
        for rec in iter_round_shard(corpus, number, shard):
            out.setdefault(rec["image"]["image_id"], []).extend(rec["annotations"])
    return out


def join_rounds(samples: Iterable[dict[str, Any]], root: str | Corpus, rounds: Iterable[int]
                ) -> Iterator[dict[str, Any]]:
    """Add ``sample["annotations"]`` (a list, maybe empty) from ``rounds`` to image samples.

    Samples must carry ``__url__`` (webdataset does); round shards are loaded once per image shard.
    """
    rounds = list(rounds)
    current, anns = None, {}
    for sample in samples:
        shard = sample["__url__"].rsplit("/", 1)[-1][: -len(".tar")]
        if shard != current:
            current, anns = shard, round_annotations(root, shard, rounds)
        sample["annotations"] = anns.get(sample["__key__"], [])
        yield sample


def shard_duplicates(root: str | Corpus, shard: str) -> set[str]:
    """Keys whose bytes an image shard holds but another shard's copy is the indexed one (two
    tasks stored the same image at once; see :mod:`dataengine.pipeline.ingest.stream`)."""
    corpus = _corpus(root)
    url = corpus.image_done(shard)
    if not storage.exists(url):
        return set()
    return set(storage.read_json(url).get("duplicates") or {})


def skip_duplicates(samples: Iterable[dict[str, Any]], root: str | Corpus
                    ) -> Iterator[dict[str, Any]]:
    """Image samples without the second copies :func:`shard_duplicates` names."""
    current, skip = None, set()
    for sample in samples:
        shard = sample["__url__"].rsplit("/", 1)[-1][: -len(".tar")]
        if shard != current:
            current, skip = shard, shard_duplicates(root, shard)
        if sample["__key__"] not in skip:
            yield sample


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    return json.loads(raw) if isinstance(raw, (bytes, str)) else (raw or {})


def iter_corpus(root: str | Corpus, *, split: str | None = None, decode: str | None = "rgb8",
                rounds: Iterable[int] | None = None, split_by_node: bool = True,
                split_by_worker: bool = True) -> wds.WebDataset:
    """The image corpus as a webdataset pipeline.

    Each sample has ``__key__``, the image (``jpg``/``png``/``webp``; decoded with webdataset's
    ``decode`` spec, e.g. ``"rgb8"`` HWC uint8, ``"pil"``, or None for bytes) and ``json``
    (metadata dict). ``split`` keeps only keys of that split; ``rounds`` adds ``annotations``.
    Shards are divided over ``torch.distributed`` ranks and DataLoader workers.
    """
    urls = image_shard_urls(root)
    if not urls:
        raise FileNotFoundError(f"no image shards under {_corpus(root).images}")
    register_fsspec_gopen()  # s3:// and other fsspec URLs (webdataset has no opener for them)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False,
                        nodesplitter=wds.split_by_node if split_by_node else None,
                        workersplitter=wds.split_by_worker if split_by_worker else None)
    ds = ds.compose(lambda src: skip_duplicates(src, root))
    if split is not None:
        keep = splits.keys_of(_corpus(root), split)
        ds = ds.select(lambda s: s["__key__"] in keep)
    if decode:
        ds = ds.decode(decode)
    ds = ds.map(lambda s: {**s, "json": _meta(s)})
    if rounds is not None:
        ds = ds.compose(lambda src: join_rounds(src, root, rounds))
    return ds


def ray_dataset(root: str | Corpus, *, split: str | None = None, decoder: bool | str = True,
                **read_args: Any):
    """The image corpus as a Ray Data dataset (one row per image: ``__key__``, image, json).

    Remote roots (``s3://``...) are read through their fsspec filesystem.
    """
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from dataengine.pipeline.core.distribute import ensure_ray

    ensure_ray()
    urls = image_shard_urls(root)
    if not urls:
        raise FileNotFoundError(f"no image shards under {_corpus(root).images}")
    filesystem = None
    if not storage.is_local(urls[0]):
        fs, _ = storage.get_fs(urls[0])
        filesystem = PyFileSystem(FSSpecHandler(fs))
        urls = [storage.get_fs(u)[1] for u in urls]
    ds = ray.data.read_webdataset(urls, filesystem=filesystem, decoder=decoder, **read_args)
    if split is not None:
        keep = splits.keys_of(_corpus(root), split)
        ds = ds.filter(lambda row: row["__key__"] in keep)
    return ds
