"""DETR-family box detector registry and checkpoint I/O, built from transformers' Conditional DETR.

Why Conditional DETR (Meng et al. 2021) among the DETR family in transformers:

- it keeps DETR's whole recipe — CNN backbone, transformer encoder-decoder, learned object
  queries, Hungarian set loss, no anchors and no NMS — and changes only the decoder's
  cross-attention (a spatial query from each query's reference point), which is what made DETR
  slow to converge: it reaches DETR's accuracy with 6.7-10x fewer epochs, which is what matters
  when the engine retrains it on a few hundred images between stages;
- it is single-scale and runs on plain PyTorch ops on CPU. Deformable DETR and RT-DETR converge
  faster still on full COCO, but rely on multi-scale deformable attention (a custom CUDA kernel,
  with a much slower ``grid_sample`` fallback on CPU) and, for RT-DETR, on denoising queries and a
  varifocal loss that depart from the paper's Hungarian loss this issue asks for.

Registry, in ``dataengine.models.sam``'s style: ``resnet50`` / ``resnet101`` (the published
``microsoft/conditional-detr-resnet-*`` architectures with transformers' own ResNet backbone, for a
user's checkpoint from a local path or S3: our safetensors format, a transformers
``save_pretrained`` folder, or a weights-only torch state dict), ``tiny`` (256 px, ResNet-10-ish
basic blocks with GroupNorm, 2+2 transformer layers, 50 queries) and ``tiny-test`` (64-128 px unit
tests). Nothing is ever downloaded (``use_pretrained_backbone=False``, no timm). Class-agnostic by
default (one ``object`` class); pass ``categories`` for per-category detection. ``backbone="sam"``
replaces the CNN by the engine's SAM image encoder (:func:`init_backbone_from_sam` copies a SAM
version's weights in), so the detector starts from what the engine has learned.

Inputs: images are resized so the longest side is ``image_size`` and padded bottom-right to a
square canvas (:func:`preprocess`); boxes are ``cx, cy, w, h`` normalised to that canvas.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dataengine.models.checkpoint import as_state_dict, load_state
from dataengine.models.device import autocast, pick_device

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of one detector (fields map onto ``ConditionalDetrConfig`` /
    ``ResNetConfig``)."""

    name: str = "tiny"
    image_size: int = 256
    backbone: str = "resnet"                      # resnet | sam
    resnet_layer_type: str = "basic"              # basic | bottleneck
    resnet_embedding_size: int = 32
    resnet_hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)
    resnet_depths: tuple[int, ...] = (1, 1, 1, 1)
    backbone_norm: str = "group"                  # group (from scratch) | frozen_bn (pretrained)
    sam_config: str = ""                          # models.sam registry name when backbone == sam
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 256
    num_queries: int = 50
    dropout: float = 0.0
    categories: tuple[str, ...] = ("object",)

    def __post_init__(self) -> None:
        for k in ("resnet_hidden_sizes", "resnet_depths", "categories"):
            object.__setattr__(self, k, tuple(getattr(self, k)))
        if self.backbone not in ("resnet", "sam"):
            raise ValueError(f"backbone={self.backbone!r}: allowed 'resnet', 'sam'")
        if self.backbone == "sam" and not self.sam_config:
            raise ValueError("sam_config: a dataengine.models.sam config name is required when "
                             "backbone='sam'")
        if self.backbone_norm not in ("group", "frozen_bn"):
            raise ValueError(f"backbone_norm={self.backbone_norm!r}: allowed 'group', 'frozen_bn'")
        if self.resnet_layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"resnet_layer_type={self.resnet_layer_type!r}: "
                             "allowed 'basic', 'bottleneck'")
        if len(self.resnet_hidden_sizes) != len(self.resnet_depths):
            raise ValueError("resnet_hidden_sizes and resnet_depths must have the same length")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 32, >= 32")
        if self.d_model % self.attention_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by "
                             f"attention_heads={self.attention_heads}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries={self.num_queries} must be >= 1")
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories={self.categories}: need >= 1 distinct names")

    @property
    def num_labels(self) -> int:
        return len(self.categories)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("resnet_hidden_sizes", "resnet_depths", "categories"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"detector config: unknown key(s) {unknown}; "
                             f"allowed: {sorted(allowed)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DetectorConfig:
        return dataclasses.replace(self, **changes)


def _published(name: str, depths: tuple[int, ...]) -> DetectorConfig:
    return DetectorConfig(name=name, image_size=800, resnet_layer_type="bottleneck",
                          resnet_embedding_size=64, resnet_hidden_sizes=(256, 512, 1024, 2048),
                          resnet_depths=depths, backbone_norm="frozen_bn", d_model=256,
                          encoder_layers=6, decoder_layers=6, attention_heads=8, ffn_dim=2048,
                          num_queries=300, dropout=0.1)


DETECTOR_CONFIGS: dict[str, DetectorConfig] = {
    "resnet50": _published("resnet50", (3, 4, 6, 3)),
    "resnet101": _published("resnet101", (3, 4, 23, 3)),
    "tiny": DetectorConfig(),
    "tiny-test": DetectorConfig(name="tiny-test", image_size=64, resnet_embedding_size=16,
                                resnet_hidden_sizes=(16, 32, 32, 64), d_model=64,
                                encoder_layers=1, decoder_layers=2, attention_heads=4,
                                ffn_dim=128, num_queries=16),
}


def get_config(config: str | DetectorConfig | dict[str, Any]) -> DetectorConfig:
    """A registry name, a dict (e.g. from ``config.json``) or a config ->
    :class:`DetectorConfig`."""
    if isinstance(config, DetectorConfig):
        return config
    if isinstance(config, dict):
        return DetectorConfig.from_dict(config)
    if config not in DETECTOR_CONFIGS:
        raise ValueError(f"detector config {config!r} is unknown; allowed: "
                         f"{sorted(DETECTOR_CONFIGS)}")
    return DETECTOR_CONFIGS[config]


def config_of(model: nn.Module) -> DetectorConfig:
    """The :class:`DetectorConfig` a model was built from."""
    cfg = getattr(model, "detector_config", None)
    if cfg is None:
        raise ValueError("model was not built by dataengine.models.detector.build_detector")
    return cfg


class SamBackbone(nn.Module):
    """SAM's ViT image encoder as a DETR backbone: one feature map (``Bx C x S/16 x S/16``)."""

    def __init__(self, sam_config: str) -> None:
        super().__init__()
        from dataengine.models.sam import build_sam

        sam = build_sam(sam_config, seed=0, device="cpu")
        self.encoder = sam.image_encoder
        self.channels = [sam.sam_config.embedding_channels]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return [self.encoder(pixel_values)]


def _hf_config(cfg: DetectorConfig):
    from transformers import ConditionalDetrConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=cfg.resnet_embedding_size,
                            hidden_sizes=list(cfg.resnet_hidden_sizes),
                            depths=list(cfg.resnet_depths), layer_type=cfg.resnet_layer_type,
                            out_features=[f"stage{len(cfg.resnet_depths)}"])
    return ConditionalDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.attention_heads, decoder_attention_heads=cfg.attention_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, num_queries=cfg.num_queries,
        num_labels=cfg.num_labels, dropout=cfg.dropout, auxiliary_loss=True,
        id2label=dict(enumerate(cfg.categories)),
        label2id={c: i for i, c in enumerate(cfg.categories)})


