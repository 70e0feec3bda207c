"""Dashboard page latency at SAM density: 1,000 images x 100 masks (synthetic ellipses).

One command: ``python benchmarks/bench_dashboard.py [--images 1000 --masks 100]``.

Builds the corpus (image shards, index, one ``auto`` round through RoundWriter, plus 1,000 curation
decisions so the curation-state filter has work to do), starts the dashboard in a separate process
(``python -m dataengine dashboard``) and measures from this process over HTTP:

- overview: ``GET /api/overview``
- browse: a filtered, sorted page ``GET /api/browse?stage=auto&min_iou=..&sort=..&page=..``
  (random filters per request)
- sample100: a 100-mask sample page = ``GET /api/sample/<key>`` (masks, provenance, RLEs) +
  ``GET /api/image/<key>`` (the pixels, from the shard), the two requests the page makes
  before it draws.

Warm = repeated requests on a running server; cold = the first request of each kind after a
server restart with an empty render/offset cache (several restarts). Overview and browse are
measured with the image shards moved away (unreadable), proving they answer from the manifests
alone. Target: every p95 < 300 ms. Last line:
``RESULT masks=N overview_p95_ms=A browse_p95_ms=B sample100_p95_ms=C cold_sample100_p95_ms=D``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataengine.pipeline.core import curation  # noqa: E402
from dataengine.pipeline.core.layout import Corpus  # noqa: E402
from dataengine.pipeline.server.synthetic import build_corpus  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The dashboard in its own process."""

    def __init__(self, root: str, cache_dir: str) -> None:
        self.port = free_port()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataengine", "dashboard", "--root", root, "--port",
             str(self.port), "--cache-dir", cache_dir], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{self.base}/static/style.css", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stdout.read()}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def timed(client: httpx.Client, *urls: str) -> float:
    t0 = time.perf_counter()
    for u in urls:
        r = client.get(u)
        if r.status_code != 200:
            raise RuntimeError(f"{u}: {r.status_code} {r.text[:200]}")
        _ = r.content
    return (time.perf_counter() - t0) * 1000


def browse_url(rng: random.Random, pages: int = 20) -> str:
    sort = rng.choice(["predicted_iou", "stability_score", "area", "mask_id"])
    return (f"/api/browse?stage=auto&min_iou={rng.uniform(0.5, 0.9):.2f}"
            f"&min_area={rng.randint(0, 2000)}&state=pending,approved&sort={sort}"
            f"&order={rng.choice(['asc', 'desc'])}&page={rng.randint(0, pages)}&per_page=48")


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--warm", type=int, default=60, help="warm requests per page kind")
    ap.add_argument("--restarts", type=int, default=8, help="cold restarts")
    ap.add_argument("--root", default="", help="reuse/keep the corpus here (default: temp)")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-dashboard-")
    root = a.root or os.path.join(tmp, "corpus")
    corpus = Corpus(root)
    if not os.path.exists(os.path.join(root, "annotations")):
        t0 = time.perf_counter()
        build_corpus(root, n_generated=a.images, masks_per_image=a.masks, images_per_shard=100,
                     holdout_every=10)
        print(f"built corpus: {a.images} images x {a.masks} masks in "
              f"{time.perf_counter() - t0:.1f}s at {root}")
    # some curation decisions so the state filter and states are non-trivial
    rng = random.Random(0)
    from dataengine.pipeline.core.rounds import read_round_manifest

    manifest = read_round_manifest(corpus, 1, ["mask_id", "key"])
    n_masks = manifest.num_rows
    if not curation.load_log(corpus).table.num_rows:
        ids = manifest["mask_id"].to_pylist()
        curation.record(corpus, [curation.Decision("mask", m, rng.choice(["approve", "reject"]),
                                                   "bench") for m in rng.sample(ids, 1000)])
    keys = sorted(set(manifest["key"].to_pylist()))

    images_dir = Path(root) / "images"
    hidden = Path(root) / ".images-hidden"

    def hide_shards() -> None:
        hidden.mkdir(exist_ok=True)
        for t in images_dir.glob("*.tar"):
            t.rename(hidden / t.name)

    def restore_shards() -> None:
        for t in hidden.glob("*.tar"):
            t.rename(images_dir / t.name)

    results: dict[str, list[float]] = {k: [] for k in (
        "overview", "browse", "sample100", "cold_overview", "cold_browse", "cold_sample100")}
    startups = []
    try:
        # cold: first request of each kind after a restart with an empty cache
        for i in range(a.restarts):
            cache = os.path.join(tmp, f"cache-cold-{i}")
            hide_shards()
            srv = Server(root, cache)
            startups.append(srv.startup_s)
            try:
                with httpx.Client(base_url=srv.base, timeout=60) as c:
                    results["cold_overview"].append(timed(c, "/api/overview"))
                    results["cold_browse"].append(timed(c, browse_url(rng)))
                    restore_shards()
                    key = keys[rng.randrange(len(keys))]
                    results["cold_sample100"].append(
                        timed(c, f"/api/sample/{key}", f"/api/image/{key}"))
            finally:
                srv.stop()
                restore_shards()
        # warm
        cache = os.path.join(tmp, "cache-warm")
        srv = Server(root, cache)
        try:
            with httpx.Client(base_url=srv.base, timeout=60) as c:
                hide_shards()
                for _ in range(5):
                    timed(c, "/api/overview")
                    timed(c, browse_url(rng))
                for _ in range(a.warm):
                    results["overview"].append(timed(c, "/api/overview"))
                    results["browse"].append(timed(c, browse_url(rng)))
                restore_shards()
                sample_keys = [keys[rng.randrange(len(keys))] for _ in range(20)]
                for k in sample_keys:  # first visit fills the caches
                    timed(c, f"/api/sample/{k}", f"/api/image/{k}")
                for i in range(a.warm):
                    k = sample_keys[i % len(sample_keys)]
                    results["sample100"].append(timed(c, f"/api/sample/{k}", f"/api/image/{k}"))
                s = c.get(f"/api/sample/{keys[0]}").json()
                assert len(s["masks"]) == a.masks, len(s["masks"])
        finally:
            srv.stop()
    finally:
        restore_shards()

    print(f"masks={n_masks} images={len(keys)} server startup (load index + manifests) "
          f"median {np.median(startups):.2f}s")
    print(f"{'page':<16}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for k, v in results.items():
        print(f"{k:<16}{len(v):>4}{p(v, 50):>10.1f}{p(v, 95):>10.1f}{max(v):>10.1f}")
    print("overview and browse were answered with every image shard moved away (unreadable)")
    worst = max(p(v, 95) for v in results.values())
    print(f"target: every p95 < 300 ms -> {'met' if worst < 300 else 'NOT met'} "
          f"(worst p95 {worst:.1f} ms)")
    if not a.root:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT masks={n_masks} overview_p95_ms={p(results['overview'], 95):.1f} "
          f"browse_p95_ms={p(results['browse'], 95):.1f} "
          f"sample100_p95_ms={p(results['sample100'], 95):.1f} "
          f"cold_sample100_p95_ms={p(results['cold_sample100'], 95):.1f}")


if __name__ == "__main__":
    main()
