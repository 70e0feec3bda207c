"""Active selection against order and random: the engine protocol, same model, same budget.

One command::

    python benchmarks/bench_active.py [--init shipped|MODEL] [--profile full|medium|quick|smoke]
                                      [--seed 0] [--data ../shared/data] [--out /tmp/bench-active]

Shards ``coco128-seg`` + coco-mini ``train2017`` (training split) and coco-mini ``val2017`` (held
out), publishes and evaluates the starting model once (``--init``: ``shipped``, the starting
checkpoint under ``models/weights/`` with bench_engine's recipe for it; a saved SAM folder such
as ``ROOT/models/sam/vNNNN`` or a checkpoint file; default random weights of the tiny SAM), then
copies that corpus once per selection way (``order``, ``random``, ``uncertainty+diversity``) and
runs the same engine protocol on each copy: ``rounds`` assisted-manual rounds of
``images_per_round`` images, each followed by retraining, held-out evaluation and the gate. The
budget (images per round, rounds, training steps) and the seed are the same for all three.

Prints, per way and round, the images, clicks spent (every click of the simulated annotator,
on the masks it accepted and on those it gave up on, cumulative) and the held-out mIoU@1 and
NoC@75 of the model retrained after the round; then, for ``uncertainty+diversity``, the clicks
it had spent when its retrained model first reached random's final held-out mIoU@1 (the
issue's target: >= 20% fewer than random spent), and ends with::

    RESULT clicks_order=A clicks_random=B clicks_active=C miou1_random=D miou1_active=E

(``clicks_*``: total clicks after the last round; ``miou1_*``: held-out mIoU@1 of the model
retrained after the last round). Step-based figures: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402

WAYS = ("order", "random", "uncertainty+diversity")
NAME = "bench-active"   # the engine's name (its records under ROOT/engine/NAME/)

# The protocol, frozen before the run (bench_engine's recipe, every way the same).
PROTOCOL = {
    "shard": {"samples_per_shard": 32, "task_cpus": 0.5,
              "image": {"resize_mode": "keep_ratio", "image_size": 320}},
    "engine": {
        "stages": [{"stage": "manual", "rounds": 3}],
        "images_per_round": 24,
        "only_with_ground_truth": True,
        "init": "random", "model": "tiny", "seed": 0,
        "retrain_lr_factor": 0.5, "retrain_steps": 300,
        "selection_options": {"points_per_side": 6, "pool_factor": 3.0},
        "annotate": {
            "annotator": {"target_iou": 0.75, "max_clicks": 20, "accept_iou": 0.5,
                          "image_budget_seconds": 120.0, "max_objects_per_image": 8},
            "num_actors": 2, "num_cpus": 0.5, "torch_threads": 1,
        },
        # bench_engine's measured recipe and evaluation; a shorter first training and a
        # coarser automatic grid keep three ways x three rounds within the budget
        "train": {**copy.deepcopy(bench_engine.PROTOCOL["engine"]["train"]), "steps": 600},
        # every retrained model is kept going (the comparison is of the data, not the gate)
        "gate": {"tolerance": {"miou1": 1.0, "noc50": 100.0}},
        "eval": {**copy.deepcopy(bench_engine.PROTOCOL["engine"]["eval"]),
                 "amg_points_per_side": 4},
    },
}

# A small protocol that proves the benchmark runs on a loaded machine: 3 rounds of 6 images,
# 40 training steps, a 16-image held-out subset.
QUICK = json.loads(json.dumps(PROTOCOL))
QUICK["engine"].update({"images_per_round": 6, "retrain_steps": 20})
QUICK["engine"]["annotate"]["annotator"]["max_objects_per_image"] = 4
QUICK["engine"]["train"].update({"steps": 40, "warmup_steps": 5, "checkpoint_every": 20})
QUICK["engine"]["eval"].update({"max_images": 16, "max_objects_per_image": 2,
                                "tune_objects": 20, "max_clicks": 10})
# Proves only that every way runs to the RESULT line (3 rounds of 4 images, 4 training steps, 4
# held-out images): a few minutes where Ray Train gets little CPU; its figures mean nothing.
SMOKE = json.loads(json.dumps(QUICK))
SMOKE["engine"].update({"images_per_round": 4, "retrain_steps": 4})
SMOKE["engine"]["annotate"]["annotator"]["max_objects_per_image"] = 2
SMOKE["engine"]["train"].update({"steps": 4, "warmup_steps": 1, "checkpoint_every": 4})
SMOKE["engine"]["eval"].update({"max_images": 4, "tune_objects": 8, "max_clicks": 5})
# Between the two, for a run of about a quarter of an hour from the shipped model (MEASURED: 850-970
# s): 3 rounds of 12 images, a 24-image / 2-object held-out subset.
MEDIUM = json.loads(json.dumps(QUICK))
MEDIUM["engine"].update({"images_per_round": 12})
MEDIUM["engine"]["annotate"]["annotator"]["max_objects_per_image"] = 5
MEDIUM["engine"]["eval"].update({"max_images": 24, "tune_objects": 30})
PROFILES = {"full": PROTOCOL, "medium": MEDIUM, "quick": QUICK, "smoke": SMOKE}


def apply_init(protocol: dict, init: str, profile: str) -> None:
    """Start from the shipped checkpoint, a saved SAM folder (its config and training recipe) or
    a checkpoint file."""
    if not init:
        return
    eng = protocol["engine"]
    if init == "shipped":
        steps = eng["train"]["steps"], eng["retrain_steps"]
        bench_engine.start_from_shipped(protocol, "full" if profile == "full" else "quick")
        if profile == "smoke":
            eng["train"]["steps"], eng["retrain_steps"] = steps
        return
    cfg_file = Path(init) / "config.json"
    if cfg_file.exists():
        saved = json.loads(cfg_file.read_text())
        eng["model"] = eng["train"]["model"] = saved["sam"]["name"]
        eng["train"]["recipe"].update(saved.get("recipe") or {})
    eng.update({"init": "checkpoint", "checkpoint": str(Path(init).resolve())})


def setup_ray() -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})


def base_corpus(out: Path, data: Path, protocol: dict) -> str:
    """The sharded corpus with the starting model published, evaluated and promoted."""
    from dataengine.pipeline.core.config import from_dict
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import run_engine
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    root = out / "base"
    if (root / "ready.json").exists():
        return str(root)
    if root.exists():
        shutil.rmtree(root)
    sources = [str(data / "coco128-seg"),
               str(data / "coco-mini" / "annotations" / "instances_train2017.json"),
               str(data / "coco-mini" / "annotations" / "instances_val2017.json")]
    scfg = from_dict(ShardConfig, {**protocol["shard"], "holdout_sources": [sources[2]]})
    summary = shard(sources, str(root), scfg)
    print(f"shard: {summary['ok']} images, {summary['masks']} masks", flush=True)
    run_engine(str(root), from_dict(EngineConfig, {**protocol["engine"], "name": NAME,
                                                   "max_steps": 1}))
    (root / "ready.json").write_text("{}")
    return str(root)


def run_way(out: Path, base: str, protocol: dict, way: str) -> list[dict]:
    """The engine with selection ``way`` on a copy of the base corpus; per-round rows."""
    from dataengine.pipeline.core.config import from_dict
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import run_engine
    from dataengine.pipeline.engine.steps import StepLog

    root = out / way.replace("+", "-")
    if not root.exists():
        shutil.copytree(base, root)
    cfg = from_dict(EngineConfig, {**protocol["engine"], "name": NAME, "selection": way})
    t0 = time.time()
    run_engine(str(root), cfg, progress=lambda s: print(f"  [{way} {time.time() - t0:5.0f}s] "
                                                          f"{s}", flush=True))
    log = StepLog(Corpus(str(root)), NAME)
    rows, clicks = [], 0
    idx = 0
    while (ann := log.find("annotate", idx)) is not None:
        m = ann["metrics"]
        clicks += int(m.get("clicks") or 0) + int(m.get("discarded_clicks") or 0)
        ev = (log.find("eval", idx) or {}).get("metrics") or {}
        rows.append({"way": way, "round_index": idx, "images": m.get("images"),
                     "masks": m.get("masks"), "clicks": clicks,
                     "clicks_per_mask": m.get("clicks_per_mask"), "miou1": ev.get("miou1"),
                     "noc75": ev.get("noc75"), "version": (log.find("eval", idx) or {})
                     .get("version")})
        idx += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/bench-active")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--init", default="", help="starting SAM: 'shipped', a saved model folder "
                    "or a checkpoint file (default: random weights of the tiny SAM)")
    ap.add_argument("--seed", type=int, default=0, help="the engine's seed (what random "
                    "selection picks); the same for every way")
    args = ap.parse_args()
    protocol = json.loads(json.dumps(PROFILES[args.profile]))
    apply_init(protocol, args.init, args.profile)
    protocol["engine"]["seed"] = args.seed
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proto_file = out / "protocol.json"
    if proto_file.exists() and json.loads(proto_file.read_text()) != protocol:
        raise SystemExit(f"{proto_file} holds a different protocol: use a new --out")
    proto_file.write_text(json.dumps(protocol, indent=1))
    setup_ray()
    t0 = time.time()
    base = base_corpus(out, Path(args.data), protocol)
    results = {way: run_way(out, base, protocol, way) for way in WAYS}
    print(f"total {time.time() - t0:.0f} s")
    start = starting_eval(base, protocol)
    print(f"starting model (every way's v0001) on the held-out objects: mIoU@1 "
          f"{start['miou1']:.3f}, NoC@75 {start['noc75']:.2f} ({start.get('objects')} objects)")
    report(results)


def starting_eval(base: str, protocol: dict) -> dict:
    """The held-out evaluation of the starting model (stored once in the base corpus)."""
    from dataengine.pipeline.core.config import from_dict
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import evaluate_version

    cfg = from_dict(EngineConfig, {**protocol["engine"], "name": NAME})
    return evaluate_version(base, cfg, "v0001")


def report(results: dict[str, list[dict]]) -> None:
    """The per-round table, the clicks-to-quality comparison and the RESULT line."""
    def f(v, nd=3):
        return "-" if v is None else f"{v:.{nd}f}"

    print(f"{'selection':>22} {'round':>5} {'imgs':>4} {'masks':>5} {'clicks':>6} "
          f"{'clk/mask':>8} {'mIoU@1':>7} {'NoC@75':>7}   (clicks: cumulative, given-up masks "
          f"included; mIoU@1, NoC@75: held out, model retrained after the round)")
    for way, rows in results.items():
        for r in rows:
            print(f"{way:>22} {r['round_index'] + 1:>5} {r['images']:>4} {r['masks']:>5} "
                  f"{r['clicks']:>6} {f(r['clicks_per_mask'], 2):>8} {f(r['miou1']):>7} "
                  f"{f(r['noc75'], 2):>7}")
    last = {w: rows[-1] for w, rows in results.items() if rows}
    rand, act = last.get("random"), last.get("uncertainty+diversity")
    if rand and act and not rand["miou1"]:
        print("target: cannot be judged: random's final held-out mIoU@1 is "
              f"{f(rand['miou1'])} (start from a trained model: --init)")
    elif rand and act:
        reach = next((r for r in results["uncertainty+diversity"]
                      if r["miou1"] is not None and r["miou1"] >= rand["miou1"]), None)
        if reach is None:
            best = max(r["miou1"] or 0.0 for r in results["uncertainty+diversity"])
            print(f"target: uncertainty+diversity never reached random's final held-out mIoU@1 "
                  f"{f(rand['miou1'])} (its best {f(best)}): NOT MET")
        else:
            saving = 1 - reach["clicks"] / rand["clicks"] if rand["clicks"] else 0.0
            print(f"target: uncertainty+diversity reached random's final held-out mIoU@1 "
                  f"{f(rand['miou1'])} after round {reach['round_index'] + 1} with "
                  f"{reach['clicks']} clicks vs random's {rand['clicks']} ({saving:+.0%} fewer; "
                  f">= 20% wanted): {'MET' if saving >= 0.2 else 'NOT MET'}")
    print("RESULT " + " ".join([
        f"clicks_order={last['order']['clicks'] if 'order' in last else 'nan'}",
        f"clicks_random={rand['clicks'] if rand else 'nan'}",
        f"clicks_active={act['clicks'] if act else 'nan'}",
        f"miou1_random={f(rand['miou1']) if rand else 'nan'}",
        f"miou1_active={f(act['miou1']) if act else 'nan'}"]))


if __name__ == "__main__":
    main()