def _group_norm(module: nn.Module) -> None:
    """Replace frozen batch norms (identity at random init) by trainable GroupNorm."""
    for name, child in list(module.named_children()):
        if type(child).__name__.endswith("FrozenBatchNorm2d"):
            c = child.weight.shape[0]
            setattr(module, name, nn.GroupNorm(min(8, c), c))
        else:
            _group_norm(child)


def build_detector(config: str | DetectorConfig | dict[str, Any] = "tiny",
                   checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None, *,
                   categories: list[str] | None = None,
                   seed: int | None = 0, device: str | torch.device | None = None) -> nn.Module:
    """Build a ``ConditionalDetrForObjectDetection`` in eval mode; random init (deterministic for
    ``seed``) or a checkpoint (see :func:`load_weights`). ``categories`` overrides the config's
    class list (default one class, ``object``)."""
    from transformers import ConditionalDetrForObjectDetection

    cfg = get_config(config)
    if categories:
        cfg = cfg.replace(categories=tuple(categories))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ConditionalDetrForObjectDetection(_hf_config(cfg))
        conv = model.model.backbone
        if cfg.backbone == "sam":
            sam_bb = SamBackbone(cfg.sam_config)
            conv.model = sam_bb
            conv.intermediate_channel_sizes = sam_bb.channels
            model.model.input_projection = nn.Conv2d(sam_bb.channels[-1], cfg.d_model, 1)
        elif cfg.backbone_norm == "group":
            _group_norm(conv.model)
        for p in conv.model.parameters():  # transformers freezes the stem for pretrained nets
            p.requires_grad_(True)
    model.detector_config = cfg  # type: ignore[attr-defined]
    model.eval()
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(pick_device(device))


detector_registry = {name: (lambda n: lambda **kw: build_detector(n, **kw))(name)
                     for name in DETECTOR_CONFIGS}


