"""Soak: many writers on one corpus, killed at random, then everything accounted for.

For ``--seconds`` (default 180) these writers work on one root at once, each a real process
(``python -m dataengine ...``) restarted when it ends or is killed:

- ``--shard-writers`` (default 2) shard runs, each on its own folder that keeps growing plus a
  folder every run shares (COCO JSON with one mask per image, so round 0 grows too);
- one ``annotate`` writer: manual rounds with the tiny random SAM (``--model tiny-test``);
- one ``dashboard`` (``dataengine dashboard``) and two HTTP clients of it: a curation writer
  (image decisions, ``POST /api/decisions``) and a person annotating a people round (lease,
  accept masks, submit, ``/api/annotate/...``).

A chaos loop SIGKILLs a random writer process (the dashboard included) every few seconds. At
the end every writer is stopped, each shard command and the annotate command is run once more
(a re-run heals a killed run), and the bench checks:

- every source image is stored exactly once (``images_lost``, ``duplicates``);
- every decision the dashboard answered 200 to is in the log exactly once (``decisions_lost``);
- every mask the dashboard accepted is in the people round (its events, or its written shard)
  exactly once (``masks_lost``);
- ``dataengine verify`` reports no problem (``verify_problems``).

    python benchmarks/bench_integrity.py [--seconds 180] [--root DIR] [--keep]

Ends with ``RESULT writers=.. kills=.. images_lost=.. masks_lost=.. decisions_lost=..
duplicates=.. verify_problems=..``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataengine.pipeline.core import storage  # noqa: E402
from dataengine.pipeline.core.layout import Corpus  # noqa: E402
from dataengine.pipeline.core.shards import iter_tar  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def add_images(folder: Path, start: int, n: int, seed: int) -> list[Path]:
    """``n`` new small images with a bright square (the object of the COCO mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(seed * 100_000 + i)
        img = rng.integers(0, 90, (48, 64, 3), dtype=np.uint8)
        img[10:30, 16:44] = rng.integers(150, 255, 3, dtype=np.uint8)
        path = folder / f"img-{seed}-{i:05d}.png"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


def write_coco(folder: Path, images: list[Path]) -> str:
    """``annotations/instances_imgs.json`` next to ``imgs/`` with one square mask per image."""
    data = {"images": [{"id": i + 1, "file_name": p.name, "width": 64, "height": 48}
                       for i, p in enumerate(images)],
            "categories": [{"id": 1, "name": "square"}],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                             "segmentation": [[16, 10, 44, 10, 44, 30, 16, 30]]}
                            for i in range(len(images))]}
    path = folder / "annotations" / "instances_imgs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return str(path)


