"""``dataengine train-detector``: train the semi-automatic stage's box proposer with Ray Train.

One machine (a local Ray is started when none is running)::

    dataengine train-detector --root ROOT --set steps=400 --set scale.num_workers=2 \\
        --set scale.cpus_per_worker=1 --set scale.torch_threads=1

Many machines: start Ray on every node, put the corpus on shared storage (``--root s3://...``)
and run the same command on the head with ``RAY_ADDRESS=auto`` (or ``ray job submit --
dataengine train-detector ...``); ``--set scale.use_gpu=true`` for GPU workers.

What a run does (as ``train-sam``, whose data plan it shares):

1. plans its data on the driver (:func:`dataengine.pipeline.sam.training_data.plan_training_data`):
   the boxes of
   every accepted mask of every complete round (round 0 only with ``data.train_on_imported``),
   curation rejections and held-out keys excluded;
2. starting weights (``init``): ``current`` = the promoted detector (random init when none),
   ``random``, ``vNNNN``, or ``checkpoint`` (a user's file or folder, local or S3); with
   ``backbone_from_sam`` the backbone is the current SAM version's image encoder;
3. trains Conditional DETR (:mod:`dataengine.models.detector`) with the paper's Hungarian loss
   (:mod:`dataengine.pipeline.detector.hungarian`, auxiliary losses on every decoder layer) under
   :func:`dataengine.pipeline.core.trainer.launch` (DDP, each worker reads its own disjoint shards,
   checkpoints under ``ROOT/runs/detector-vNNNN/``, resume after a crash or a re-run);
4. evaluates on the held-out split (:mod:`dataengine.pipeline.detector.evaluate`, COCOeval box AP /
   AP50 /
   AR@100), gates it like SAM, and publishes ``ROOT/models/detector/vNNNN/``: weights +
   ``config.json``, ``training.json`` (data snapshot), ``metrics.json``, ``promotion.json``, then
   ``version.json`` last.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from dataengine.models.checkpoint import weights_digest
from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import storage, trainer, versions
from dataengine.pipeline.core.checkpoints import read_state_dict
from dataengine.pipeline.core.layout import Corpus, parse_version
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.detector.hungarian import LossConfig
from dataengine.pipeline.sam.training_data import DataConfig, TrainingPlan, plan_with_masks

logger = logging.getLogger(__name__)

INITS = ("current", "random", "checkpoint")
CATEGORY_MODES = ("agnostic", "corpus")


@dataclass
class TrainDetectorConfig:
    """Settings of one detector training run (``dataengine train-detector``)."""

    model: str = "tiny"                 # dataengine.models.detector registry config
    init: str = "current"               # current | random | checkpoint | vNNNN
    checkpoint: str | None = None       # a user's weights (init=checkpoint), local or S3
    backbone_from_sam: bool = False     # backbone = the current SAM version's image encoder
    categories: str = "agnostic"        # agnostic (one "object" class) | corpus (its categories)
    steps: int = 300
    batch_images: int = 4               # images per worker per step
    min_box_px: float = 4.0             # stored-frame px; thinner boxes are not trained on
    max_boxes: int = 0                  # 0 = all boxes of an image (capped at num_queries)
    hflip: float = 0.5                  # horizontal flip probability
    lr: float = 2e-4
    backbone_lr_factor: float = 1.0     # 0.1 when the backbone is pretrained
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 0.1              # DETR's gradient-norm clip
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    sync_gradients: bool = True         # False only for control runs
    eval_max_images: int = 0            # 0 = every held-out image with ground truth
    gate: dict[str, Any] = field(default_factory=dict)  # promotion.GateConfig fields
    first_min: dict[str, float] = field(default_factory=lambda: {"ap50": 0.01})  # 1st version
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self) -> None:
        for name, cls in (("data", DataConfig), ("loss", LossConfig), ("scale", ScaleConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, config_mod.from_dict(cls, v, where=name))
        if self.init not in INITS:
            try:
                parse_version(self.init)
            except ValueError:
                raise ValueError(f"init={self.init!r}: one of {INITS} or a version vNNNN") \
                    from None
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("init='checkpoint' needs checkpoint=PATH")
        if self.categories not in CATEGORY_MODES:
            raise ValueError(f"categories={self.categories!r}: one of {CATEGORY_MODES}")
        for name in ("steps", "batch_images", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip={self.hflip}: must be in [0, 1]")
        if self.min_box_px < 0 or self.max_boxes < 0 or self.warmup_steps < 0:
            raise ValueError("min_box_px, max_boxes and warmup_steps must be >= 0")
        from dataengine.models.detector import get_config

        get_config(self.model)
        from dataengine.pipeline.detector.evaluate import gate_config

        gate_config(**self.gate)


# ---- worker side ---------------------------------------------------------------------------

def sample_boxes(sample: Any, class_of: dict[str, int] | None, min_box_px: float
                 ) -> tuple[list[list[float]], list[int]]:
    """COCO ``xywh`` boxes (stored frame) and class indices of a training sample's masks."""
    from dataengine.pipeline.core.masks import box_xyxy

    boxes, labels = [], []
    for m, mid in zip(sample.masks, sample.mask_ids, strict=True):
        if class_of is not None and mid not in class_of:
            continue
        x0, y0, x1, y1 = (float(v) for v in box_xyxy(m))
        w, h = x1 - x0 + 1, y1 - y0 + 1
        if not m.any() or min(w, h) < min_box_px:
            continue
        boxes.append([x0, y0, w, h])
        labels.append(class_of[mid] if class_of is not None else 0)
    return boxes, labels


