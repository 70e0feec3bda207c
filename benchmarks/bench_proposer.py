"""Benchmark: the semi-automatic stage's pre-fill — strict-threshold AMG vs the DETR proposer.

On the real samples in ``../shared/data`` (coco128-seg + coco-mini train2017 for rounds,
coco-mini val2017 held out), in one run:

1. shard the sources (longest side ``--image-size``) with their masks as round 0;
2. an assisted-manual round on the first ``--manual-images`` training images (tiny SAM in the
   loop, the simulated annotator of the findings' frozen protocol: stop IoU 0.75);
   The starting SAM: a user's checkpoint (``--sam``), else the checkpoint shipped under
   ``models/weights/`` (``--start shipped``, the default), or the tiny config trained for
   ``--pretrain-sam-steps`` on the TRAIN split's imported round 0 (``--start pretrain``);
3. optionally retrain SAM on it (``--sam-steps``) and train the detector on the boxes of its
   accepted masks (``--det-steps``; held-out COCOeval box AP/AP50/AR@100 printed);
4. two semi-automatic rounds on the SAME next ``--semi-images`` training images with the same
   SAM: pre-fill by AMG vs by the detector (boxes above ``--box-threshold`` -> SAM box prompts);
   both filter their masks with the predicted-IoU / stability pair chosen for this SAM on the
   manual round's images (``--tune``, :mod:`dataengine.pipeline.sam.amg_tune`; ``--no-tune``:
   SAM's strict 0.92 / 0.97 for AMG, ``--det-pred-iou`` / ``--det-stability`` for the
   detector); the simulated annotator then adds the missing objects.

A third row, ``detr-nofilter``, keeps every SAM mask of the detector's boxes (no predicted-IoU /
stability filter): what the boxes alone would cover. Printed per proposer: ground-truth recall of
the pre-fill at IoU 0.5 (from the round's records against round 0), pre-filled masks per image,
annotator clicks per image and annotator seconds per image (the simulated cost model; objects worked
on and discarded included) and compute seconds per image; and the detector's boxes alone (GT box
recall at IoU 0.5). The run directory (``--work``) is reused: finished steps are skipped on a
re-run.

Run: ``python benchmarks/bench_proposer.py`` (tens of CPU minutes on 2 cores at the defaults;
``--quick`` for a smoke run). With a user's SAM checkpoint: ``--sam PATH --sam-config vit_b``.
Last line: ``RESULT recall50_amg=A recall50_detr=B clicks_amg=C clicks_detr=D``.
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
DATA = REPO.parent / "shared" / "data"

logger = logging.getLogger("bench_proposer")


def build_corpus(root: str, image_size: int) -> None:
    from dataengine.pipeline.ingest.images import ImageConfig
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    if Path(root, "images", "index").is_dir():
        return
    val = str(DATA / "coco-mini/annotations/instances_val2017.json")
    sources = [str(DATA / "coco128-seg"),
               str(DATA / "coco-mini/annotations/instances_train2017.json"), val]
    cfg = ShardConfig(samples_per_shard=32, use_ray=False, holdout_sources=[val],
                      image=ImageConfig(resize_mode="keep_ratio", image_size=image_size))
    out = shard(sources, root, cfg)
    logger.info("sharded: %s", {k: out.get(k) for k in ("ok", "duplicate", "quarantined")})


def annotator_cfg(max_clicks: int, max_objects: int, accept_iou: float) -> dict:
    return {"target_iou": 0.75, "max_clicks": max_clicks, "accept_iou": accept_iou,
            "max_objects_per_image": max_objects, "min_object_area": 64}


def _bench_round(corpus, tag: str) -> tuple[int, dict | None]:
    """The round number remembered under ``tag`` (a new one the first time) and, when that
    round is complete, its metrics (a re-run skips it)."""
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.rounds import is_complete, next_round

    marker = Path(corpus.root, "bench", f"{tag}.json")
    if marker.exists():
        number = json.loads(marker.read_text())["round"]
        if is_complete(corpus, number):
            return number, storage.read_json(storage.join(corpus.round_dir(number),
                                                          "metrics.json"))
        return number, None
    number = next_round(corpus)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"round": number}))
    return number, None


def run_round_once(root: str, tag: str, cfg) -> dict:
    """Run (or resume) a round; the round number is remembered under ``tag``."""
    from dataengine.pipeline.annotate.stage import run_round
    from dataengine.pipeline.core.layout import Corpus

    corpus = Corpus(root)
    number, done = _bench_round(corpus, tag)
    if done is not None:
        return done
    cfg.round = number
    t0 = time.time()
    m = run_round(root, cfg)
    m["round"] = number
    m["wall_seconds_total"] = round(time.time() - t0, 1)
    return m


def replay_ground_truth_round(root: str, keys: list[str]) -> dict:
    """``--manual-source gt``: an assisted-manual round whose accepted masks are the round-0
    masks of ``keys`` (what annotators with a working SAM would have accepted). Flagged in the
    records (``annotator="gt-replay"``) and in the printout."""
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.rounds import RoundWriter, iter_round_shard, round_shards

    corpus = Corpus(root)
    number, done = _bench_round(corpus, "manual-gt")
    if done is not None:
        return done
    w = RoundWriter(corpus, number, "manual", model_version="gt-replay",
                    config={"source": "round 0 replayed (bench_proposer --manual-source gt)"})
    w.begin()
    wanted, masks = set(keys), 0
    for shard in round_shards(corpus, 0):
        if w.shard_done(shard):
            continue
        recs = []
        for rec in iter_round_shard(corpus, 0, shard):
            if rec["image"]["image_id"] not in wanted:
                continue
            anns = [{**a, "stage": "manual", "round": number, "model_version": "gt-replay",
                     "annotator": "gt-replay", "clicks": [], "seconds": 0.0}
                    for a in rec["annotations"] if not a.get("iscrowd")]
            masks += len(anns)
            recs.append({"image": rec["image"], "annotations": anns})
        w.write_shard(shard, recs)
    w.finish({"images": len(keys), "masks": masks})
    return storage.read_json(storage.join(corpus.round_dir(number), "metrics.json"))


def detector_box_recall(root: str, version: str, keys: list[str], threshold: float) -> dict:
    """Recall of the round-0 objects' boxes by the detector's boxes at box IoU 0.5, and boxes per
    image, on ``keys`` (the detector half of the proposer alone)."""
    import numpy as np

    from dataengine.pipeline.core import masks as mu
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.rounds import read_round_manifest
    from dataengine.pipeline.detector.evaluate import iter_images
    from dataengine.pipeline.detector.proposer import propose_boxes, resolve_detector

    corpus = Corpus(root)
    det, _ = resolve_detector(corpus, version, "cpu")
    rows = read_round_manifest(corpus, 0).select(["key", "shard", "bbox_x", "bbox_y", "bbox_w",
                                                  "bbox_h"]).to_pylist()
    want = set(keys)
    gt: dict[str, list] = {}
    shard_of = {}
    for r in rows:
        if r["key"] in want:
            x, y = r["bbox_x"], r["bbox_y"]
            gt.setdefault(r["key"], []).append([x, y, x + r["bbox_w"], y + r["bbox_h"]])
            shard_of[r["key"]] = r["shard"]
    hit = total = nboxes = 0
    for key, img in iter_images(corpus, shard_of):
        boxes, _ = propose_boxes(det, img, threshold=threshold)
        g = np.array(gt[key], np.float32)
        total += len(g)
        nboxes += len(boxes)
        if len(boxes):
            hit += int((mu.box_iou_matrix(boxes, g).max(axis=0) >= 0.5).sum())
    return {"box_recall50": hit / max(total, 1), "boxes_per_image": nboxes / max(len(shard_of), 1)}


def prefill_figures(root: str, number: int) -> dict:
    """Recall of round-0 objects by the pre-filled masks at IoU 0.5, masks and clicks per image,
    from the round's records."""

    from dataengine.pipeline.core import masks as mu
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.rounds import iter_round_shard, round_shards

    corpus = Corpus(root)
    gt: dict[str, list] = {}
    for shard in round_shards(corpus, 0):
        for rec in iter_round_shard(corpus, 0, shard):
            gt[rec["image"]["image_id"]] = [a["segmentation"] for a in rec["annotations"]
                                            if not a.get("iscrowd")]
    images = objects = covered = prefilled = clicks = 0
    seconds = 0.0
    for shard in round_shards(corpus, number):
        for rec in iter_round_shard(corpus, number, shard):
            key = rec["image"]["image_id"]
            anns = rec["annotations"]
            pre = [a["segmentation"] for a in anns if a.get("prefilled")]
            images += 1
            prefilled += len(pre)
            clicks += sum(len(a.get("clicks") or []) for a in anns)
            seconds += sum(float(a.get("seconds") or 0) for a in anns)
            g = gt.get(key, [])
            objects += len(g)
            if g and pre:
                covered += int((mu.iou_matrix(pre, g).max(axis=0) >= 0.5).sum())
    # objects the annotator worked on but discarded (final IoU under accept_iou) cost clicks
    # too: their seconds are in the round's stats; clicks follow from the cost model
    from dataengine.pipeline.annotate.annotators import CostModel
    from dataengine.pipeline.core import storage

    metrics = storage.read_json(storage.join(corpus.round_dir(number), "metrics.json"))
    cost = CostModel(**(metrics.get("config", {}).get("annotator", {}).get("cost") or {}))
    d_n, d_s = metrics.get("discarded", 0), metrics.get("discarded_seconds", 0.0)
    fixed = cost.seconds_per_object + cost.seconds_per_review
    clicks += round((d_s - d_n * fixed) / cost.seconds_per_click) if cost.seconds_per_click else 0
    seconds += d_s
    n = max(images, 1)
    return {"images": images, "gt_objects": objects,
            "recall50": covered / objects if objects else 0.0,
            "prefilled_per_image": prefilled / n, "clicks_per_image": clicks / n,
            "annotator_seconds_per_image": seconds / n}


