"""A small SAM with high-resolution fusion (SAM-HQ-like) behind ``Sam``'s one-tensor contract.

Config ``encoder="hq"`` of :mod:`dataengine.models.sam` (``tiny-hq``, ``tiny-hq-match``,
``tiny-hq-proto``). The trained small models of ``../shared/findings`` paint clicks but do not
use the image; these options give the decoder the image at 1/4 resolution (an FPN map plus the
input colours) and, with ``hq_proto``, a direct comparison of every pixel with the prompted
region (prototype matching), with a dense loss (:func:`prototype_loss`) that painting cannot
satisfy. Everything is plain torch (pixel (un)shuffle, conv), so ``SamPredictor``, the
automatic mask generator and the ONNX decoder export work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import nn

from dataengine.models.sam_small import _down, add_trunk, trunk_maps

# ---- high-resolution fusion (SAM-HQ-like) behind SAM's one-tensor contract -------------------
#
# The encoder runs once per image and still returns ONE tensor: the usual C-channel 1/16
# embedding followed by a space-to-depth packing (pixel unshuffle by 4) of ``hq_channels``
# feature channels at 1/4 resolution (an FPN top-down map that mixes the 1/16 context with
# 1/8 and 1/4 detail). The prompt encoder's dense embedding likewise carries, after its C
# channels, the raw low-res mask prompt packed the same way (16 channels), so the decoder sees
# the previous mask and the painted clicks at full 1/4 resolution. The decoder runs SAM's
# two-way transformer on the first C channels, upscales as SAM does, then fuses the upscaled
# embedding with the unpacked 1/4-resolution image features and the mask prompt (two 3x3 conv
# layers, optionally a small U-Net for image-wide propagation) before the hypernetwork product.
# The image features' share of the first fusion conv is computed once per image, not per
# prompt. Everything is plain torch (pixel (un)shuffle, conv), so the ONNX decoder export works.

def pack_hq(hq: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``BxKx(4G)x(4G)`` -> ``Bx(16K)xGxG`` (pixel unshuffle)."""
    return F.pixel_unshuffle(hq, factor)


def unpack_hq(packed: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Inverse of :func:`pack_hq`."""
    return F.pixel_shuffle(packed, factor)


class HQConvEncoder(nn.Module):
    """Conv + attention encoder with an FPN 1/4-resolution map packed into its one output:
    ``Bx3xSxS`` -> ``Bx(C + 16K)x(S/16)x(S/16)`` (C = ``out_chans``, K = ``hq_channels``)."""

    def __init__(self, img_size: int = 256, embed_dim: int = 160, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, out_chans: int = 128,
                 hq_channels: int = 32, widths: tuple[int, int, int] = (24, 32, 64),
                 blocks: tuple[int, int, int] = (2, 2, 2), fpn_dim: int = 64,
                 rgb: bool = False) -> None:
        super().__init__()
        # rgb: the last 3 of the hq channels are the (normalised) input colours averaged over
        # each 4x4 cell, not learnt: the decoder can compare colours from the first step
        self.rgb = rgb
        learnt = hq_channels - 3 if rgb else hq_channels
        if learnt < 1:
            raise ValueError(f"hq_channels={hq_channels}: too few for rgb")
        if img_size % 16:
            raise ValueError(f"img_size={img_size}: must be a multiple of 16")
        self.img_size = img_size
        self.out_chans = out_chans
        self.hq_channels = hq_channels
        w0, w1, w2 = widths
        self.stem = _down(3, w0)                                                      # 1/2
        add_trunk(self, img_size, embed_dim, depth, num_heads, mlp_ratio, out_chans, widths,
                  blocks)
        # FPN top-down path to 1/4 resolution
        self.top = nn.Conv2d(out_chans, fpn_dim, 1)
        self.lat8 = nn.Conv2d(w2, fpn_dim, 1)
        self.smooth8 = nn.Sequential(nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(fpn_dim), nn.GELU())
        self.reduce8 = nn.Conv2d(fpn_dim, w1, 1)
        self.lat4 = nn.Conv2d(w1, w1, 1)
        self.smooth4 = nn.Sequential(nn.Conv2d(w1, w1, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(w1), nn.GELU(),
                                     nn.Conv2d(w1, learnt, 1), LayerNorm2d(learnt))

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = trunk_maps(self, x)
        f4, f8, emb = maps["s4"], maps["s8"], maps["embedding"]
        p8 = F.interpolate(self.top(emb), scale_factor=2.0, mode="nearest") + self.lat8(f8)
        p8 = self.smooth8(p8)
        p4 = F.interpolate(self.reduce8(p8), scale_factor=2.0, mode="nearest") + self.lat4(f4)
        hq = self.smooth4(p4)
        if self.rgb:
            hq = torch.cat([hq, F.avg_pool2d(x, 4)], dim=1)
        return {**maps, "hq": hq}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feature_maps(x)
        return torch.cat([f["embedding"], pack_hq(f["hq"])], dim=1)


class HQMaskDownscaling(nn.Module):
    """SAM's mask downscaling (``conv``) with the raw ``1x(4G)x(4G)`` mask prompt appended,
    packed to 16 channels at ``GxG``: ``Nx1x4Gx4G`` -> ``Nx(C + 16)xGxG``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(masks), pack_hq(masks)], dim=1)


