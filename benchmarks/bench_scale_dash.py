"""The dashboard half of ``bench_scale.py``: synthetic rounds on a sharded corpus up to N masks,
then the dashboard's Overview / Browse / Sample latency warm and cold, and its memory."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataengine.pipeline.core import curation, rounds, storage  # noqa: E402
from dataengine.pipeline.core.index import load_index  # noqa: E402
from dataengine.pipeline.core.layout import Corpus  # noqa: E402

ROUNDS = ((1, "auto", 0.6, "v0001"), (2, "semi", 0.3, "v0002"), (3, "manual", 0.1, "v0003"))


def rle_pool(h: int, w: int, n: int = 64) -> list[str]:
    """Compressed RLE strings of ``n`` random ellipses on an h x w image."""
    from dataengine.pipeline.core.masks import encode

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
        ry, rx = rng.uniform(0.05, 0.3, 2) * (h, w)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out.append(encode(m)["counts"])
    return out


def part_table(keys: list[str], shard: str, number: int, stage: str, version: str, per: int,
               pool: list[str], h: int, w: int, rng: np.random.Generator) -> pa.Table:
    n = len(keys) * per
    key = np.repeat(np.array(keys, dtype=object), per)
    ann = np.tile(np.arange(1, per + 1, dtype=np.int32), len(keys))
    bx, by = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    clicks = rng.integers(0, 6, n).astype(np.int32) if stage != "auto" else np.zeros(n, np.int32)
    return pa.table({
        "mask_id": [f"round-{number:04d}/{k}/{a}" for k, a in zip(key, ann, strict=True)],
        "key": key.astype(str), "shard": [shard] * n,
        "round": np.full(n, number, np.int32), "stage": [stage] * n,
        "model_version": [version] * n, "annotator": ["sim" if stage != "auto" else ""] * n,
        "ann_id": ann, "category_id": np.full(n, -1, np.int32), "category": [""] * n,
        "area": rng.integers(10, h * w, n), "bbox_x": bx.astype(np.float32),
        "bbox_y": by.astype(np.float32), "bbox_w": rng.uniform(1, w / 2, n).astype(np.float32),
        "bbox_h": rng.uniform(1, h / 2, n).astype(np.float32),
        "predicted_iou": rng.uniform(0.3, 1.0, n).astype(np.float32),
        "stability_score": rng.uniform(0.5, 1.0, n).astype(np.float32),
        "n_clicks": clicks, "seconds": (clicks * rng.uniform(1, 4, n)).astype(np.float32),
        "prefilled": (rng.random(n) < 0.3) if stage == "semi" else np.zeros(n, bool),
        "height": np.full(n, h, np.int32), "width": np.full(n, w, np.int32),
        "rle": [pool[i] for i in rng.integers(0, len(pool), n)],
    }).cast(rounds.MANIFEST_SCHEMA)


def build_rounds(corpus: Corpus, masks: int) -> tuple[int, list[str]]:
    """Rounds 1-3 with ``masks`` masks over the corpus's images; returns (masks, keys)."""
    index = load_index(corpus, ["key", "shard", "width", "height"])
    keys_all = index["key"].to_pylist()
    marker = Path(corpus.root) / ".bench-rounds.json"
    if marker.exists():
        return json.loads(marker.read_text())["masks"], keys_all
    per_image = max(1, masks // len(keys_all))
    h, w = index["height"][0].as_py(), index["width"][0].as_py()
    pool = rle_pool(h, w)
    by_shard: dict[str, list[str]] = {}
    for k, s in zip(keys_all, index["shard"].to_pylist(), strict=True):
        by_shard.setdefault(s, []).append(k)
    rng = np.random.default_rng(1)
    total = 0
    t0 = time.perf_counter()
    for number, stage, share, version in ROUNDS:
        per = max(1, round(per_image * share))
        writer = rounds.RoundWriter(corpus, number, stage, model_version=version)
        writer.begin()
        ds = rounds.manifest_dataset(corpus, number)
        for shard, keys in sorted(by_shard.items()):
            t = part_table(keys, shard, number, stage, version, per, pool, h, w, rng)
            storage.write_json(storage.join(writer.dir, "done", f"{shard}.json"),
                               {"shard": shard, "images": len(keys), "masks": t.num_rows})
            ds.write_part(shard, t, row_group_size=rounds.PART_ROW_GROUP)
            total += t.num_rows
        writer.finish({"images": len(keys_all), "masks": len(keys_all) * per})
        print(f"  round {number} ({stage}): {per} masks per image, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    # 1,000 decisions, so the curation state is not trivial
    rng2 = random.Random(0)
    decided = [f"round-0001/{k}/1" for k in rng2.sample(keys_all, min(1000, len(keys_all)))]
    curation.record(corpus, [curation.Decision("mask", m, rng2.choice(["approve", "reject"]),
                                               "bench") for m in decided])
    marker.write_text(json.dumps({"masks": total}))
    return total, keys_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m dataengine dashboard`` in its own process."""

    def __init__(self, root: str, cache_dir: str, timeout: float = 7200) -> None:
        self.port = free_port()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataengine", "dashboard", "--root", root, "--port",
             str(self.port), "--cache-dir", cache_dir], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/static/style.css", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"dashboard did not start (exit {self.proc.poll()})")
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - t0

    def rss_mb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
        return -1

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def timed(client: httpx.Client, *urls: str) -> float:
    t0 = time.perf_counter()
    for u in urls:
        r = client.get(u)
        if r.status_code != 200:
            raise RuntimeError(f"{u}: {r.status_code} {r.text[:300]}")
        _ = r.content
    return (time.perf_counter() - t0) * 1000


def browse_url(rng: random.Random) -> str:
    parts = [f"sort={rng.choice(['predicted_iou', 'stability_score', 'area', 'n_clicks', 'key'])}",
             f"order={rng.choice(['asc', 'desc'])}", f"page={rng.randint(0, 20)}",
             "per_page=48", f"min_iou={rng.uniform(0.3, 0.9):.2f}"]
    if rng.random() < 0.7:
        parts.append(f"stage={rng.choice(['auto', 'semi', 'manual'])}")
    if rng.random() < 0.3:
        parts.append(f"round={rng.choice([1, 2, 3])}")
    if rng.random() < 0.5:
        parts.append(f"min_area={rng.randint(0, 2000)}")
    return "/api/browse?" + "&".join(parts)


def kinds(rng: random.Random, keys: list[str]) -> dict[str, list[str]]:
    """One request (list of URLs) per page kind; Sample picks from ``keys``."""
    key = keys[rng.randrange(len(keys))]
    return {"overview": ["/api/overview"], "browse": [browse_url(rng)],
            "sample": [f"/api/sample/{key}", f"/api/image/{key}"]}


def p95(values: list[float]) -> float:
    return round(float(np.percentile(values, 95)), 1)


def measure_dashboard(root: Path, masks: int, warm: int, restarts: int, work: Path) -> dict:
    corpus = Corpus(str(root))
    t0 = time.perf_counter()
    total, keys = build_rounds(corpus, masks)
    print(f"[dash] {total} masks over {len(keys)} images ready in "
          f"{time.perf_counter() - t0:.0f}s; starting the dashboard (builds its store) ...",
          flush=True)
    cache = str(work / "dash-cache")
    shutil.rmtree(cache, ignore_errors=True)
    rng = random.Random(0)
    srv = Server(str(root), cache)
    build_s = srv.startup_s
    times: dict[str, list[float]] = {"overview": [], "browse": [], "sample": []}
    cold: dict[str, list[float]] = {"overview": [], "browse": [], "sample": []}
    rss = []
    try:
        with httpx.Client(base_url=srv.base, timeout=600) as c:
            # warm: 20 images visited once before (as bench_dashboard does); cold: any image
            seen = [keys[rng.randrange(len(keys))] for _ in range(20)]
            for k in seen:
                timed(c, f"/api/sample/{k}", f"/api/image/{k}")
            for _ in range(5):
                for urls in kinds(rng, seen).values():
                    timed(c, *urls)
            for _ in range(warm):
                for kind, urls in kinds(rng, seen).items():
                    times[kind].append(timed(c, *urls))
            n = c.get("/api/overview").json()["masks"]
            assert n >= total, (n, total)
        rss.append(srv.rss_mb())
    finally:
        srv.stop()
    for _ in range(restarts):
        srv = Server(str(root), cache)
        try:
            with httpx.Client(base_url=srv.base, timeout=600) as c:
                for kind, urls in kinds(rng, keys).items():
                    cold[kind].append(timed(c, *urls))
            rss.append(srv.rss_mb())
        finally:
            srv.stop()
    out = {"masks": total, "images": len(keys), "build_s": round(build_s, 1),
           "p95": {k: p95(v) for k, v in times.items()},
           "cold_p95": {k: p95(v) for k, v in cold.items()}, "rss_mb": max(rss),
           "store_mb": round(sum(f.stat().st_size for f in Path(cache).glob("*.duckdb*"))
                             / 2**20, 1)}
    print(f"[dash] {json.dumps(out)}", flush=True)
    return out