def make_batch(samples: list[Any], size: int, *, class_of: dict[str, int] | None,
               min_box_px: float, max_boxes: int, hflip: float, rng: Any):
    """Samples -> ``(pixel_values, pixel_mask, targets)`` for
    :func:`dataengine.pipeline.detector.hungarian.set_loss`."""
    import numpy as np

    from dataengine.models.detector import boxes_to_targets, preprocess

    images, boxes, labels = [], [], []
    for s in samples:
        b, lab = sample_boxes(s, class_of, min_box_px)
        img = s.image
        b = np.asarray(b, np.float32).reshape(-1, 4)
        if hflip and rng.random() < hflip:
            img = img[:, ::-1]
            b[:, 0] = img.shape[1] - b[:, 0] - b[:, 2]
        if max_boxes and len(b) > max_boxes:  # keep the largest
            order = np.argsort(-(b[:, 2] * b[:, 3]))[:max_boxes]
            b, lab = b[order], [lab[i] for i in order]
        images.append(np.ascontiguousarray(img))
        boxes.append(b)
        labels.append(np.asarray(lab, np.int64))
    pix, mask, scales = preprocess(images, size)
    return pix, mask, boxes_to_targets(boxes, labels, scales, size)


def _build(config: dict[str, Any], cfg: TrainDetectorConfig) -> tuple[Any, Any]:
    """The worker's detector (from the init checkpoint and/or the SAM backbone) in train mode,
    and its AdamW with the backbone at ``backbone_lr_factor``."""
    import torch

    from dataengine.models.detector import build_detector, init_backbone_from_sam, load_weights
    from dataengine.pipeline.core.checkpoints import load_sam

    torch.manual_seed(cfg.seed)
    det = build_detector(config["det_config"], seed=cfg.seed, device="cpu")
    if config.get("init_url"):
        load_weights(det, read_state_dict(config["init_url"]))
    if config.get("sam_url"):
        init_backbone_from_sam(det, load_sam(config["sam_url"], device="cpu"))
    det.train()
    backbone = [p for n, p in det.named_parameters() if ".backbone." in f".{n}"]
    bb_ids = {id(p) for p in backbone}
    rest = [p for p in det.parameters() if id(p) not in bb_ids]
    opt = torch.optim.AdamW([{"params": rest, "lr_factor": 1.0},
                             {"params": backbone, "lr_factor": cfg.backbone_lr_factor}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    return det, opt


def _step(model: Any, det: Any, opt: Any, group: list[Any], cfg: TrainDetectorConfig, ctx: Any,
          rng: Any, class_of: Any, step: int) -> dict[str, float]:
    """One optimiser step on one batch; the Hungarian loss is normalised by the boxes of the
    whole (data-parallel) batch, as DETR does."""
    import torch
    import torch.distributed as dist

    from dataengine.pipeline.detector.hungarian import set_loss

    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    for g in opt.param_groups:
        g["lr"] = cfg.lr * warm * g["lr_factor"]
    dcfg = det.detector_config
    pix, mask, targets = make_batch(group, dcfg.image_size, class_of=class_of,
                                    min_box_px=cfg.min_box_px,
                                    max_boxes=cfg.max_boxes or dcfg.num_queries,
                                    hflip=cfg.hflip, rng=rng)
    n_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))])
    if dist.is_available() and dist.is_initialized() and ctx.world_size > 1 \
            and cfg.sync_gradients:
        dist.all_reduce(n_boxes)
        n_boxes /= ctx.world_size
    targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in targets]
    with trainer.autocast(ctx.device):
        logits, boxes = model(pix.to(ctx.device), mask.to(ctx.device))
    out = set_loss(logits.float(), boxes.float(), targets, cfg.loss,
                   num_boxes=float(n_boxes.item()))
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(det.parameters(), cfg.grad_clip)
    opt.step()
    return {k: float(v) for k, v in out.items()}


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training loop (runs inside a Ray Train worker)."""
    import random

    import ray

    from dataengine.models.detector import LayerOutputs
    from dataengine.pipeline.sam.training_data import my_shard_share, stream_samples, write_read_log

    cfg = config_mod.from_dict(TrainDetectorConfig, config["cfg"])
    plan = TrainingPlan.from_dict(config["plan"])
    ctx = trainer.context(config)
    det, opt = _build(config, cfg)
    state = trainer.restore(models={"detector": det}, optimizers={"opt": opt})
    start = int(state["step"]) + 1 if state else 0
    history: list[dict[str, float]] = list((state or {}).get("history", []))
    model = trainer.prepare(LayerOutputs(det), sync_gradients=cfg.sync_gradients)
    read_keys: set[str] = set()
    read_shards: set[str] = set()

    def on_read(s):
        read_keys.add(s.key)
        read_shards.add(s.shard)

    stream = stream_samples(Corpus(config["root"]), plan,
                            my_shard_share(plan.shards, ctx.rank, ctx.world_size),
                            seed=cfg.seed * 1009 + ctx.rank * 7 + start,
                            skip_crowd=cfg.data.skip_crowd, on_read=on_read)
    rng = random.Random(cfg.seed * 31 + ctx.rank + start)
    window: list[dict[str, float]] = []
    t0 = time.time()
    for step in range(start, cfg.steps):
        group = [next(stream) for _ in range(cfg.batch_images)]
        window.append(_step(model, det, opt, group, cfg, ctx, rng, config.get("class_of"), step))
        ckpt = (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1
        if (step + 1) % cfg.log_every == 0 or ckpt:
            mean = {k: sum(w[k] for w in window) / len(window)
                    for k in ("loss", "cls", "l1", "giou")}
            history.append({"step": step, "lr": opt.param_groups[0]["lr"], **mean,
                            "steps_per_s": len(window) / max(time.time() - t0, 1e-6)})
            window, t0 = [], time.time()
            trainer.report({"step": step, "start": start, "rank": ctx.rank, **history[-1]},
                           models={"detector": det} if ckpt else None,
                           optimizers={"opt": opt} if ckpt else None,
                           extra={"step": step, "history": history})
    write_read_log(config["read_log_url"], ctx.rank, read_keys, read_shards,
                   {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                    "start": start, "weights_sha256": weights_digest(det)})


# ---- driver side ---------------------------------------------------------------------------




def corpus_categories(plan: TrainingPlan, corpus: Corpus) -> tuple[list[str], dict[str, int]]:
    """Category names of the planned masks (ordered by category id) and ``mask_id -> index``;
    masks without a category are left out in per-category mode."""
    from dataengine.pipeline.core import rounds

    table = rounds.load_manifest(corpus, plan.rounds).select(["mask_id", "category_id",
                                                              "category"])
    allowed = {m for ms in plan.masks.values() for m in ms}
    names: dict[str, int] = {}
    pairs = []
    for mid, cid, cat in zip(*(table.column(c).to_pylist() for c in
                               ("mask_id", "category_id", "category")), strict=True):
        if mid in allowed and cat:
            names.setdefault(cat, int(cid))
            pairs.append((mid, cat))
    cats = sorted(names, key=lambda c: (names[c], c))
    index = {c: i for i, c in enumerate(cats)}
    return cats, {mid: index[c] for mid, c in pairs}


def resolve_init(corpus: Corpus, cfg: TrainDetectorConfig, categories: list[str] | None
                 ) -> tuple[str | None, Any, str | None, str | None]:
    """``(parent version, DetectorConfig, weights URL, SAM version URL for the backbone)``."""
    from dataengine.models.detector import get_config

    det_cfg = get_config(cfg.model)
    sam_url = None
    if cfg.backbone_from_sam:
        from dataengine.pipeline.core.promotion import current_version

        sam_v = current_version(corpus)
        if sam_v is None:
            raise ValueError("backbone_from_sam: there is no promoted SAM version yet")
        sam_url = corpus.model_dir("sam", sam_v)
        sam_name = storage.read_json(storage.join(sam_url, "config.json"))["sam"]["name"]
        from dataengine.models.sam import get_config as sam_config

        det_cfg = det_cfg.replace(name=f"{det_cfg.name}-sam", backbone="sam", sam_config=sam_name,
                                  image_size=sam_config(sam_name).image_size)
    if categories:
        det_cfg = det_cfg.replace(categories=tuple(categories))
    if cfg.init == "checkpoint":
        return None, det_cfg, cfg.checkpoint, sam_url
    if cfg.init == "random":
        return None, det_cfg, None, sam_url
    if cfg.init == "current":
        from dataengine.pipeline.detector.evaluate import current_detector

        version = current_detector(corpus)
        if version is None:
            logger.info("no promoted detector yet: starting from random init (%s)", cfg.model)
            return None, det_cfg, None, sam_url
    else:
        version = cfg.init
    vdir = corpus.model_dir("detector", version)
    if not storage.exists(storage.join(vdir, "version.json")):
        raise FileNotFoundError(f"init={version}: detector version {vdir} is not published")
    meta = storage.read_json(storage.join(vdir, "config.json"))["detector"]
    if categories and tuple(meta["categories"]) != tuple(categories):
        logger.warning("categories changed since %s: starting from random init", version)
        return None, det_cfg, None, sam_url
    return version, get_config(meta), vdir, None  # the parent already holds its backbone


def train_detector(root: str, config: TrainDetectorConfig | None = None) -> dict[str, Any]:
    """Train, evaluate, gate and publish a new detector version; returns its summary.

    Raises ValueError when the plan holds no training masks.
    """
    from dataengine.models.detector import build_detector, load_weights
    from dataengine.pipeline.core.checkpoints import save_detector
    from dataengine.pipeline.detector import evaluate as eval_detector

    cfg = config or TrainDetectorConfig()
    corpus = Corpus(root)
    root = corpus.root
    t0 = time.time()
    plan = plan_with_masks(corpus, cfg.data, "train-detector")
    categories, class_of = (corpus_categories(plan, corpus) if cfg.categories == "corpus"
                            else (None, None))
    if cfg.categories == "corpus" and not categories:
        raise ValueError("categories='corpus' but no planned mask has a category")
    parent, det_cfg, init_url, sam_url = resolve_init(corpus, cfg, categories)
    fp = versions.fingerprint(config_mod.to_dict(cfg), rounds=plan.rounds, masks=plan.n_masks,
                              parent=parent)
    version, vdir, run_name, run_url = versions.begin_version(corpus, "detector", fp, "detector",
                                                             parent=parent)
    logger.info("train-detector %s (%s): parent=%s, %d images / %d boxes from rounds %s, "
                "%d steps x %d workers", version, det_cfg.name, parent, plan.n_images,
                plan.n_masks, plan.rounds, cfg.steps, cfg.scale.num_workers)
    loop_cfg = {"cfg": config_mod.to_dict(cfg), "plan": plan.to_dict(), "root": root,
                "det_config": det_cfg.to_dict(), "init_url": init_url, "sam_url": sam_url,
                "class_of": class_of, "read_log_url": run_url}
    result = trainer.launch(_train_loop, loop_cfg, runs_url=corpus.runs, name=run_name,
                            scale=cfg.scale)
    ckpt_dir, state = trainer.final_checkpoint(result, f"train-detector {version}")
    model = build_detector(det_cfg, seed=None, device="cpu")
    load_weights(model, os.path.join(ckpt_dir, "detector.safetensors"))
    train_seconds = round(time.time() - t0, 1)
    t1 = time.time()
    heldout = eval_detector.evaluate(model, corpus, max_images=cfg.eval_max_images or None)
    heldout["seconds"] = round(time.time() - t1, 1)
    save_detector(model, vdir, extra={"version": version, "parent": parent})
    storage.write_json(storage.join(vdir, "training.json"), {
        "version": version, "parent": parent, "rounds": plan.rounds,
        "mask_counts": plan.mask_counts, "data": plan.summary(), "init": cfg.init,
        "init_weights": init_url, "sam_backbone": sam_url, "categories": list(det_cfg.categories),
        "config": config_mod.to_dict(cfg), "run": run_url})
    history = state.get("history", [])
    final = history[-1] if history else {}
    metrics = {"version": version, "steps": int(state.get("step", -1)) + 1,
               "final_loss": final.get("loss"), "train_seconds": train_seconds,
               "workers": cfg.scale.num_workers, "heldout": heldout, "history": history}
    storage.write_json(storage.join(vdir, "metrics.json"), metrics)
    decision = eval_detector.gate(corpus, version, heldout, eval_detector.gate_config(**cfg.gate),
                                  first_min=cfg.first_min)
    versions.publish_version(corpus, "detector", version, parent=parent, model=det_cfg.name,
                             rounds=plan.rounds, masks=plan.n_masks,
                             promoted=decision["promoted"])
    logger.info("train-detector %s published: held-out AP %.3f AP50 %.3f AR100 %.3f; %s",
                version, heldout["ap"], heldout["ap50"], heldout["ar100"],
                "promoted" if decision["promoted"] else f"not promoted ({decision['reason']})")
    return {"version": version, "parent": parent, "rounds": plan.rounds, "masks": plan.n_masks,
            "images": plan.n_images, "steps": metrics["steps"], "final_loss": final.get("loss"),
            "heldout": heldout, "promoted": decision["promoted"], "reason": decision["reason"],
            "seconds": round(time.time() - t0, 1), "run": run_url}




# ---- the engine's hook ---------------------------------------------------------------------

@dataclass
class DetectorEngineConfig:
    """The detector in the data engine (``engine --set detector.enabled=true``): trained after
    the assisted-manual stage (and between semi rounds with ``retrain_between_semi``); the semi
    stage uses it as its proposer only while a promoted (gate-passed) version exists."""

    enabled: bool = False
    retrain_between_semi: bool = False
    train: dict[str, Any] = field(default_factory=dict)     # TrainDetectorConfig fields
    proposer: dict[str, Any] = field(default_factory=dict)  # DetectorProposerConfig fields

    def __post_init__(self) -> None:
        from dataengine.pipeline.detector.proposer import DetectorProposerConfig

        if "version" in self.proposer:
            raise ValueError("detector.proposer.version: set by the engine (the promoted one)")
        config_mod.from_dict(TrainDetectorConfig, self.train, where="detector.train")
        config_mod.from_dict(DetectorProposerConfig, self.proposer, where="detector.proposer")


def engine_detector_step(root: str, config: DetectorEngineConfig | dict[str, Any],
                         previous_stage: str | None) -> dict[str, Any]:
    """Before a semi round: retrain the detector when the previous round was assisted-manual
    (or semi, with ``retrain_between_semi``), then pick the round's proposer — ``detector``
    pinned to the promoted version, else ``amg``. Returns a JSON record whose ``annotate`` holds
    the :class:`dataengine.pipeline.annotate.stage.AnnotateConfig` fields to use."""
    from dataengine.pipeline.detector.evaluate import current_detector

    cfg = config if isinstance(config, DetectorEngineConfig) else config_mod.from_dict(
        DetectorEngineConfig, config, where="detector")
    out: dict[str, Any] = {"trained": None}
    if cfg.enabled and (previous_stage == "manual" or
                        (previous_stage == "semi" and cfg.retrain_between_semi)):
        tcfg = config_mod.from_dict(TrainDetectorConfig, {"init": "current", **cfg.train},
                                    where="detector.train")
        res = train_detector(root, tcfg)
        out.update(trained=res["version"], promoted=res["promoted"], reason=res["reason"],
                   heldout=res["heldout"])
    version = current_detector(root) if cfg.enabled else None
    out["detector_version"] = version
    out["annotate"] = ({"proposer": "detector", "detector": {**cfg.proposer, "version": version}}
                       if version else {"proposer": "amg"})
    logger.info("semi round proposer: %s", out["annotate"]["proposer"] +
                (f" ({version})" if version else ""))
    return out