def hq_prompt_encoder(**kw: Any) -> nn.Module:
    """segment_anything's ``PromptEncoder`` whose dense embedding carries the packed raw mask
    prompt after its ``embed_dim`` channels (``no_mask_embed`` widened to match)."""
    from segment_anything.modeling import PromptEncoder

    pe = PromptEncoder(**kw)
    pe.mask_downscaling = HQMaskDownscaling(pe.mask_downscaling)
    pe.no_mask_embed = nn.Embedding(1, pe.embed_dim + 16)
    return pe


class _UNetRefine(nn.Module):
    """A small U-Net of depthwise-separable convs over the fused 1/4-resolution map: image-wide
    propagation per prompt (each level halves the resolution) at a few M MACs per prompt."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__()

        def sep(cin: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
                                 nn.Conv2d(cin, dim, 1), LayerNorm2d(dim), nn.GELU())

        self.downs = nn.ModuleList(nn.Sequential(sep(dim, 2), sep(dim)) for _ in range(levels))
        self.ups = nn.ModuleList(sep(2 * dim) for _ in range(levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for d in self.downs:
            skips.append(x)
            x = d(x)
        for u, s in zip(self.ups, reversed(skips)):
            x = u(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="bilinear",
                                           align_corners=False), s], 1))
        return x


class HQMaskDecoder(MaskDecoder):
    """segment_anything's ``MaskDecoder`` + fusion with the packed 1/4-resolution image
    features and mask prompt before the hypernetwork product (see the section comment)."""

    def __init__(self, *, hq_channels: int, hq_dim: int = 32, refine_levels: int = 0,
                 mask_scale: float = 5.0, proto: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        c = self.transformer_dim
        self.hq_channels = hq_channels
        self.hq_dim = hq_dim
        self.mask_scale = mask_scale
        # proto: prototype matching (as in few-shot segmentation): the mean 1/4-resolution
        # feature under the positive part of the mask prompt (painted clicks, previous mask)
        # and under its negative part; each pixel's cosine similarity to both is given to the
        # fusion (2 channels), so comparing a pixel with the clicked region needs no learning
        self.proto = proto
        self.proto_scale = nn.Parameter(torch.tensor(5.0)) if proto else None
        extra = 2 if proto else 0
        # SAM's two transposed convs replaced by a 1x1 conv + bilinear x4: the detail at 1/4
        # resolution comes from the image features, and this is 50x cheaper per prompt
        self.output_upscaling = nn.Sequential(
            nn.Conv2d(c, c // 8, 1), nn.Upsample(scale_factor=4.0, mode="bilinear",
                                                 align_corners=False))
        # fusion: image part (a 3x3 conv, once per image) + prompt part (1x1, per prompt), then
        # a cheap depthwise-separable residual block per prompt
        self.fuse_image = nn.Conv2d(hq_channels, hq_dim, 3, padding=1)
        self.fuse_prompt = nn.Conv2d(c // 8 + 1 + extra, hq_dim, 1, bias=False)
        self.fuse_norm = nn.Sequential(LayerNorm2d(hq_dim), nn.GELU())
        self.fuse = nn.Sequential(nn.Conv2d(hq_dim, hq_dim, 5, padding=2, groups=hq_dim),
                                  nn.GELU(), nn.Conv2d(hq_dim, hq_dim, 1))
        self.refine = _UNetRefine(hq_dim, refine_levels) if refine_levels > 0 else None
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(c, c, hq_dim, 3) for _ in range(self.num_mask_tokens))

    def _similarity(self, hq: torch.Tensor, mask64: torch.Tensor, n: int) -> list[torch.Tensor]:
        return _proto_similarity(hq, mask64, n, self.proto_scale, self.mask_scale)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.transformer_dim
        emb, hq = image_embeddings[:, :c], unpack_hq(image_embeddings[:, c:])
        dense, mask64 = dense_prompt_embeddings[:, :c], unpack_hq(dense_prompt_embeddings[:, c:])
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        n = tokens.shape[0]
        src = torch.repeat_interleave(emb, n // emb.shape[0], dim=0) + dense
        pos_src = torch.repeat_interleave(image_pe, n, dim=0)
        b, _, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = self.output_upscaling(src)                                  # N x c/8 x 4h x 4w
        img = self.fuse_image(hq)                                        # B x D x 4h x 4w
        img = torch.repeat_interleave(img, n // img.shape[0], dim=0)
        m = torch.tanh(mask64 / self.mask_scale)
        parts = [up, m]
        if self.proto:
            parts.extend(self._similarity(hq, mask64, n))
        fused = self.fuse_norm(img + self.fuse_prompt(torch.cat(parts, 1)))
        fused = fused + self.fuse(fused)
        if self.refine is not None:
            fused = fused + self.refine(fused)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in
                                enumerate(self.output_hypernetworks_mlps)], dim=1)
        bb, d, hh, ww = fused.shape
        masks = (hyper_in @ fused.reshape(bb, d, hh * ww)).reshape(bb, -1, hh, ww)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def _proto_similarity(hq: torch.Tensor, mask64: torch.Tensor, n: int, scale: torch.Tensor,
                      mask_scale: float = 5.0) -> list[torch.Tensor]:
    """``[Nx1xHxW cosine similarity to the positive prototype, ... to the negative one]``
    (``hq`` BxKxHxW image features, ``mask64`` Nx1xHxW mask-prompt logits). A pixel weighs in
    a prototype by its confidence ``relu(tanh(+-logit / mask_scale))``: a logit of 0 (no
    information) adds nothing, so one painted click's prototype is its disc's features."""
    f = F.normalize(hq, dim=1)
    f = torch.repeat_interleave(f, n // f.shape[0], dim=0)                    # NxKxHxW
    t = torch.tanh(mask64 / mask_scale)
    out = []
    for w in (F.relu(t), F.relu(-t)):
        proto = (f * w).sum((2, 3), keepdim=True) / (w.sum((2, 3), keepdim=True) + 1e-3)
        proto = F.normalize(proto, dim=1)
        out.append(scale * (f * proto).sum(1, keepdim=True))
    return out


def prototype_loss(feats: torch.Tensor, gt: torch.Tensor, img_idx: torch.Tensor,
                   out_chans: int, temperature: float = 10.0, margin: float = 0.5
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """A dense loss that makes the packed 1/4-resolution features instance-discriminative:
    each ground-truth mask's mean feature (its prototype) must segment the mask by cosine
    similarity alone (BCE of ``temperature * (cos - margin)`` against the area-downsampled
    mask over the whole image), which is what the decoder's prototype matching reads.
    ``feats`` BxCxGxG embeddings (C = ``out_chans`` + packed), ``gt`` NxSxS, ``img_idx`` N."""
    hq = unpack_hq(feats[:, out_chans:])                                     # BxKx4Gx4G
    side = hq.shape[-1]
    w = F.interpolate(gt[:, None], size=(side, side), mode="area")          # Nx1xHxW
    f = F.normalize(hq, dim=1)[img_idx]                                      # NxKxHxW
    proto = F.normalize((f * w).sum((2, 3), keepdim=True) /
                        (w.sum((2, 3), keepdim=True) + 1e-6), dim=1)
    logits = temperature * ((f * proto).sum(1, keepdim=True) - margin)
    loss = F.binary_cross_entropy_with_logits(logits, w)
    with torch.no_grad():
        pred = logits > 0
        t = w > 0.5
        iou = ((pred & t).flatten(1).sum(1).float() /
               (pred | t).flatten(1).sum(1).clamp(min=1).float()).mean()
    return loss, {"proto_loss": float(loss.detach()), "proto_iou": float(iou)}


def build_hq_parts(cfg: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(image_encoder, prompt_encoder, mask_decoder)`` of an ``encoder="hq"`` config."""
    from dataengine.models.sam import decoder_args

    emb = cfg.embedding_size
    enc = HQConvEncoder(img_size=cfg.image_size, embed_dim=cfg.encoder_embed_dim,
                        depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads,
                        mlp_ratio=cfg.mlp_ratio, out_chans=cfg.prompt_embed_dim,
                        hq_channels=cfg.hq_channels, rgb=cfg.hq_rgb)
    pe = hq_prompt_encoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
                           input_image_size=(cfg.image_size, cfg.image_size),
                           mask_in_chans=cfg.mask_in_chans)
    dec = HQMaskDecoder(hq_channels=cfg.hq_channels, hq_dim=cfg.hq_dim,
                        refine_levels=cfg.hq_refine_levels, proto=cfg.hq_proto,
                        **decoder_args(cfg))
    return enc, pe, dec
