"""How the corpus's costs grow: the shard stage at 10k / 100k / 1M images, adding one shard to
each corpus, and the dashboard at 10M masks.

One command (the full run, ~1-2 hours on 2 idle cores, ~15 GB of disk in ``--work-dir``)::

    python benchmarks/bench_scale.py --work-dir /tmp/bench-scale

Reduced (proves it works in minutes)::

    python benchmarks/bench_scale.py --work-dir /tmp/bench-scale-small \\
        --sizes 2000,10000,20000 --dash-masks 1000000

**Real photos** (first, small): the 287 photos of ``../shared/data`` (COCO + YOLO-seg, ~2,500
masks) through the same stage: the shard rate when real JPEGs are decoded, and the bytes per
image and per mask of every area (tars, index, manifests), the unit costs of docs/capacity.md.

**Inputs.** Synthetic YOLO-seg datasets of ``--group`` images each (``src/gNNN/images/dNNN/*.jpg``
+ ``labels/...txt``, one polygon per image), so a corpus of N images is ``N / group`` sources.
Every image is the same small 64x64 JPEG (~1.6 kB) with its number in a JPEG comment segment:
the bytes (and keys) differ, the pixels do not, so generating a million takes a minute and the
shard stage still reads, hashes, decodes, checks and writes every one. Every size uses this same
payload (no lighter payload at 1M). Masks: one polygon per image, imported to round 0.

**Shard stage.** ``dataengine.pipeline.ingest.shard.shard`` on a local Ray cluster (``--cpus``
workers, ``--per-shard`` images per shard), in a child process that starts Ray and runs a tiny
warm-up job first, so the figures are the steady state, not Ray's start-up; images/s = images /
wall time of the ``shard()`` call; driver peak RSS = the child's ``VmHWM`` (Ray workers are
other processes).

**Adding one shard.** ``--per-shard`` new images (with masks) sharded into each finished corpus:
the wall time of that ``shard()`` call, which lists the source, writes the shard, merges it into
the index and round 0's manifest and metrics (compaction included when it triggers).

**Dashboard.** The 2nd corpus (100k images) plus synthetic rounds 1-3 (auto, semi, manual) whose
manifest parts are written directly (one part per image shard, ``--dash-masks`` masks in all,
real RLE strings of 64x64 ellipses; the round tars are not written: the measured pages never read
them), and 1,000 curation decisions. The dashboard runs as ``python -m dataengine dashboard`` in
its own process. The first start builds its DuckDB store (reported). Warm: ``--warm`` requests
of each kind on a running server; cold: the first request of each kind after a restart of the
server (``--restarts`` times). Kinds: Overview, Browse (random stage/round/iou/area filters,
random sort and order, random page), Sample (an image with its masks and RLEs). Server RSS: the
server's ``VmHWM``.

Resumable: corpora, sources and finished measurements are kept in ``--work-dir``
(``results.json``); ``--redo shard,add,dash`` measures again. Last line::

    RESULT shard_img_s_10k=.. shard_img_s_100k=.. shard_img_s_1m=.. driver_rss_mb_10k=..
    driver_rss_mb_1m=.. add_shard_s_10k=.. add_shard_s_1m=.. dash_p95_ms_10m=..
    dash_cold_p95_ms_10m=.. dash_rss_mb=..

(the keys name the full sizes; a reduced run maps its three sizes onto them in order).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

KEYS = ("10k", "100k", "1m")


def payload_base() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (90, 120, 150))
    d = ImageDraw.Draw(im)
    d.ellipse((12, 16, 52, 48), fill=(220, 180, 60))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def payload(base: bytes, number: int) -> bytes:
    """``base`` with a COM segment holding ``number``: unique bytes, the same pixels."""
    text = f"dataengine-bench-{number:012d}".encode()
    seg = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
    return base[:2] + seg + base[2:]


LABEL = "0 0.2 0.25 0.8 0.25 0.8 0.75 0.2 0.75\n"


def make_group(path: Path, start: int, count: int, base: bytes, per_dir: int = 1000) -> None:
    """A YOLO-seg dataset of ``count`` images numbered from ``start`` (skipped when present)."""
    done = path / ".complete"
    if done.exists():
        return
    for i in range(count):
        sub = f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            (path / "images" / sub).mkdir(parents=True, exist_ok=True)
            (path / "labels" / sub).mkdir(parents=True, exist_ok=True)
        name = f"i{start + i:09d}"
        (path / "images" / sub / f"{name}.jpg").write_bytes(payload(base, start + i))
        (path / "labels" / sub / f"{name}.txt").write_text(LABEL)
    done.write_text(str(count))


def sources_for(work: Path, n: int, group: int, base: bytes) -> list[str]:
    groups = []
    for g in range((n + group - 1) // group):
        count = min(group, n - g * group)
        path = work / "src" / f"g{group}-{g:04d}-{count}"
        make_group(path, g * group, count, base)
        groups.append(str(path))
    return groups


def child_shard(args: argparse.Namespace) -> None:
    """(child process) start Ray, warm up, time one shard() call, print its figures as JSON."""
    import logging

    import ray

    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    logging.basicConfig(level=logging.WARNING)
    # address="local": our own instance, never another Ray running on this machine
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    warm = Path(args.root).parent / "warmup"
    shutil.rmtree(warm, ignore_errors=True)
    base = payload_base()
    make_group(warm / "src", 10**11, 4, base)
    cfg = ShardConfig(samples_per_shard=args.per_shard, task_cpus=1.0)
    shard([str(warm / "src")], str(warm / "corpus"), cfg)
    t0 = time.perf_counter()
    summary = shard(args.sources, args.root, cfg)
    seconds = time.perf_counter() - t0
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) // 1024
    print("CHILD " + json.dumps({"seconds": seconds, "ok": summary["ok"],
                                 "written": summary["shards_written"],
                                 "failed": len(summary["failed_shards"]),
                                 "timings": summary.get("timings"), "rss_mb": hwm}))
    ray.shutdown()


def run_child(root: Path, sources: list[str], a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "_shard", "--root", str(root), "--cpus", str(a.cpus),
           "--per-shard", str(a.per_shard), "--sources", *sources]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD "):
            return json.loads(line[6:])
    raise RuntimeError(f"shard child failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                       f"{out.stderr[-5000:]}")


def measure_shard(work: Path, n: int, a: argparse.Namespace, base: bytes) -> dict:
    root = work / f"corpus-{n}"
    shutil.rmtree(root, ignore_errors=True)  # a half-built corpus is measured again from zero
    t0 = time.perf_counter()
    srcs = sources_for(work, n, a.group, base)
    print(f"[{n}] sources ready in {time.perf_counter() - t0:.1f}s; sharding ...", flush=True)
    res = run_child(root, srcs, a)
    assert res["ok"] == n and not res["failed"], res
    out = {"images": n, "img_s": n / res["seconds"], "rss_mb": res["rss_mb"],
           "seconds": res["seconds"], "timings": res["timings"]}
    print(f"[{n}] shard: {out['img_s']:.0f} images/s, driver peak RSS {out['rss_mb']} MB, "
          f"{res['seconds']:.1f}s", flush=True)
    return out


def measure_add(work: Path, n: int, a: argparse.Namespace, base: bytes) -> dict:
    root = work / f"corpus-{n}"
    add = work / "src" / f"add-{n}-{random.randrange(10**9)}"
    make_group(add, 5 * 10**10 + n * 10 + random.randrange(10**6) * 10**4, a.per_shard, base)
    res = run_child(root, [str(add)], a)
    shutil.rmtree(add, ignore_errors=True)
    assert res["ok"] == a.per_shard and res["written"] == 1, res
    print(f"[{n}] add one shard of {a.per_shard}: {res['seconds']:.2f}s", flush=True)
    return {"seconds": res["seconds"], "timings": res["timings"]}


def measure_real(work: Path, a: argparse.Namespace) -> dict:
    """Unit costs on real photos (../shared/data: COCO + YOLO-seg, with masks): the shard rate
    with decoding real JPEGs, and bytes per image and per mask in every area."""
    from dataengine.pipeline.core import index, rounds
    from dataengine.pipeline.core.layout import Corpus

    data = REPO.parent / "shared" / "data"
    srcs = [str(data / "coco-mini/annotations/instances_train2017.json"),
            str(data / "coco-mini/annotations/instances_val2017.json"), str(data / "coco128-seg")]
    root = work / "corpus-real"
    shutil.rmtree(root, ignore_errors=True)
    res = run_child(root, srcs, argparse.Namespace(**{**vars(a), "per_shard": 100}))
    corpus = Corpus(str(root))
    index.compact_index(corpus, force=True)
    rounds.manifest_dataset(corpus, 0).compact(force=True)

    def size(pattern: str) -> int:
        return sum(p.stat().st_size for p in root.glob(pattern))

    n = res["ok"]
    masks = rounds.read_round_manifest(corpus, 0, ["key"]).num_rows
    out = {"images": n, "masks": masks, "img_s": n / res["seconds"],
           "tar_bytes_per_image": size("images/shard-*.tar") / n,
           "index_part_bytes_per_image": size("images/index/part-*.parquet") / n,
           "index_compact_bytes_per_image": size("images/index/compact-*.parquet") / n,
           "done_bytes_per_image": size("images/shard-*.done.json") / n,
           "round_tar_bytes_per_mask": size("annotations/round-0000/shard-*.tar") / masks,
           "manifest_part_bytes_per_mask":
               size("annotations/round-0000/manifest/shard-*.parquet") / masks,
           "manifest_compact_bytes_per_mask":
               size("annotations/round-0000/manifest/compact-*.parquet") / masks}
    print("[real] " + json.dumps({k: round(v, 1) for k, v in out.items()}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/bench-scale")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--group", type=int, default=10_000, help="images per source folder")
    ap.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs")
    ap.add_argument("--dash-masks", type=int, default=10_000_000)
    ap.add_argument("--warm", type=int, default=60)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--redo", default="",
                    help="comma list of real,shard,add,dash to measure again")
    ap.add_argument("--clean", action="store_true", help="delete the work dir at the end")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if len(sizes) != 3:
        raise SystemExit("--sizes: give three sizes (they map onto 10k, 100k, 1m)")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rfile = work / "results.json"
    results = json.loads(rfile.read_text()) if rfile.exists() else {}
    redo = set(filter(None, a.redo.split(",")))

    def save() -> None:
        rfile.write_text(json.dumps(results, indent=2))

    base = payload_base()
    if "real" not in results or "real" in redo:
        results["real"] = measure_real(work, a)
        save()
    for n in sizes:
        key = f"shard-{n}"
        if key not in results or "shard" in redo:
            results[key] = measure_shard(work, n, a, base)
            results.pop(f"add-{n}", None)
            save()
    for n in sizes:
        key = f"add-{n}"
        if key not in results or "add" in redo:
            results[key] = measure_add(work, n, a, base)
            save()
    from bench_scale_dash import measure_dashboard  # noqa: E402 - beside this file

    dkey = f"dash-{a.dash_masks}"
    if dkey not in results or "dash" in redo:
        results[dkey] = measure_dashboard(work / f"corpus-{sizes[1]}", a.dash_masks, a.warm,
                                          a.restarts, work)
        save()
    report(results, sizes, dkey)
    if a.clean:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, sizes: list[int], dkey: str) -> None:
    shard = [results[f"shard-{n}"] for n in sizes]
    add = [results[f"add-{n}"] for n in sizes]
    dash = results[dkey]
    print(f"\n{'images':>10}{'images/s':>10}{'driver MB':>11}{'add 1 shard s':>15}")
    for n, s, d in zip(sizes, shard, add, strict=True):
        print(f"{n:>10}{s['img_s']:>10.0f}{s['rss_mb']:>11}{d['seconds']:>15.2f}")
    print(f"rate {sizes[1]}/{sizes[0]}: {shard[1]['img_s'] / shard[0]['img_s']:.2f} (>= 0.8); "
          f"driver RSS {sizes[2]}/{sizes[0]}: {shard[2]['rss_mb'] / shard[0]['rss_mb']:.2f} "
          f"(<= 2, and <= 1024 MB); add {sizes[2]}/{sizes[0]}: "
          f"{add[2]['seconds'] / add[0]['seconds']:.2f} (<= 2)")
    print(f"dashboard at {dash['masks']} masks: store built in {dash['build_s']:.1f}s; "
          f"p95 warm {dash['p95']} ms, cold {dash['cold_p95']} ms, server RSS "
          f"{dash['rss_mb']} MB (targets 300 ms, 2000 ms, 4096 MB)")
    vals = {"shard_img_s": [round(s["img_s"], 1) for s in shard],
            "driver_rss_mb": [s["rss_mb"] for s in shard],
            "add_shard_s": [round(d["seconds"], 2) for d in add]}
    parts = [f"shard_img_s_{k}={v}" for k, v in zip(KEYS, vals["shard_img_s"], strict=True)]
    parts += [f"driver_rss_mb_{KEYS[i]}={vals['driver_rss_mb'][i]}" for i in (0, 2)]
    parts += [f"add_shard_s_{KEYS[i]}={vals['add_shard_s'][i]}" for i in (0, 2)]
    parts += [f"dash_p95_ms_10m={max(dash['p95'].values()):.1f}",
              f"dash_cold_p95_ms_10m={max(dash['cold_p95'].values()):.1f}",
              f"dash_rss_mb={dash['rss_mb']}"]
    print("RESULT " + " ".join(parts))


def child_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--root", required=True)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--sources", nargs="+", required=True)
    child_shard(ap.parse_args())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_shard":
        child_main()
    else:
        main()
