"""The corpus layout: where every stage reads and writes under ``ROOT``.

::

    ROOT/
      images/shard-NNNNNN.tar          image shards (key, image bytes, .json metadata)
      images/shard-NNNNNN.claim.json   the shard number's claim: owner, expiry, work order
      images/shard-NNNNNN.done.json    per-shard done record (stats + keys), written last
      images/index/                    key, shard, width, height, bytes, sha256, source, split
                                       (partitioned: one entry per merged shard + compacts)
      images/chunks/                   input chunk -> shard, and which chunks are done (resume)
      splits/part-*.parquet            key -> train | holdout, fixed when a key is first added
      annotations/round-NNNN/          shard-NNNNNN.tar (SA-1B per-image JSON), manifest/,
                                       (one row per mask: parts + compacts), round.json,
                                       metrics.json (written last: the round is complete)
      embeddings/<model-version>/      shard-NNNNNN.tar of cached SAM image embeddings,
                                       pooled/shard-NNNNNN.parquet (pooled, per image)
      embeddings/signature-<id>/       shard-NNNNNN.parquet of perceptual signatures
      models/{sam,detector,vae,ldm}/vNNNN/   weights + config; version.json written last
      latents/<vae-version>-<res>-r<round>/  shard-NNNNNN.tar of latent mean/logvar + conditions
      curation/                        append-only decision log (decisions-*.parquet) and
                                       tools' flags (flags-<kind>-*.parquet)
      engine/                          engine state and reports
      runs/                            training runs (Ray Train storage)
      quarantine/                      *.parquet: rejected inputs with source and reason

Every area is append-only: a stage never rewrites another stage's output nor its own published
files (aggregates, the index and the manifests, grow by one part per shard and are compacted:
:mod:`dataengine.pipeline.core.partitioned`). A derived dataset writes one tar per
image shard with the same basename; its keys are a subsequence of the image shard's, in order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dataengine.pipeline.core import storage

MODEL_KINDS = ("sam", "detector", "vae", "ldm")
STAGES = ("imported", "manual", "semi", "auto")
SPLITS = ("train", "holdout")


def shard_name(index: int) -> str:
    """Basename of the image shard number ``index``: ``shard-000042``."""
    return f"shard-{index:06d}"


def round_name(number: int) -> str:
    """Directory name of annotation round ``number``: ``round-0003``."""
    return f"round-{number:04d}"


def version_name(number: int) -> str:
    """Directory name of model version ``number``: ``v0007``."""
    return f"v{number:04d}"


def parse_version(name: str) -> int:
    """``'v0007'`` -> 7; raises ValueError for anything else."""
    m = re.fullmatch(r"v(\d+)", name)
    if not m:
        raise ValueError(f"model version {name!r} is not of the form vNNNN")
    return int(m.group(1))


@dataclass(frozen=True)
class Corpus:
    """Paths of one corpus under ``root`` (a local path or any fsspec URL)."""

    root: str

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root: a corpus root path or URL is required")
        root = self.root.rstrip("/") or "/"
        if "://" not in root:  # a local path: absolute, so Ray workers (other cwd) agree on it
            root = os.path.abspath(os.path.expanduser(root))
        object.__setattr__(self, "root", root)

    def path(self, *parts: str) -> str:
        """URL of ``parts`` under the root."""
        return storage.join(self.root, *parts)

    # images -------------------------------------------------------------------------------
    @property
    def images(self) -> str:
        return self.path("images")

    def image_shard(self, name: str) -> str:
        return self.path("images", f"{name}.tar")

    def image_done(self, name: str) -> str:
        return self.path("images", f"{name}.done.json")

    def image_claim(self, name: str) -> str:
        return self.path("images", f"{name}.claim.json")

    @property
    def index(self) -> str:
        """The single-file index of corpora written before ``images/index/`` (read only)."""
        return self.path("images", "index.parquet")

    def image_shards(self) -> list[str]:
        """Basenames of published image shards (those with a done record), sorted."""
        return [u.rsplit("/", 1)[-1][: -len(".done.json")]
                for u in storage.listdir(self.images, r"shard-\d+\.done\.json")]

    # splits / quarantine / curation ------------------------------------------------------
    @property
    def splits(self) -> str:
        return self.path("splits")

    @property
    def quarantine(self) -> str:
        return self.path("quarantine")

    @property
    def curation(self) -> str:
        return self.path("curation")

    @property
    def engine(self) -> str:
        return self.path("engine")

    @property
    def runs(self) -> str:
        return self.path("runs")

    # annotations --------------------------------------------------------------------------
    def round_dir(self, number: int) -> str:
        return self.path("annotations", round_name(number))

    def round_shard(self, number: int, shard: str) -> str:
        return storage.join(self.round_dir(number), f"{shard}.tar")

    def rounds(self) -> list[int]:
        """Numbers of rounds that have a directory (complete or not), sorted."""
        return [int(u.rsplit("-", 1)[-1])
                for u in storage.listdir(self.path("annotations"), r"round-\d{4}")]

    # embeddings / latents -----------------------------------------------------------------
    def embeddings_dir(self, model_version: str) -> str:
        return self.path("embeddings", model_version)

    def latents_dir(self, vae_version: str, resolution: int, round_number: int) -> str:
        return self.path("latents", f"{vae_version}-{resolution}-r{round_number}")

    # models -------------------------------------------------------------------------------
    def model_dir(self, kind: str, version: str) -> str:
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is not one of {MODEL_KINDS}")
        parse_version(version)
        return self.path("models", kind, version)

    def model_versions(self, kind: str) -> list[str]:
        """Published versions of a model kind (those with ``version.json``), oldest first."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is not one of {MODEL_KINDS}")
        out = []
        for u in storage.listdir(self.path("models", kind), r"v\d{4,}"):
            if storage.exists(storage.join(u, "version.json")):
                out.append(u.rsplit("/", 1)[-1])
        return sorted(out, key=parse_version)

    def latest_version(self, kind: str) -> str | None:
        """The newest published version of a model kind, or None."""
        published = self.model_versions(kind)
        return published[-1] if published else None

    def next_model_version(self, kind: str) -> str:
        """The next unused version name of a model kind (counting unfinished directories)."""
        taken = [parse_version(u.rsplit("/", 1)[-1])
                 for u in storage.listdir(self.path("models", kind), r"v\d{4,}")]
        return version_name(max(taken, default=0) + 1)
