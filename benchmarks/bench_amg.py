"""Benchmark: our automatic mask generator (pipeline/amg.py) vs Meta's SamAutomaticMaskGenerator.

Same model weights, identical settings (32x32 grid, multimask, pred-IoU 0.88, stability 0.95,
box NMS 0.7, crop layers, min area), the same real images, one run. Reports seconds per image for
each, the ratio, masks per image for each, and the agreement at full resolution: the share of
official masks matched at IoU >= 0.9 by ours (``agreement_official``... see below) and vice
versa.

Weights. A random model passes almost nothing through SAM's filters, which would make speed and
agreement meaningless, so the benchmark needs trained weights for which the official generator
keeps >= 10 masks per image on average, and asserts it. No checkpoint can be downloaded here, so
by default the benchmark first FITS the ``tiny`` SAM config (256 px) on the benchmark images
themselves (the 2 coco-mini train2017 images with the most objects): the whole model learns,
from single grid-point prompts (32 per step, one image per step, 6000 steps), the round-0
ground-truth object under each grid point (the smallest COCO instance containing it) or, for
points on no object, the connected background region containing it; loss = SAM's focal + dice
on the best of the 3 multimask outputs + MSE of the IoU head against the true IoU of all 3. The
aim is to memorise these images (nothing about generalisation): a model whose confident, stable
masks are real segments of them. The fitted model is cached in ``--work-dir`` and re-used.
MEASURED (2026-11-25, one core of the 2-core box): a fit of the decoder alone on a frozen random
encoder (2500 steps, 4 images) and a whole-model fit on 4 images (3000 steps) left the official
generator at 0 and 1.8 masks/image (hundreds of candidates pass the filters, but they are
near-duplicates of a few big segments that box NMS folds together); the whole-model fit on 2
images for 6000 steps (~35 min on one core; best-output IoU 0.99) keeps 20 and 12. With a real
checkpoint (``--checkpoint sam_vit_b_01ec64.pth --config vit_b``) nothing is fitted.

Run: ``python benchmarks/bench_amg.py`` (the fit ~35 CPU minutes once, then ~2 minutes).
Last line: ``RESULT images=N speedup=X agreement_ours=A agreement_official=B`` where
``agreement_ours`` = share of OUR masks matched by an official one at IoU >= 0.9 and
``agreement_official`` = share of the OFFICIAL masks matched by one of ours.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataengine.models.sam import build_sam  # noqa: E402
from dataengine.pipeline.core import masks as mask_utils  # noqa: E402
from dataengine.pipeline.core.checkpoints import load_sam, save_sam  # noqa: E402
from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator, official_generate  # noqa: E402

logger = logging.getLogger("bench_amg")
DATA = REPO.parent / "shared" / "data"


def load_images(n: int, min_low_res_area: int = 12
                ) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """The ``n`` coco-mini train2017 images with the most ground-truth objects of a size the
    64x64 low-res mask can draw; ``(name, HxWx3 uint8, [HxW bool GT masks])``."""
    from PIL import Image
    from pycocotools.coco import COCO

    coco = COCO(str(DATA / "coco-mini/annotations/instances_train2017.json"))
    scored = []
    for iid in coco.getImgIds():
        info = coco.loadImgs(iid)[0]
        scale = (64 / max(info["width"], info["height"])) ** 2
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=iid, iscrowd=False))
                if a["area"] * scale >= min_low_res_area]
        scored.append((len(anns), iid, anns))
    scored.sort(key=lambda t: (-t[0], t[1]))
    out = []
    for _, iid, anns in scored[:n]:
        info = coco.loadImgs(iid)[0]
        img = np.asarray(Image.open(DATA / "coco-mini/train2017" / info["file_name"])
                         .convert("RGB"))
        out.append((info["file_name"], img, [coco.annToMask(a).astype(bool) for a in anns]))
    return out


def _to_low_res(mask: np.ndarray, input_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """HxW bool (original frame) -> SxS float target in the decoder's low-res frame."""
    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    t = F.interpolate(t, input_size, mode="bilinear", align_corners=False)
    t = F.pad(t, (0, img_size - input_size[1], 0, img_size - input_size[0]))
    t = F.interpolate(t, (img_size // 4, img_size // 4), mode="area")
    return (t[0, 0] > 0.5).float()


def build_targets(model, images, points_per_side: int, background: bool = True):
    """Per image: cached features, transformed grid points and each point's low-res target."""
    import cv2
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import build_point_grid

    pred = SamPredictor(model)
    img_size = model.image_encoder.img_size
    grid = build_point_grid(points_per_side)
    data = []
    for _, img, gts in images:
        with torch.inference_mode():
            pred.set_image(img)
        feats = pred.features.clone()
        inp = pred.transform.apply_image(img)
        inp = model.preprocess(torch.as_tensor(inp).permute(2, 0, 1)[None].float())
        h, w = img.shape[:2]
        lows = [_to_low_res(g, pred.input_size, img_size) for g in gts]
        lows = [lo for lo in lows if lo.sum() >= 4]
        union = torch.zeros(img_size // 4, img_size // 4)
        for lo in lows:
            union = torch.maximum(union, lo)
        s = img_size // 4
        lh = int(np.ceil(pred.input_size[0] / 4))
        lw = int(np.ceil(pred.input_size[1] / 4))
        bg = np.zeros((s, s), np.uint8)
        bg[:lh, :lw] = (union[:lh, :lw].numpy() == 0)
        n, lab = cv2.connectedComponents(bg, connectivity=4)
        regions = [torch.as_tensor(lab == i, dtype=torch.float32) for i in range(1, n)]
        regions = [r for r in regions if r.sum() >= 8]
        areas = [float(lo.sum()) for lo in lows]
        pts = grid * np.array([[w, h]])
        tpts = pred.transform.apply_coords(pts, (h, w))
        targets, keep = [], []
        for i, (x, y) in enumerate(tpts):
            lx, ly = min(int(x / 4), s - 1), min(int(y / 4), s - 1)
            cands = [(areas[j], j) for j, lo in enumerate(lows) if lo[ly, lx] > 0]
            if cands:
                targets.append(lows[min(cands)[1]])
                keep.append(i)
                continue
            for r in (regions if background else []):
                if r[ly, lx] > 0:
                    targets.append(r)
                    keep.append(i)
                    break
        data.append({"features": feats, "input": inp,
                     "points": torch.as_tensor(tpts[keep], dtype=torch.float32),
                     "targets": torch.stack(targets)})
    return data


def fit(model, images, steps: int, points_per_side: int = 32, batch: int = 24,
        lr: float = 3e-3, seed: int = 0, background: bool = True,
        train_encoder: bool = False) -> dict:
    """Fit prompt encoder + mask decoder (+ the image encoder with ``train_encoder``; else it
    stays frozen and its features are computed once) to the images' segments."""
    torch.manual_seed(seed)
    t0 = time.time()
    data = build_targets(model, images, points_per_side, background)
    logger.info("targets: %s points, built in %.1fs", sum(len(d["points"]) for d in data),
                time.time() - t0)
    params = [*model.mask_decoder.parameters(), *model.prompt_encoder.parameters()]
    if train_encoder:
        params += list(model.image_encoder.parameters())
    else:
        for p in model.image_encoder.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 40)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.03 + 0.97 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))))
    model.train()
    rng = np.random.default_rng(seed)
    step = 0
    hist = []
    while step < steps:
        d = data[rng.integers(len(data))]
        idx = torch.as_tensor(rng.choice(len(d["points"]), size=min(batch, len(d["points"])),
                                         replace=False))
        pts, tgt = d["points"][idx], d["targets"][idx]
        labels = torch.ones(len(idx), 1, dtype=torch.int)
        sparse, dense = model.prompt_encoder(points=(pts[:, None], labels), boxes=None, masks=None)
        feats = model.image_encoder(d["input"]) if train_encoder else d["features"]
        low, iou = model.mask_decoder(image_embeddings=feats,
                                      image_pe=model.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=True)
        t = tgt[:, None].expand_as(low)
        prob = low.sigmoid()
        ce = F.binary_cross_entropy_with_logits(low, t, reduction="none")
        p_t = prob * t + (1 - prob) * (1 - t)
        focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean((-1, -2))
        dice = 1 - (2 * (prob * t).sum((-1, -2)) + 1) / (prob.sum((-1, -2)) + t.sum((-1, -2)) + 1)
        loss_m = 20 * focal + dice
        best = loss_m.argmin(1)
        with torch.no_grad():
            hard = (low > 0).float()
            inter = (hard * t).sum((-1, -2))
            true_iou = inter / (hard.sum((-1, -2)) + t.sum((-1, -2)) - inter).clamp(min=1)
        loss = loss_m.gather(1, best[:, None]).mean() + F.mse_loss(iou, true_iou)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0:
            bi = true_iou.gather(1, best[:, None]).mean().item()
            hist.append({"step": step, "loss": round(loss.item(), 4), "best_iou": round(bi, 3)})
            logger.info("fit step %d/%d loss %.4f best-output IoU %.3f (%.0fs)", step, steps,
                        loss.item(), bi, time.time() - t0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": step, "seconds": round(time.time() - t0, 1), "history": hist}


def agreement(ours: list[dict], official: list[dict], thr: float = 0.9) -> tuple[int, int]:
    """(ours matched by an official mask, official matched by ours) at IoU >= thr."""
    if not ours or not official:
        return 0, 0
    a = [o["segmentation"] for o in ours]
    b = [mask_utils.encode(o["segmentation"]) for o in official]
    m = mask_utils.iou_matrix(a, b)
    return int((m.max(1) >= thr).sum()), int((m.max(0) >= thr).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2, help="real images to benchmark on")
    ap.add_argument("--checkpoint", help="a SAM checkpoint (.pth / .safetensors / saved dir); "
                                         "skips fitting")
    ap.add_argument("--config", default="tiny", help="SAM config of --checkpoint / the fit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both generators")
    ap.add_argument("--fit-steps", type=int, default=6000,
                    help="fitting steps (--fit-batch grid-point prompts of one image each)")
    ap.add_argument("--init", default="", help=(
        "start the fit from this saved SAM (a model folder, e.g. bench_sam_small's "
        "OUT/models/<option>: an encoder that has learned to see) instead of random weights; "
        "its config replaces --config"))
    ap.add_argument("--work-dir", default="/tmp/dataengine-bench-amg",
                    help="where the fitted model is cached (re-used when present)")
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--min-mask-region-area", type=int, default=0)
    ap.add_argument("--min-official-masks", type=float, default=10.0)
    ap.add_argument("--fit-encoder", action=argparse.BooleanOptionalAction, default=True,
                    help="fit the image encoder too (--no-fit-encoder: it stays at its init)")
    ap.add_argument("--fit-lr", type=float, default=1e-3)
    ap.add_argument("--fit-batch", type=int, default=32, help="grid-point prompts per step")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each generator per image (the median is reported)")
    ap.add_argument("--objects-only", action="store_true", help=(
        "fit only points on ground-truth objects (no background-region targets)"))
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88,
                    help="for BOTH generators (SAM's default 0.88)")
    ap.add_argument("--stability-score-thresh", type=float, default=0.95,
                    help="for BOTH generators (SAM's default 0.95)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    images = load_images(args.images)
    fit_info: dict = {}
    if args.checkpoint:
        model = build_sam(args.config, args.checkpoint)
        weights = args.checkpoint
    else:
        tag = f"-enc{int(args.fit_encoder)}-lr{args.fit_lr:g}-b{args.fit_batch}"
        tag += "-objects" if args.objects_only else ""
        if args.init:
            import hashlib

            tag += "-init" + hashlib.sha256(str(Path(args.init).resolve()).encode()
                                            ).hexdigest()[:8]
        cache = (Path(args.work_dir)
                 / f"fit-{args.config}-{args.images}img-{args.fit_steps}steps{tag}")
        if (cache / "config.json").exists():
            model = load_sam(str(cache))
            fit_info = json.loads((cache / "config.json").read_text()).get("fit", {})
        else:
            model = load_sam(args.init) if args.init else build_sam(args.config, seed=0)
            fit_info = fit(model, images, args.fit_steps, batch=args.fit_batch, lr=args.fit_lr,
                           background=not args.objects_only, train_encoder=args.fit_encoder)
            fit_info["init"] = args.init or "random"
            save_sam(model, str(cache), extra={"fit": fit_info})
        weights = f"{cache} (fitted {fit_info.get('steps')} steps, {fit_info.get('seconds')} s)"
    model.eval()
    cfg = AmgConfig(crop_n_layers=args.crop_n_layers, pred_iou_thresh=args.pred_iou_thresh,
                    stability_score_thresh=args.stability_score_thresh,
                    min_mask_region_area=args.min_mask_region_area, max_area_fraction=1.0)
    ours_gen = MaskGenerator(model, cfg)

    # warm-up (first-call allocations) on one image, untimed
    ours_gen.generate(images[0][1])
    rows = []
    for name, img, _ in images:
        offs, ourss = [], []
        for _ in range(max(1, args.repeats)):  # alternated, so load changes hit both alike
            t = time.perf_counter()
            off = official_generate(model, img, cfg)
            offs.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours = ours_gen.generate(img)
            ourss.append(time.perf_counter() - t)
        t_off, t_ours = float(np.median(offs)), float(np.median(ourss))
        a_ours, a_off = agreement(ours, off)
        rows.append({"image": name, "sec_official": t_off, "sec_ours": t_ours,
                     "masks_official": len(off), "masks_ours": len(ours),
                     "ours_matched": a_ours, "official_matched": a_off,
                     "candidates": ours_gen.stats.get("candidates"),
                     "upsampled": ours_gen.stats.get("after_lowres")})
        print(f"{name}: official {t_off:.2f}s {len(off)} masks | ours {t_ours:.2f}s {len(ours)} "
              f"masks (upsampled {ours_gen.stats.get('after_lowres')} of "
              f"{ours_gen.stats.get('candidates')} candidates) | matched ours {a_ours} "
              f"official {a_off}", flush=True)
    n = len(rows)
    sec_off = sum(r["sec_official"] for r in rows) / n
    sec_ours = sum(r["sec_ours"] for r in rows) / n
    m_off = sum(r["masks_official"] for r in rows) / n
    m_ours = sum(r["masks_ours"] for r in rows) / n
    ag_ours = sum(r["ours_matched"] for r in rows) / max(1, sum(r["masks_ours"] for r in rows))
    ag_off = sum(r["official_matched"] for r in rows) / max(
        1, sum(r["masks_official"] for r in rows))
    print(f"weights: {weights}")
    print(f"settings: {json.dumps(cfg.official_kwargs())}")
    print(f"seconds/image: official {sec_off:.3f}  ours {sec_ours:.3f}  "
          f"speedup {sec_off / sec_ours:.2f}x")
    print(f"masks/image: official {m_off:.1f}  ours {m_ours:.1f}")
    print(f"agreement at IoU>=0.9: ours matched by official {ag_ours:.3f}, "
          f"official matched by ours {ag_off:.3f}")
    assert m_off >= args.min_official_masks, (
        f"the official generator kept {m_off:.1f} masks/image < {args.min_official_masks}: "
        f"the weights are not trained enough for a meaningful benchmark")
    print(f"RESULT images={n} speedup={sec_off / sec_ours:.2f} agreement_ours={ag_ours:.3f} "
          f"agreement_official={ag_off:.3f}")


if __name__ == "__main__":
    main()