class Procs:
    """The writer processes alive now (so the chaos loop can kill one) and the kill count."""

    def __init__(self, min_life: dict[str, float]) -> None:
        self.lock = threading.Lock()
        self.min_life = min_life  # a process is killed only after living this long
        self.live: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.kills = 0
        self.runs = Counter()

    def run(self, name: str, args: list[str], log: Path, timeout: float = 600) -> int:
        with open(log, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "dataengine", *args], cwd=REPO, env=ENV,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.live[name] = p
                self.started[name] = time.time()
                self.runs[name] += 1
            try:
                return p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                return p.wait()
            finally:
                with self.lock:
                    if self.live.get(name) is p:
                        del self.live[name]

    def kill_one(self, rng: random.Random) -> str | None:
        with self.lock:
            now = time.time()
            names = [n for n, p in self.live.items() if p.poll() is None and
                     now - self.started[n] >= self.min_life.get(n, self.min_life["*"])]
            if not names:
                return None
            name = rng.choice(names)
            try:
                os.killpg(self.live[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                return None
            self.kills += 1
            return name


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.root = str(work / "corpus")
        self.procs = Procs({"*": args.min_life, "dashboard": 4 * args.min_life})
        self.stop = threading.Event()
        self.rng = random.Random(args.seed)
        self.images: list[Path] = []
        self.images_lock = threading.Lock()
        self.decisions: list[str] = []      # reasons of decisions answered 200
        self.masks: list[float] = []        # "seconds" tags of masks answered 200
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # ---- writers ----------------------------------------------------------------------
    def shard_cmd(self, w: int) -> list[str]:
        with self.images_lock:
            own = write_coco(self.work / f"src{w}", self.folder_images(f"src{w}"))
            shared = write_coco(self.work / "shared", self.folder_images("shared"))
        return ["shard", own, shared, "--root", self.root, "--samples-per-shard", "4",
                "--set", "use_ray=false"]

    def folder_images(self, name: str) -> list[Path]:
        return sorted((self.work / name / "imgs").glob("*.png"))

    def shard_writer(self, w: int) -> None:
        n = 0
        while not self.stop.is_set():
            with self.images_lock:
                self.images += add_images(self.work / f"src{w}" / "imgs", n, 3, seed=w + 1)
                if w == 0:
                    self.images += add_images(self.work / "shared" / "imgs", n, 1, seed=99)
            n += 3
            self.procs.run(f"shard{w}", self.shard_cmd(w), self.logs / f"shard{w}.log")

    def annotate_cmd(self) -> list[str]:
        return ["annotate", "--root", self.root, "--stage", "manual", "--model", "tiny-test",
                "--set", "use_ray=false", "--set", "max_images_per_shard=1",
                "--set", "annotator.max_clicks=1", "--set", "annotator.max_objects_per_image=1",
                "--set", "use_embedding_cache=false"]

    def annotate_writer(self) -> None:
        while not self.stop.is_set():
            if not Corpus(self.root).image_shards():
                time.sleep(1)
                continue
            self.procs.run("annotate", self.annotate_cmd(), self.logs / "annotate.log")

    def dashboard(self) -> None:
        while not self.stop.is_set():
            self.procs.run("dashboard", ["dashboard", "--root", self.root, "--port",
                                         str(self.port), "--cache-dir", str(self.work / "cache"),
                                         "--torch-threads", "1", "--set", "refresh_seconds=1",
                                         "--set", "precompute=off"],
                           self.logs / "dashboard.log", timeout=10 ** 6)

    def curation_writer(self) -> None:
        import httpx

        i = 0
        while not self.stop.is_set():
            keys = self.index_keys()
            if not keys:
                time.sleep(1)
                continue
            # one decision, retried with the same decision_id until the dashboard answers
            did = f"{self.args.seed:08x}{i:024x}"
            body = {"decisions": [{"target_type": "image", "target": self.rng.choice(keys),
                                   "decision": self.rng.choice(["approve", "reject"]),
                                   "reason": f"bench-{i}", "decision_id": did}]}
            while not self.stop.is_set():
                try:
                    r = httpx.post(f"{self.url}/api/decisions", json=body, timeout=30)
                    if r.status_code == 200:
                        self.decisions.append(did)
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)  # the dashboard is down (killed): retry the same request
            i += 1
            time.sleep(0.2)

    def person(self) -> None:
        import httpx

        number, i = None, 0
        while not self.stop.is_set():
            try:
                if number is None:
                    number = self._open_people_round(httpx)
                    continue
                lease = httpx.post(f"{self.url}/api/annotate/{number}/lease", json={},
                                   timeout=60).json()
                if lease.get("lease") is None:
                    number = None  # round done: open the next one
                    continue
                lid = lease["lease"]["lease_id"]
                uids = set()
                for k in range(2):
                    tag = round(1.0 + i / 1024, 6)
                    i += 1
                    r = httpx.post(f"{self.url}/api/annotate/{number}/accept", timeout=60,
                                   json={"lease_id": lid, "seconds": tag,
                                         "points": [{"x": 30 + 60 * k, "y": 20, "label": 1}]})
                    # the same mask accepted twice is saved once (the first uid comes back)
                    if r.status_code == 200 and r.json()["uid"] not in uids:
                        uids.add(r.json()["uid"])
                        self.masks.append(tag)
                httpx.post(f"{self.url}/api/annotate/{number}/submit", json={"lease_id": lid},
                           timeout=60)
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.5)

    def _open_people_round(self, httpx) -> int | None:
        r = httpx.post(f"{self.url}/api/annotate/rounds", timeout=60,
                       json={"stage": "manual", "model_version": "v0001", "n_images": 4})
        if r.status_code != 202:
            time.sleep(1)  # the dashboard is down
            return None
        while True:  # opening runs as a background job of that dashboard process
            j = httpx.get(f"{self.url}{r.json()['status_url']}", timeout=60).json()
            if j["status"] == "done":
                return j["result"]["round"]
            if j["status"] == "failed":
                time.sleep(1)  # no image left yet
                return None
            time.sleep(0.2)

    def index_keys(self) -> list[str]:
        try:
            from dataengine.pipeline.core.index import load_index

            return load_index(self.root).column("key").to_pylist()
        except Exception:  # noqa: BLE001 - mid-publish on another writer: next time
            return []

    def chaos(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.args.kill_every)):
            name = self.procs.kill_one(self.rng)
            if name:
                print(f"  {time.strftime('%H:%M:%S')} SIGKILL {name}", flush=True)

    # ---- the run ----------------------------------------------------------------------
    def setup(self) -> None:
        from dataengine.models.sam import build_sam
        from dataengine.pipeline.core import versions
        from dataengine.pipeline.core.checkpoints import save_sam

        corpus = Corpus(self.root)
        self.images += add_images(self.work / "shared" / "imgs", 1000, 4, seed=99)
        version, vdir = versions.claim_version(corpus, "sam")
        save_sam(build_sam("tiny-test", seed=0, device="cpu"), vdir)
        versions.publish_version(corpus, "sam", version, note="bench_integrity people rounds")

    def run(self) -> dict[str, int]:
        self.setup()
        threads = [threading.Thread(target=self.shard_writer, args=(w,), daemon=True)
                   for w in range(self.args.shard_writers)]
        threads += [threading.Thread(target=f, daemon=True)
                    for f in (self.annotate_writer, self.dashboard, self.curation_writer,
                              self.person, self.chaos)]
        for t in threads:
            t.start()
        time.sleep(self.args.seconds)
        self.stop.set()
        with self.procs.lock:
            for p in self.procs.live.values():
                os.killpg(p.pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        return self.heal_and_count()

    def heal_and_count(self) -> dict[str, int]:
        print("final re-runs (heal) ...", flush=True)
        for w in range(self.args.shard_writers):
            rc = self.procs.run("final", self.shard_cmd(w), self.logs / "final.log")
            print(f"  shard{w}: exit {rc}", flush=True)
        rc = self.procs.run("final", self.annotate_cmd(), self.logs / "final.log")
        print(f"  annotate: exit {rc}", flush=True)
        corpus = Corpus(self.root)
        stored = Counter(s["__key__"] for n in corpus.image_shards()
                         for s in iter_tar(corpus.image_shard(n)))
        expected = {key_of(p) for p in self.images}
        out = {"images_lost": len(expected - set(stored)),
               "image_duplicates": sum(c - 1 for c in stored.values())}
        out.update(self.count_decisions(corpus))
        out.update(self.count_masks(corpus))
        r = subprocess.run([sys.executable, "-m", "dataengine", "verify", "--root", self.root],
                           cwd=REPO, env=ENV, capture_output=True, text=True)
        print(r.stdout[-3000:], flush=True)
        m = re.search(r"(\d+) problem\(s\)", r.stdout)
        out["verify_problems"] = int(m.group(1)) if m else 1
        return out

    def count_decisions(self, corpus: Corpus) -> dict[str, int]:
        from dataengine.pipeline.core.curation import load_log

        ids = Counter(load_log(corpus).table.column("decision_id").to_pylist())
        raw = sum(storage.read_table(u).num_rows
                  for u in storage.listdir(corpus.curation, r"decisions-.*\.parquet"))
        print(f"decision log: {sum(ids.values())} decisions ({raw} rows: "
              f"{raw - sum(ids.values())} retried requests recorded twice, counted once)")
        return {"decisions_lost": sum(1 for d in self.decisions if ids[d] == 0),
                "decision_duplicates": sum(1 for d in self.decisions if ids[d] > 1)}

    def count_masks(self, corpus: Corpus) -> dict[str, int]:
        from dataengine.pipeline.core.rounds import iter_round_shard, round_shards
        from dataengine.pipeline.server.people import PeopleRound, people_rounds

        found: Counter = Counter()
        for n in people_rounds(corpus):
            written = set(round_shards(corpus, n))
            for shard in written:
                for rec in iter_round_shard(corpus, n, shard):
                    found.update(round(a["seconds"], 6) for a in rec["annotations"])
            state = PeopleRound(corpus, n)
            for st in state.images.values():
                if st.shard not in written:
                    found.update(round(a["seconds"], 6) for a in st.accepted.values())
        return {"masks_lost": sum(1 for t in self.masks if found[t] == 0),
                "mask_duplicates": sum(1 for t in self.masks if found[t] > 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="How long the writers run.")
    ap.add_argument("--shard-writers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 8.0),
                    metavar=("MIN", "MAX"), help="Seconds between two kills (uniform).")
    ap.add_argument("--min-life", type=float, default=8.0, help=(
        "A writer is killed only after running this long (the dashboard 4x): past its start."))
    ap.add_argument("--root", default=None, help="Work folder (default: a temporary one).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.root or tempfile.mkdtemp(prefix="bench-integrity-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_integrity: {args.seconds:.0f}s, {args.shard_writers} shard writers, annotate, "
          f"dashboard + curation + person, kills every {args.kill_every} s; work {work}",
          flush=True)
    bench = Bench(args, work)
    t0 = time.time()
    try:
        res = bench.run()
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(work, ignore_errors=True)
    writers = args.shard_writers + 4  # + annotate, dashboard, curation client, person client
    print(f"runs per writer: {dict(bench.procs.runs)}; decisions accepted "
          f"{len(bench.decisions)}, masks accepted {len(bench.masks)}, images "
          f"{len(bench.images)}; {time.time() - t0:.0f}s", flush=True)
    dup = res["image_duplicates"] + res["decision_duplicates"] + res["mask_duplicates"]
    print(f"RESULT writers={writers} kills={bench.procs.kills} images_lost={res['images_lost']} "
          f"masks_lost={res['masks_lost']} decisions_lost={res['decisions_lost']} "
          f"duplicates={dup} verify_problems={res['verify_problems']}", flush=True)


if __name__ == "__main__":
    main()
