"""Near-duplicate detection and the held-out leak check (``dataengine dedup``).

Two images are near-duplicates when their perceptual signatures
(:mod:`dataengine.pipeline.curate.signature`) are at least ``strict_signature`` alike, or at least
``signature_threshold`` alike while their pooled SAM embeddings agree at cosine
``embedding_threshold`` or more (the embedding vetoes look-alike frames of different scenes in
the band where signatures alone are unsure). Candidates come from a faiss search of each image's
whole frame against every image's signature windows.

Near-duplicate pairs are joined into groups. In a group that holds a held-out image, every
training image is a **held-out leak**: it is flagged ``holdout_leak`` (of the held-out image it is
most like) and training never reads it, whatever else is decided, since it would score the
held-out image for the model it trained. In a group without one, the first image in corpus order
is kept and the others are flagged ``near_duplicate`` of it; training leaves them out unless asked
(``DataConfig.include_near_duplicates``) or a curator approves the image afterwards. Nothing is
deleted: flags are one append-only file per kind per run
(:func:`dataengine.pipeline.core.curation.record_flags`), the newest run of a kind in force.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import curation, splits
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.curate.embed import (EmbedConfig, embed_corpus, load_signatures,
                                              load_vectors)
from dataengine.pipeline.curate.index import build_ip_index, normalise

logger = logging.getLogger(__name__)


@dataclass
class DedupConfig:
    """Near-duplicate detection (``dataengine dedup``)."""

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    strict_signature: float = 0.975    # near-duplicates on the signature alone
    signature_threshold: float = 0.95  # ... or this with the embeddings agreeing
    embedding_threshold: float = 0.9
    candidates: int = 10               # nearest images examined per image
    who: str = "dedup"                 # recorded with the flags
    dry_run: bool = False              # find and report, record no flags

    def __post_init__(self) -> None:
        if isinstance(self.embed, dict):
            self.embed = config_mod.from_dict(EmbedConfig, self.embed, where="embed")
        for name in ("strict_signature", "signature_threshold", "embedding_threshold"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"{name}={v}: a cosine, must be in [-1, 1]")
        if self.signature_threshold > self.strict_signature:
            raise ValueError(f"signature_threshold={self.signature_threshold} must be <= "
                             f"strict_signature={self.strict_signature}")
        if self.candidates < 1:
            raise ValueError(f"candidates={self.candidates}: must be >= 1")


@dataclass
class Pair:
    """Two near-duplicate images (``a`` before ``b`` in corpus order) and why."""

    a: str
    b: str
    signature: float
    embedding: float | None
    rule: str   # "signature" | "signature+embedding"


def signature_candidates(sigs: np.ndarray, k: int, threshold: float
                         ) -> dict[tuple[int, int], float]:
    """``(i, j) -> similarity`` (``i < j``) of the image pairs at ``threshold`` or more among
    each image's ``k`` nearest (whole frame against every window, both ways round)."""
    n, windows, dims = sigs.shape
    if n < 2:
        return {}
    index = build_ip_index(sigs.reshape(n * windows, dims))
    sims, rows = index.search(np.ascontiguousarray(sigs[:, 0]), min(n * windows, k * windows + 1))
    out: dict[tuple[int, int], float] = {}
    for i in range(n):
        for s, r in zip(sims[i], rows[i]):
            j = int(r) // windows
            if r < 0 or j == i or s < threshold:
                continue
            pair = (min(i, j), max(i, j))
            out[pair] = max(out.get(pair, -1.0), float(s))
    return out


def find_pairs(keys: list[str], sigs: np.ndarray, vectors: dict[str, np.ndarray] | None,
               cfg: DedupConfig) -> list[Pair]:
    """Near-duplicate pairs among ``keys`` (corpus order) by their signatures and, where
    given, their normalised embeddings."""
    cand = signature_candidates(sigs, cfg.candidates, cfg.signature_threshold)
    pairs = []
    for (i, j), s in sorted(cand.items()):
        a, b = keys[i], keys[j]
        e = float(vectors[a] @ vectors[b]) if vectors and a in vectors and b in vectors else None
        if s >= cfg.strict_signature:
            pairs.append(Pair(a, b, s, e, "signature"))
        elif e is not None and e >= cfg.embedding_threshold:
            pairs.append(Pair(a, b, s, e, "signature+embedding"))
    return pairs