def tune_prefill(corpus, sam_model: str, keys: list[str], base: dict) -> dict:
    """Pre-fill thresholds for ``sam_model`` chosen on ``keys`` (the manual round's training
    images) with :mod:`dataengine.pipeline.sam.amg_tune`; printed with what they keep there."""
    from dataengine.pipeline.annotate.stage import AnnotateConfig, strict_amg
    from dataengine.pipeline.sam.amg_tune import tune
    from dataengine.pipeline.sam.evaluate import load_objects
    from dataengine.pipeline.sam.resolve import resolve_model

    images = load_objects(corpus, "train", keys=keys)
    model, _ = resolve_model(corpus, sam_model)
    amg = AnnotateConfig(stage="semi", **base).generator()   # prompted as the round prompts
    result = tune(model, images, amg, amg)
    out = result["semi"]
    if "pred_iou_thresh" not in out:
        print("pre-fill thresholds: the model generated no mask on the manual round's images; "
              "kept the defaults")
        return {"pred_iou_thresh": strict_amg().pred_iou_thresh,
                "stability_score_thresh": strict_amg().stability_score_thresh}
    print(f"pre-fill thresholds for {sam_model} on {result['images']} manual-round images "
          f"({result['objects']} objects): pred IoU "
          f"{out['pred_iou_thresh']} stability {out['stability_score_thresh']} (precision@0.5 "
          f"{out['precision50']:.3f}, {out['masks_per_image']:.2f} masks/image, floor "
          f"{out['min_precision']} {'reached' if out['reached'] else 'NOT reached'})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bench_proposer", help="corpus + state directory")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--manual-images", type=int, default=64)
    ap.add_argument("--semi-images", type=int, default=24)
    ap.add_argument("--max-clicks", type=int, default=10)
    ap.add_argument("--max-objects", type=int, default=10)
    ap.add_argument("--accept-iou", type=float, default=0.5,
                    help="the simulated annotator keeps SAM's final mask at or above this IoU")
    ap.add_argument("--det-pred-iou", type=float, default=0.88)
    ap.add_argument("--det-stability", type=float, default=0.95)
    ap.add_argument("--start", choices=("shipped", "pretrain"), default="shipped",
                    help="the starting SAM without --sam: the checkpoint shipped under "
                         "models/weights/, or the tiny config trained --pretrain-sam-steps")
    ap.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                    help="choose the pre-fill thresholds (generator and detector masks) for "
                         "the SAM used, on the manual round's training images")
    ap.add_argument("--sam", default=None, help="a SAM checkpoint to start from")
    ap.add_argument("--sam-config", default="tiny")
    ap.add_argument("--pretrain-sam-steps", type=int, default=300,
                    help="a starting SAM trained on the TRAIN split's imported round 0 (no "
                         "checkpoint can be downloaded; a random SAM accepts no mask)")
    ap.add_argument("--sam-steps", type=int, default=0,
                    help="retrain SAM on the manual round before the semi rounds")
    ap.add_argument("--disc-radius", type=float, default=10.0,
                    help="clicks painted into SAM's mask prompt (as the SAM recipe trains)")
    ap.add_argument("--det-model", default="tiny")
    ap.add_argument("--det-steps", type=int, default=400)
    ap.add_argument("--det-batch", type=int, default=4)
    ap.add_argument("--box-threshold", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--manual-source", choices=("sam", "gt"), default="sam",
                    help="gt: replay round-0 masks as the assisted-manual round's accepted masks "
                         "(when the CPU SAM accepts none)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.manual_images, args.semi_images, args.sam_steps, args.det_steps = 8, 4, 4, 10
        args.pretrain_sam_steps = 4
        args.work = args.work + "-quick"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    from dataengine.pipeline.annotate.stage import AnnotateConfig
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.trainer import ScaleConfig
    from dataengine.pipeline.detector.train import TrainDetectorConfig, train_detector
    from dataengine.pipeline.engine.loop import train_keys
    from dataengine.pipeline.sam.train import TrainSamConfig, train_sam

    root = str(Path(args.work) / "corpus")
    t_all = time.time()
    build_corpus(root, args.image_size)
    corpus = Corpus(root)
    keys = train_keys(corpus)
    manual_keys = keys[:args.manual_images]
    semi_keys = keys[args.manual_images:args.manual_images + args.semi_images]
    print(f"training images with ground truth: {len(keys)}; manual {len(manual_keys)}, "
          f"semi {len(semi_keys)}")
    ann = annotator_cfg(args.max_clicks, args.max_objects, args.accept_iou)
    sam_spec = args.sam or args.sam_config
    base = dict(use_ray=False, annotator=ann, model_config=args.sam_config,
                torch_threads=args.threads, disc_radius=args.disc_radius)
    scale = ScaleConfig(num_workers=1, cpus_per_worker=1.0, torch_threads=args.threads)
    recipe = {"iterations": 3, "mask_only_iterations": 1}   # a cheap recipe for CPU minutes
    if args.start == "shipped" and not args.sam:
        from dataengine.pipeline.engine.config import EngineConfig
        from dataengine.pipeline.engine.loop import publish_initial

        sam_spec = publish_initial(corpus, EngineConfig(init="shipped"))
        args.pretrain_sam_steps = 0
        print(f"starting SAM {sam_spec}: the shipped checkpoint")
    elif args.pretrain_sam_steps > 0 and not args.sam:
        if not corpus.model_versions("sam"):
            s = train_sam(root, TrainSamConfig(
                model=args.sam_config, init="random", steps=args.pretrain_sam_steps,
                batch_images=2, masks_per_image=4,
                checkpoint_every=max(25, args.pretrain_sam_steps // 4), scale=scale,
                recipe=recipe, data={"train_on_imported": True, "rounds": [0]}))
            print(f"starting SAM {s['version']}: {s['steps']} steps on the train split's "
                  f"round 0, final loss {s['final_loss']}")
        sam_spec = corpus.model_versions("sam")[0]
    # 1. assisted-manual round
    if args.manual_source == "gt":
        m1 = replay_ground_truth_round(root, manual_keys)
        print(f"manual round {m1['round']}: GROUND-TRUTH REPLAY of {m1['images']} images, "
              f"{m1['masks']} masks (--manual-source gt)")
    else:
        m1 = run_round_once(root, "manual", AnnotateConfig(stage="manual", model=sam_spec,
                                                           keys=manual_keys, **base))
        print(f"manual round {m1['round']}: {m1['images']} images, {m1['masks']} masks, "
              f"clicks/mask {m1['clicks_per_mask']}, recall50 {m1.get('recall50')}")
    # 2. retrain SAM and train the detector on the manual round
    sam_model = sam_spec
    if args.sam_steps > 0:
        versions = corpus.model_versions("sam")
        if len(versions) < 1 + (args.pretrain_sam_steps > 0 and not args.sam):
            init = {"init": "checkpoint", "checkpoint": args.sam} if args.sam else \
                {"init": "random"}
            if sam_spec.startswith("v"):
                init = {"init": sam_spec}
            s = train_sam(root, TrainSamConfig(model=args.sam_config, steps=args.sam_steps,
                                               checkpoint_every=max(25, args.sam_steps // 4),
                                               scale=scale, recipe=recipe, **init))
            print(f"SAM {s['version']}: {s['steps']} steps, final loss {s['final_loss']}")
            versions = corpus.model_versions("sam")
        sam_model = versions[-1]
    det_versions = corpus.model_versions("detector")
    if det_versions:
        det_version = det_versions[-1]
        heldout = storage.read_json(storage.join(corpus.model_dir("detector", det_version),
                                                 "metrics.json"))["heldout"]
    else:
        t0 = time.time()
        d = train_detector(root, TrainDetectorConfig(
            model=args.det_model, init="random", steps=args.det_steps,
            batch_images=args.det_batch, checkpoint_every=max(50, args.det_steps // 4),
            scale=scale, gate={"promote_first": True}))
        det_version, heldout = d["version"], d["heldout"]
        print(f"detector {det_version}: {d['steps']} steps in {time.time() - t0:.0f} s, final "
              f"loss {d['final_loss']}, promoted={d['promoted']} ({d['reason']})")
    print(f"detector {det_version} held-out: AP {heldout['ap']:.4f} AP50 {heldout['ap50']:.4f} "
          f"AR@100 {heldout['ar100']:.4f} ({heldout['images']} images, "
          f"{heldout['objects']} objects)")
    # 3. the two semi rounds on the same images with the same SAM
    amg_extra: dict = {"proposer": "amg"}
    det_thresh = {"pred_iou_thresh": args.det_pred_iou,
                  "stability_score_thresh": args.det_stability}
    if args.tune:
        chosen = tune_prefill(corpus, sam_model, manual_keys, base)
        amg_extra["semi_amg"] = {"pred_iou_thresh": chosen["pred_iou_thresh"],
                                 "stability_score_thresh": chosen["stability_score_thresh"]}
        det_thresh = dict(amg_extra["semi_amg"])
    rows = {}
    for tag, extra in (("amg", amg_extra),
                       ("detr", {"proposer": "detector",
                                 "detector": {"version": det_version,
                                              "box_threshold": args.box_threshold,
                                              **det_thresh}}),
                       ("detr-nofilter", {"proposer": "detector",
                                          "detector": {"version": det_version,
                                                       "box_threshold": args.box_threshold,
                                                       "pred_iou_thresh": 0.0,
                                                       "stability_score_thresh": 0.0}})):
        m = run_round_once(root, f"semi-{tag}-{sam_model}-{args.box_threshold}", AnnotateConfig(
            stage="semi", model=sam_model, keys=semi_keys, **base, **extra))
        f = prefill_figures(root, m["round"])
        f["compute_seconds_per_image"] = m["compute_seconds"] / max(m["images"], 1)
        rows[tag] = f
    boxes = detector_box_recall(root, det_version, semi_keys, args.box_threshold)
    print(f"detector boxes alone on the semi images (threshold {args.box_threshold}): GT box "
          f"recall@0.5 {boxes['box_recall50']:.4f}, {boxes['boxes_per_image']:.1f} boxes/image")
    print()
    print(f"semi stage on {rows['amg']['images']} images ({rows['amg']['gt_objects']} GT objects), "
          f"SAM {sam_model}, detector {det_version}")
    print(f"{'proposer':<15}{'recall50':>10}{'prefill/img':>13}{'clicks/img':>12}"
          f"{'annot s/img':>13}{'compute s/img':>15}")
    for tag, f in rows.items():
        print(f"{tag:<15}{f['recall50']:>10.4f}{f['prefilled_per_image']:>13.2f}"
              f"{f['clicks_per_image']:>12.2f}{f['annotator_seconds_per_image']:>13.1f}"
              f"{f['compute_seconds_per_image']:>15.2f}")
    print(f"total wall {time.time() - t_all:.0f} s")
    print(f"RESULT recall50_amg={rows['amg']['recall50']:.4f} "
          f"recall50_detr={rows['detr']['recall50']:.4f} "
          f"clicks_amg={rows['amg']['clicks_per_image']:.2f} "
          f"clicks_detr={rows['detr']['clicks_per_image']:.2f}")


if __name__ == "__main__":
    main()