def load_weights(model: nn.Module,
                 checkpoint: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state dict or local checkpoint into ``model`` strictly (transformers'
    ``conditional_detr.`` prefix of ``save_pretrained`` folders is mapped to ours); a clear error
    when it does not fit."""
    state = as_state_dict(checkpoint)
    if not set(state) & set(model.state_dict()):
        state = {k.replace("conditional_detr.model.", "model.", 1)
                 .replace("conditional_detr.", "", 1): v for k, v in state.items()}
    where = "a state dict" if isinstance(checkpoint, Mapping) else repr(str(checkpoint))
    return load_state(model, state, f"detector checkpoint {where} does not fit config "
                                    f"{config_of(model).name!r}")


def init_backbone_from_sam(model: nn.Module, sam: Any) -> nn.Module:
    """Copy a SAM model's image-encoder weights into a ``backbone="sam"`` detector."""
    cfg = config_of(model)
    if cfg.backbone != "sam":
        raise ValueError(f"detector {cfg.name!r} has a {cfg.backbone!r} backbone, not 'sam'")
    enc = model.model.backbone.model.encoder
    try:
        enc.load_state_dict(sam.image_encoder.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"SAM encoder does not fit detector sam_config {cfg.sam_config!r}: "
                         f"{str(exc)[:300]}") from exc
    return model


# ---- inputs and outputs -----------------------------------------------------------------------

def preprocess(images: list[np.ndarray], size: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """HxWx3 uint8 RGB images -> ``(Bx3xSxS float pixel_values, BxSxS long pixel_mask,
    per-image scale)``: longest side resized to ``size``, padded bottom-right,
    ImageNet-normalised."""
    import cv2

    b = len(images)
    pix = torch.zeros(b, 3, size, size)
    mask = torch.zeros(b, size, size, dtype=torch.long)
    scales = []
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image {i} must be HxWx3 RGB, got shape {im.shape}")
        h, w = im.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        r = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        t = torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1).float() / 255.0
        pix[i, :, :nh, :nw] = (t - mean) / std
        mask[i, :nh, :nw] = 1
        scales.append(s)
    return pix, mask, scales


def boxes_to_targets(boxes_xywh: list[np.ndarray], labels: list[np.ndarray], scales: list[float],
                     size: int) -> list[dict[str, torch.Tensor]]:
    """Per-image COCO ``xywh`` pixel boxes (stored frame) -> DETR targets (``cxcywh`` / canvas)."""
    out = []
    for b, lab, s in zip(boxes_xywh, labels, scales, strict=True):
        b = np.asarray(b, dtype=np.float32).reshape(-1, 4) * s / size
        t = torch.from_numpy(np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2,
                                       b[:, 2], b[:, 3]], axis=1) if len(b) else
                             np.zeros((0, 4), np.float32)).clamp(0, 1)
        out.append({"boxes": t, "labels": torch.as_tensor(np.asarray(lab, np.int64).reshape(-1))})
    return out


def forward_layers(model: nn.Module, pixel_values: torch.Tensor,
                   pixel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits ``LxBxQxC`` and boxes ``LxBxQx4`` (cxcywh in [0, 1]) of every decoder layer
    (the last is the model's answer; the others feed the auxiliary losses)."""
    from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

    det = model.module if hasattr(model, "module") else model
    out = det.model(pixel_values, pixel_mask=pixel_mask)
    hs = out.intermediate_hidden_states                      # L x B x Q x D
    ref = inverse_sigmoid(out.reference_points).transpose(0, 1)  # B x Q x 2
    logits = det.class_labels_classifier(hs)
    tmp = det.bbox_predictor(hs)
    xy = tmp[..., :2] + ref[None]
    boxes = torch.cat([xy, tmp[..., 2:]], dim=-1).sigmoid()
    return logits, boxes


class LayerOutputs(nn.Module):
    """A detector whose ``forward(pixel_values, pixel_mask)`` returns :func:`forward_layers`'
    ``(logits, boxes)`` — the module DDP wraps for training."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_layers(self.detector, pixel_values, pixel_mask)


@torch.inference_mode()
def detect(model: nn.Module, images: list[np.ndarray], *, threshold: float = 0.5,
           max_detections: int = 100) -> list[dict[str, np.ndarray]]:
    """Boxes for HxWx3 uint8 images: per image ``boxes`` Nx4 xyxy pixels (stored frame),
    ``scores`` N in [0, 1], ``labels`` N (category index), best first."""
    cfg = config_of(model)
    dev = next(model.parameters()).device
    pix, mask, scales = preprocess(images, cfg.image_size)
    with autocast(dev):
        logits, boxes = forward_layers(model, pix.to(dev), mask.to(dev))
    prob = logits[-1].float().sigmoid().cpu()
    boxes = boxes[-1].float().cpu()
    out = []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        scores, labels = prob[i].max(dim=-1)
        keep = torch.nonzero(scores >= threshold).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True)][:max_detections]
        b = boxes[i][keep]
        xyxy = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2,
                            b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], dim=1)
        xyxy = xyxy * cfg.image_size / scales[i]
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        out.append({"boxes": xyxy.numpy().astype(np.float32),
                    "scores": scores[keep].numpy().astype(np.float32),
                    "labels": labels[keep].numpy().astype(np.int64)})
    return out
