"""The whole SAM data engine on the real samples, from the shipped starting model, on this CPU.

One command::

    python benchmarks/bench_engine.py [--data ../shared/data] [--out /tmp/bench-engine]
        [--init shipped|random] [--profile full|quick]

Shards ``coco128-seg`` + coco-mini ``train2017`` (training split, 208 images) and coco-mini
``val2017`` (held out; its 79 annotated images are the evaluation ground truth), then runs the
engine (:mod:`dataengine.pipeline.engine.loop`) with the protocol frozen in :data:`PROTOCOL`
(written to ``OUT/protocol.json`` before anything runs; a re-run with ``--out`` of an interrupted
run resumes and refuses a changed protocol): three assisted-manual rounds, then a semi-automatic
and a fully automatic round (generator thresholds tuned for the round's model on training images),
each on the next slice of training images, each followed by retraining (Ray Train), held-out
evaluation (with the no-model reference: discs painted at the clicks, radius tuned on training
images) and the promotion gate. Prints the per-round table (every row with the no-model
reference), each trained model's metrics on a blank (grey) image, the checks (clicks per mask
falls and held-out mIoU@1 rises round over round, automatic recall of the last model above the
first's, the 1.5x target; the semi pre-fill per image and its precision, the automatic round's
recall, masks per image by stage, promotions), whether the last model looks at the image, and
ends with::

    RESULT rounds=N clicks50_first=X clicks50_last=Y reduction50=X/Y clicks75_first=P
    clicks75_last=Q miou1_first=A miou1_last=B recall50_first=C recall50_last=D nomodel_clicks50=E
    prefill_per_image=.. prefill_precision50=.. auto_recall50=.. masks_per_image_manual=..
    masks_per_image_semi=..

``clicks50_*`` / ``clicks75_*`` / ``miou1_*`` are the held-out NoC@50 / NoC@75 / mIoU@1 of the
model used in the first and in the last assisted-manual round; ``recall50_*`` the held-out
automatic generation recall at IoU 0.5 of the first model and of the engine's final (promoted)
model. Target: ``reduction50 >= 1.5``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The protocol, frozen before the run (see the module docstring).
PROTOCOL = {
    "shard": {"samples_per_shard": 32, "task_cpus": 0.5,
              "image": {"resize_mode": "keep_ratio", "image_size": 320}},
    "engine": {
        "name": "bench",
        # three assisted-manual rounds, then a semi-automatic and a fully automatic one (their
        # generator thresholds tuned for the round's model on training images by the engine)
        "stages": [{"stage": "manual", "rounds": 3}, {"stage": "semi", "rounds": 1},
                   {"stage": "auto", "rounds": 1}],
        "images_per_round": 52,
        "only_with_ground_truth": True,
        "init": "random", "model": "tiny", "seed": 0,
        # later retrainings continue a trained model at half the learning rate (MEASURED,
        # 2026-11-24: at the full 1e-3 the third retraining undid the second's gain, held-out
        # mIoU@1 0.170 -> 0.146)
        "retrain_lr_factor": 0.5,
        # the first retraining (from random weights) runs 1500 steps, the later ones continue
        # it for 500: MEASURED (2026-11-25) two first retrainings of 1000 steps both ended in
        # the middle of the first-click pass's way out of the empty-mask collapse (training
        # IoU of the first click 0.11 and 0.19 and climbing), one with a model that saw the
        # image, one with a model that drew the same masks on a blank image; continuing a
        # model that saw the image at 5e-4 improved it on every held-out metric (NoC@50
        # 8.11 -> 6.03, mIoU@1 0.302 -> 0.308). (The run with this protocol, 2026-11-25:
        # every retraining improved on its parent until the third, but its models did as well
        # on a blank image — the benchmark prints that diagnostic.)
        "retrain_steps": 500,
        "annotate": {
            "annotator": {"target_iou": 0.75, "max_clicks": 20, "accept_iou": 0.5,
                          "image_budget_seconds": 120.0, "max_objects_per_image": 8},
            "num_actors": 2, "num_cpus": 0.5, "torch_threads": 1,
            "semi_amg": {"points_per_side": 8, "pred_iou_thresh": 0.88,
                         "stability_score_thresh": 0.92},
            "amg": {"points_per_side": 16},
        },
        "tune_amg": {"max_images": 24, "points_per_side": 16},
        "train": {
            "model": "tiny", "steps": 1500, "batch_images": 2, "masks_per_image": 16,
            "min_mask_area": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 20,
            "min_lr_factor": 0.2, "checkpoint_every": 100, "log_every": 10,
            # the first click is SAM's point-only prompt (multimask, best of 3), the
            # corrections are painted as discs into the mask prompt; many prompts per image
            # (2 images x 16 masks a step). MEASURED (2026-11-25, 480 CPU-s from random, 1204
            # steps, 40 held-out images): mIoU@1 0.321, NoC@50 4.28, NoC@75 13.91 — and on a
            # blank image 0.260 / 8.13 / 16.47, the first tiny model here that looks at the
            # image; the "fast" recipe (every click painted, 4 x 4 masks) scored as on a
            # blank image. The point-only first pass needs ~800 steps to leave the empty-mask
            # collapse (MEASURED: after 500 steps on round 1's 52 images mIoU@1 was 0.022)
            # IoU head at 5x SAM's weight: mIoU@1 is the mask the IoU head picks of the three,
            # and at 1x it picked badly (MEASURED, 2026-11-25, the first retraining after the
            # random round: held-out mIoU@1 0.286 as picked vs 0.373 for the best of the three,
            # and 0.302 -> 0.286 although the best of three rose 0.334 -> 0.373; the same
            # retraining at 5x: 0.308 picked / 0.362 best; at 20x: 0.245 / 0.283)
            "recipe": {"iterations": 3, "mask_only_iterations": 1, "paint_clicks": True,
                       "click_radius": 10.0, "paint_first_prob": 0.0, "box_prob": 0.0,
                       "iou_weight": 5.0},
            "data": {"train_on_imported": True, "imported_only_annotated": True},
            # one worker, two threads: nothing else runs while it trains (the round's actors
            # are gone), and two threads step 1.44x faster (MEASURED) than one
            "scale": {"num_workers": 1, "cpus_per_worker": 1.0, "torch_threads": 2},
        },
        # "does not regress" within the held-out split's noise (~200 objects: mIoU@1 moves by
        # ~0.01 between equal models). MEASURED: with no tolerance the first retrained model
        # (NoC@50 6.7 vs 20) was rejected for mIoU@1 0.0952 vs the random model's 0.0977
        "gate": {"tolerance": {"miou1": 0.01, "noc50": 0.25}},
        "eval": {"max_clicks": 20, "thresholds": [0.5, 0.75, 0.85, 0.9],
                 "at_clicks": [1, 3, 5], "max_objects_per_image": 4,
                 # automatic recall without the confidence filters (box NMS only): a tiny CPU
                 # model's IoU head and logits are not confident enough to pass any (MEASURED:
                 # stability < 0.5 for every mask at 0.6 / 0.85, so recall was 0 for every
                 # model); this measures what its single-point masks cover
                 "amg_points_per_side": 8, "amg_pred_iou_thresh": 0.0,
                 "amg_stability_score_thresh": 0.0},
    },
}


# A smaller frozen protocol for a loaded or slow machine (``--profile quick``): the same stages
# on rounds of 20 images, 60 training steps (30 when continuing), a 20-image / 2-object held-out
# subset.
QUICK = json.loads(json.dumps(PROTOCOL))
QUICK["engine"].update({"name": "bench-quick", "images_per_round": 20})
QUICK["engine"]["annotate"]["annotator"]["max_objects_per_image"] = 5
QUICK["engine"]["train"].update({"steps": 60, "warmup_steps": 10, "checkpoint_every": 30})
QUICK["engine"]["retrain_steps"] = 30
QUICK["engine"]["tune_amg"].update({"max_images": 12, "points_per_side": 12})
QUICK["engine"]["eval"].update({"max_images": 20, "max_objects_per_image": 2,
                                "tune_objects": 30})
PROFILES = {"full": PROTOCOL, "quick": QUICK}

# Starting from the shipped checkpoint (the default): its model config and training recipe (the
# evaluation and the annotator prompt it as it was trained), and shorter retrainings than from
# random weights, which first have to leave the empty-mask collapse (see above); a pre-trained
# model is fine-tuned at half the rate.
# (first retraining steps, continuing retraining steps) per profile
SHIPPED_STEPS = {"full": (300, 150), "quick": (60, 30)}


def start_from_shipped(protocol: dict, profile: str) -> None:
    """Make ``protocol`` start from the checkpoint shipped under ``models/weights/``."""
    from dataengine.models.weights import provenance, shipped_names

    info = provenance(shipped_names()[0])
    first, later = SHIPPED_STEPS[profile]
    eng = protocol["engine"]
    eng.update({"init": "shipped", "model": info["model"], "retrain_steps": later})
    eng["train"].update({"model": info["model"], "steps": first, "lr": 5e-4,
                         "recipe": dict(info["recipe"])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/bench-engine")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full",
                    help="full: the issue's protocol; quick: a smaller one for loaded machines")
    ap.add_argument("--init", choices=("shipped", "random"), default="shipped",
                    help="shipped: the starting checkpoint under models/weights/ (default); "
                         "random: the tiny config from random weights")
    ap.add_argument("--init-from", default="",
                    help="start from this saved SAM (a model folder, e.g. bench_sam_small's "
                         "OUT/models/<option>) instead")
    args = ap.parse_args()
    protocol = json.loads(json.dumps(PROFILES[args.profile]))
    if args.init == "shipped" and not args.init_from:
        start_from_shipped(protocol, args.profile)
    if args.init_from:
        model_cfg = json.loads((Path(args.init_from) / "config.json").read_text())["sam"]["name"]
        protocol["engine"].update({"init": "checkpoint", "checkpoint": args.init_from,
                                   "model": model_cfg})
        protocol["engine"]["train"]["model"] = model_cfg
        # train on with the recipe the model was trained with (its click-disc radius above all:
        # the annotator and the evaluation paint clicks with the trained radius)
        saved_recipe = json.loads((Path(args.init_from) / "config.json").read_text()
                                  ).get("recipe") or {}
        protocol["engine"]["train"]["recipe"].update(saved_recipe)
    import torch

    torch.set_num_threads(1)  # the driver's evaluation/annotation loops: no spinning threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proto_file = out / "protocol.json"
    if proto_file.exists() and json.loads(proto_file.read_text()) != protocol:
        raise SystemExit(f"{proto_file} holds a different protocol: use a new --out")
    proto_file.write_text(json.dumps(protocol, indent=1))
    root = str(out / "corpus")
    data = Path(args.data)
    sources = [str(data / "coco128-seg"),
               str(data / "coco-mini" / "annotations" / "instances_train2017.json"),
               str(data / "coco-mini" / "annotations" / "instances_val2017.json")]

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    from dataengine.pipeline.core.config import from_dict
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import run_engine, train_keys
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    t0 = time.time()
    scfg = from_dict(ShardConfig, {**protocol["shard"], "holdout_sources": [sources[2]]})
    summary = shard(sources, root, scfg)
    n_train = len(train_keys(Corpus(root)))
    print(f"shard: {summary['ok']} images, {summary['masks']} masks, {n_train} training images "
          f"with ground truth ({time.time() - t0:.0f} s)", flush=True)

    cfg = from_dict(EngineConfig, protocol["engine"])
    t1 = time.time()
    report = run_engine(root, cfg, progress=lambda s: print(f"[{time.time() - t0:6.0f}s] {s}",
                                                            flush=True))
    engine_s = time.time() - t1
    rows = report["rounds"]
    hdr = (f"{'round':>5} {'stage':>6} {'model':>6} {'imgs':>4} {'masks/img':>9} "
           f"{'clk/mask':>8} {'clk50':>6} {'s/mask':>6} {'mIoU@1':>7} {'NoC50':>6} {'NoC75':>6} "
           f"{'NoC90':>6} {'AMG R50':>7} | {'ref mIoU@1':>10} {'ref NoC50':>9} {'ref NoC75':>9}")
    print(hdr)

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    for r in rows:
        print(f"{r['round']:>5} {r['stage']:>6} {r['model_version']:>6} {r['images']:>4} "
              f"{f(r['masks_per_image']):>9} {f(r['clicks_per_mask']):>8} "
              f"{f(r.get('clicks50_per_mask')):>6} {f(r['seconds_per_mask'], 1):>6} "
              f"{f(r['miou1'], 3):>7} {f(r['noc50']):>6} "
              f"{f(r['noc75']):>6} {f(r['noc90']):>6} {f(r['amg_recall50'], 3):>7} | "
              f"{f(r['nomodel_miou1'], 3):>10} {f(r['nomodel_noc50']):>9} "
              f"{f(r['nomodel_noc75']):>9}")
    final = report["current_eval"]
    print(f"final model {report['current_version']}: mIoU@1 {f(final.get('miou1'), 3)} NoC50 "
          f"{f(final.get('noc50'))} NoC75 {f(final.get('noc75'))} NoC90 "
          f"{f(final.get('noc90'))} AMG R50 {f(final.get('amg_recall50'), 3)}")
    print(f"engine {engine_s:.0f} s, total {time.time() - t0:.0f} s; report "
          f"{root}/engine/{cfg.name}/report.md")
    assisted = [r for r in rows if r["stage"] == "manual"]
    first, last = assisted[0], assisted[-1]
    # does the model look at the image? the clicker on a grey image: a model that only learned
    # to draw masks from clicks scores the same there (the random first model skipped)
    looks = {}
    for v in dict.fromkeys([r["model_version"] for r in assisted[1:]] +
                           [report["current_version"]]):
        on_image = next((r for r in rows if r["model_version"] == v), None) or final
        grey = blank_image_metrics(root, cfg, v)
        looks[v] = grey["noc50"] - on_image["noc50"]
        print(f"{v} on a blank image: mIoU@1 {f(grey['miou1'], 3)} NoC50 {f(grey['noc50'])} "
              f"NoC75 {f(grey['noc75'])} (on the image: {f(on_image['miou1'], 3)} "
              f"{f(on_image['noc50'])} {f(on_image['noc75'])})", flush=True)
    red = first["noc50"] / last["noc50"] if last["noc50"] else float("nan")

    def falls(seq, name, rises=False):
        vals = [-v if rises else v for v in seq if v is not None]
        ok = len(vals) >= 2 and all(b < a for a, b in zip(vals, vals[1:]))
        print(f"check {name}: {' -> '.join(f(v, 3) for v in seq)}: {'PASS' if ok else 'FAIL'}")

    # a round whose model kept no mask has no clicks-per-mask (shown as "-")
    falls([r["clicks_per_mask"] for r in assisted], "clicks/mask falls across manual rounds")
    falls([r.get("clicks50_per_mask") for r in assisted],
          "clicks/mask to IoU 0.5 falls across manual rounds")
    falls([r["miou1"] for r in assisted], "held-out mIoU@1 rises across manual rounds",
          rises=True)
    print(f"check automatic recall@0.5 last model > first ({f(final['amg_recall50'], 3)} vs "
          f"{f(first['amg_recall50'], 3)}): "
          f"{'PASS' if final['amg_recall50'] > first['amg_recall50'] else 'FAIL'}")
    if last["model_version"] in looks:
        gap = looks[last["model_version"]]
        print(f"diagnostic, beyond the issue's checks: the last manual round's model looks at "
              f"the image (NoC50 on a blank image {gap:+.2f} clicks, >= +1 wanted): "
              f"{'YES' if gap >= 1.0 else 'NO'}")
    print(f"target clicks to IoU 0.5 >= 1.5x lower, last vs first manual round ({red:.2f}x): "
          f"{'MET' if red >= 1.5 else 'NOT MET'}")
    machine = machine_rounds(rows, report, first)
    print(f"RESULT rounds={len(rows)} clicks50_first={first['noc50']:.2f} "
          f"clicks50_last={last['noc50']:.2f} reduction50={red:.2f} "
          f"clicks75_first={first['noc75']:.2f} clicks75_last={last['noc75']:.2f} "
          f"miou1_first={first['miou1']:.3f} miou1_last={last['miou1']:.3f} "
          f"recall50_first={first['amg_recall50']:.3f} "
          f"recall50_last={final['amg_recall50']:.3f} "
          f"nomodel_clicks50={first['nomodel_noc50']:.2f} "
          + " ".join(f"{k}={f(v, 3)}" for k, v in machine.items()))


def machine_rounds(rows: list[dict], report: dict, first: dict) -> dict:
    """The semi and automatic rounds' figures and checks: pre-fill per image and its precision,
    automatic recall, masks per image by stage, and the final model against the starting one."""
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    semi = [r for r in rows if r["stage"] == "semi"]
    auto = [r for r in rows if r["stage"] == "auto"]
    out = {"prefill_per_image": mean(r.get("prefill_per_image") for r in semi),
           "prefill_precision50": mean(r.get("prefill_precision50") for r in semi),
           "auto_recall50": mean(r.get("round_recall50") for r in auto),
           "masks_per_image_manual": mean(r["masks_per_image"] for r in rows
                                          if r["stage"] == "manual"),
           "masks_per_image_semi": mean(r["masks_per_image"] for r in semi)}
    for r in semi + auto:
        print(f"round {r['round']} ({r['stage']}): thresholds pred IoU {r.get('pred_iou_thresh')}"
              f" stability {r.get('stability_score_thresh')}; pre-filled/img "
              f"{r.get('prefill_per_image')}, pre-fill precision@0.5 "
              f"{r.get('prefill_precision50')}, recall@0.5 {r.get('round_recall50')}")

    def check(name, ok):
        print(f"check {name}: {'PASS' if ok else 'FAIL'}")

    def ge(a, b):
        return a is not None and b is not None and a >= b

    final = report["current_eval"]
    promoted = sum(bool(r.get("promoted")) for r in rows)
    miou1, noc75 = final.get("miou1"), final.get("noc75")
    check(f"held-out mIoU@1 and NoC@75 improve over the starting model ({first['miou1']} -> "
          f"{miou1}, {first['noc75']} -> {noc75})",
          miou1 is not None and noc75 is not None and miou1 > first["miou1"]
          and noc75 < first["noc75"])
    check(f"a retrained version promoted at least twice ({promoted})", promoted >= 2)
    check(f"semi pre-fill >= 1 mask per image ({out['prefill_per_image']})",
          ge(out["prefill_per_image"], 1.0))
    check(f"semi pre-fill precision@0.5 >= 0.5 ({out['prefill_precision50']})",
          ge(out["prefill_precision50"], 0.5))
    check(f"automatic recall@0.5 >= 0.3 ({out['auto_recall50']})", ge(out["auto_recall50"], 0.3))
    check(f"masks per image grow from manual to semi ({out['masks_per_image_manual']} -> "
          f"{out['masks_per_image_semi']})",
          ge(out["masks_per_image_semi"], (out["masks_per_image_manual"] or 0) + 1e-9))
    return out


def blank_image_metrics(root: str, cfg, version: str) -> dict:
    """Held-out interactive metrics of ``version`` (prompted as the engine evaluates it), the
    clicker run on a grey image instead."""
    from dataengine.pipeline.core.checkpoints import load_sam
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.engine.config import eval_config
    from dataengine.pipeline.sam.clicker import SamSegmenter
    from dataengine.pipeline.sam.evaluate import eval_images, interactive_metrics

    corpus, e = Corpus(root), eval_config(cfg, version)
    seg = SamSegmenter(load_sam(corpus.model_dir("sam", version)), disc_radius=e.disc_radius,
                       paint_first=e.paint_first)
    return interactive_metrics(seg, eval_images(corpus, e), max_clicks=e.max_clicks,
                               thresholds=e.thresholds, at_clicks=e.at_clicks, blank=True)


if __name__ == "__main__":
    main()
