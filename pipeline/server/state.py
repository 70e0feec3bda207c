"""What every route of one server process shares: the corpus view, renderer, tokens, SAM, the
people rounds it has loaded, prompt sessions, background jobs and rate limits."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request

from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import is_complete
from dataengine.pipeline.server import auth, people
from dataengine.pipeline.server.config import ServerConfig, default_cache_dir
from dataengine.pipeline.server.corpus_view import CorpusView
from dataengine.pipeline.server.jobs import JobRunner
from dataengine.pipeline.server.private_cache import PrivateCache
from dataengine.pipeline.server.prompts import PromptSessions
from dataengine.pipeline.server.render import Renderer
from dataengine.pipeline.server.sam_session import SamService, decoder_slots
from dataengine.pipeline.server.security import ApiError, FairSlots, RateLimiter

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """One server process's shared objects (``app.state.server``)."""

    corpus: Corpus
    config: ServerConfig
    cache: PrivateCache
    view: CorpusView
    renderer: Renderer
    tokens: auth.TokenStore
    sam: SamService
    index: people.PeopleIndex
    jobs: JobRunner
    sessions: PromptSessions
    predicts: RateLimiter
    decoder_slots: FairSlots
    rounds: dict[int, people.PeopleRound] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, root: str, cfg: ServerConfig) -> ServerState:
        """Load the corpus view and set up everything the routes use."""
        corpus = Corpus(root)
        cache = PrivateCache(cfg.cache_dir or default_cache_dir(corpus.root))
        view = CorpusView(corpus, refresh_seconds=cfg.refresh_seconds, cache_dir=cache.root)
        renderer = Renderer(corpus, cache)
        view.refresh(force=True)  # index, manifests and decisions before the first request
        sam = SamService(corpus, device=cfg.annotate_device or None, threads=cfg.torch_threads,
                         tars=renderer.tars, decoder=cfg.decoder, cache=cache)
        return cls(corpus=corpus, config=cfg, cache=cache, view=view, renderer=renderer,
                   tokens=auth.TokenStore(corpus), sam=sam,
                   index=people.PeopleIndex(corpus, ttl=max(cfg.refresh_seconds, 0.5)),
                   jobs=JobRunner(cfg.max_pending_jobs),
                   sessions=PromptSessions(cfg.prompt_cache_mb << 20),
                   predicts=RateLimiter(cfg.predicts_per_second, 2 * cfg.predicts_per_second,
                                        max_inflight=1),
                   decoder_slots=FairSlots(decoder_slots(cfg.torch_threads)))

    @property
    def cache_dir(self) -> str:
        return self.cache.root

    # people rounds ------------------------------------------------------------------------
    def round(self, number: int) -> people.PeopleRound:
        """The people round ``number`` (loaded once: its logs are replayed, done shards healed);
        404 when it is not a people round."""
        with self.lock:
            r = self.rounds.get(number)
        if r is not None:
            return r
        try:
            r = people.PeopleRound(self.corpus, number, self.config.lease_seconds,
                                   prefill_fn=self.prefill_amg)
        except KeyError:
            raise ApiError(404, f"round {number} is not open for people") from None
        with self.lock:
            return self.rounds.setdefault(number, r)

    def image_fn(self, key: str, shard: str):
        """A loader of the decoded image (HxWx3 uint8), for the encoder when no embedding is
        cached."""
        return lambda: np.asarray(self.renderer.decoded(key, shard))

    def prefill_amg(self, r: people.PeopleRound, key: str) -> list[dict[str, Any]]:
        """The model's confident masks (strict automatic generation) for a semi round."""
        from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator

        st = r.images[key]
        model = self.sam.model(r.model_version)
        gen = MaskGenerator(model, AmgConfig(points_per_side=16, pred_iou_thresh=0.92,
                                             stability_score_thresh=0.95))
        img = self.image_fn(key, st.shard)()
        feats = self.sam.embedding(r.model_version, key, lambda: img, st.shard)[0]
        return gen.generate(img, features=feats)

    def heal_rounds(self) -> list[int]:
        """Load every people round that is not complete (replaying its logs writes its done
        shards and finishes it when it can); returns the rounds loaded."""
        loaded = []
        for n in self.index.rounds():
            if not is_complete(self.corpus, n):
                try:
                    self.round(n)
                    loaded.append(n)
                except Exception as exc:  # noqa: BLE001 - the next request retries
                    logger.error("people round %d could not be loaded: %s", n, exc)
        return loaded

    def sweep(self) -> int:
        """Free the prompt sessions of leases that ended or expired; returns how many."""
        with self.lock:
            rounds = list(self.rounds.values())
        dropped = 0
        for lease_id in self.sessions.leases():
            if not any(r.lease_alive(lease_id) for r in rounds):
                self.sessions.drop(lease_id)
                dropped += 1
        return dropped


def get_state(request: Request) -> ServerState:
    """The server state of the app handling ``request``."""
    return request.app.state.server


def ort_assets_dir() -> str:
    """Where ``make install`` puts onnxruntime-web (``static/vendor/ort``, not in git)."""
    return os.path.join(os.path.dirname(__file__), "static", "vendor", "ort")