def group_pairs(pairs: list[Pair], order: dict[str, int]) -> list[list[str]]:
    """Connected groups of near-duplicates, each in corpus order, groups by their first."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.a), find(p.b)
        if ra != rb:
            parent[max(ra, rb, key=order.__getitem__)] = min(ra, rb, key=order.__getitem__)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g, key=order.__getitem__) for g in groups.values()),
                  key=lambda g: order[g[0]])


def decide_flags(groups: list[list[str]], pairs: list[Pair], split_map: dict[str, str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """``(near_duplicate rows, holdout_leak rows, held-out images with a held-out
    near-duplicate)`` from the groups (see the module docstring)."""
    sim: dict[tuple[str, str], float] = {}
    for p in pairs:
        sim[(p.a, p.b)] = sim[(p.b, p.a)] = p.signature
    dups, leaks, holdout_dups = [], [], 0
    for g in groups:
        held = [k for k in g if split_map.get(k) != "train"]
        train = [k for k in g if split_map.get(k) == "train"]
        holdout_dups += len(held) - 1 if len(held) > 1 else 0
        if held:
            for k in train:
                of = max(held, key=lambda h: sim.get((k, h), -1.0))
                s = sim.get((k, of))
                leaks.append({"key": k, "of_key": of, "score": s if s is not None else 0.0,
                              "reason": f"nearly duplicates held-out image {of}" +
                              ("" if s is not None else " (through a chain of near-duplicates)")})
            continue
        keep = g[0]
        for k in g[1:]:
            s = sim.get((k, keep))
            dups.append({"key": k, "of_key": keep, "score": s if s is not None else 0.0,
                         "reason": f"near-duplicate of {keep}" +
                         ("" if s is not None else " (through a chain of near-duplicates)")})
    return dups, leaks, holdout_dups


def dedup(root: str, config: DedupConfig | None = None) -> dict[str, Any]:
    """Find near-duplicates and held-out leaks in corpus ``root`` and record them as flags
    (unless ``dry_run``); returns the summary (counts, pairs, the embedding pass's figures)."""
    cfg = config or DedupConfig()
    corpus = Corpus(root)
    emb = embed_corpus(corpus.root, cfg.embed)
    keys, sigs = load_signatures(corpus, cfg.embed.signature)
    vkeys, vecs = load_vectors(corpus, emb["model_version"])
    vectors = dict(zip(vkeys, normalise(vecs), strict=True)) if len(vkeys) > 1 else None
    pairs = find_pairs(keys, sigs, vectors, cfg)
    order = {k: i for i, k in enumerate(keys)}
    groups = group_pairs(pairs, order)
    split_map = splits.load_map(corpus)
    dups, leaks, holdout_dups = decide_flags(groups, pairs, split_map)
    urls = {}
    if not cfg.dry_run:
        urls = {"near_duplicate": curation.record_flags(corpus, "near_duplicate", dups, cfg.who),
                "holdout_leak": curation.record_flags(corpus, "holdout_leak", leaks, cfg.who)}
    logger.info("dedup %s: %d images, %d near-duplicate pairs in %d groups: %d near-duplicates, "
                "%d held-out leaks", corpus.root, len(keys), len(pairs), len(groups), len(dups),
                len(leaks))
    return {"images": len(keys), "pairs": len(pairs), "groups": len(groups),
            "near_duplicates": len(dups), "holdout_leaks": len(leaks),
            "holdout_near_duplicates": holdout_dups, "flags": urls,
            "model_version": emb["model_version"], "signature": emb["signature"],
            "embed": emb, "pair_list": [p.__dict__ for p in pairs], "group_list": groups,
            "leak_list": leaks, "near_duplicate_list": dups}
