"""Small image encoders for SAM that learn from little data on a CPU, behind ``Sam``'s interface.

``../shared/findings/sam-from-scratch-on-cpu.md`` measured that the tiny ViT encoder trained from
random weights on a few hundred masks learns to paint clicks but hardly to see. This module gives
the registry (``dataengine.models.sam``) a convolutional alternative with the same contract as
``segment_anything``'s ``ImageEncoderViT``: input ``Bx3xSxS`` float (normalised and padded by
``Sam.preprocess``), output ``BxCx(S/16)x(S/16)`` float image embedding, attribute ``img_size``.
So ``Sam``, ``SamPredictor``, ``SamAutomaticMaskGenerator``, the ONNX decoder export and every
trainer work unchanged.

:class:`ConvImageEncoder` (config ``encoder="conv"``): a residual CNN (stride 2 stem, three
stride-2 stages of basic blocks, BatchNorm + GELU) down to 1/16 resolution, then
``encoder_depth`` global-attention transformer blocks (segment_anything's ``Block`` with
relative positions) on the 16x16 grid for image-wide context (a hybrid, as EfficientViT-SAM /
TinyViT are), then SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to
``prompt_embed_dim`` channels. Convolutions bring the locality prior a ViT must learn from data.

:class:`MaeHead` is the pixel decoder of masked-autoencoder pre-training
(``dataengine.pipeline.sam.pretrain``): from the ``BxCxGxG`` embedding to ``Bx3xSxS`` pixels (a 1x1
conv to ``16*16*3`` values per cell, then pixel shuffle); it is not part of the SAM model.
"""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn

ENCODERS = ("vit", "conv", "hq")
# channels of the stem and the three downsampling stages (1/2, 1/4, 1/8, 1/16); the last one is
# scaled to the config's encoder_embed_dim
CONV_WIDTHS = (32, 48, 96)
CONV_BLOCKS = (1, 2, 2)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, GELU, identity shortcut."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.GELU())


def add_trunk(enc: nn.Module, img_size: int, embed_dim: int, depth: int, num_heads: int,
              mlp_ratio: float, out_chans: int, widths: tuple[int, ...],
              blocks: tuple[int, ...]) -> None:
    """Give a conv encoder (whose ``stem`` makes 1/2 resolution) the shared trunk: conv stages to
    1/4, 1/8 and 1/16 (``stage1``-``stage3``), global-attention blocks on the 1/16 grid
    (``pos_embed``, ``blocks``) and SAM's ``neck``."""
    w0, w1, w2 = widths
    enc.stage1 = nn.Sequential(_down(w0, w1), *[BasicBlock(w1) for _ in range(blocks[0])])
    enc.stage2 = nn.Sequential(_down(w1, w2), *[BasicBlock(w2) for _ in range(blocks[1])])
    enc.stage3 = nn.Sequential(_down(w2, embed_dim),
                               *[BasicBlock(embed_dim) for _ in range(blocks[2])])
    grid = img_size // 16
    enc.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
    enc.blocks = nn.ModuleList(
        Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
              norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
              window_size=0, input_size=(grid, grid))
        for _ in range(depth))
    enc.neck = nn.Sequential(
        nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False), LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans))



def trunk_maps(enc: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The maps of a trunk made by :func:`add_trunk`: ``{"s4", "s8", "s16", "embedding"}``."""
    f4 = enc.stage1(enc.stem(x))
    f8 = enc.stage2(f4)
    f16 = enc.stage3(f8)
    t = f16.permute(0, 2, 3, 1) + enc.pos_embed
    for blk in enc.blocks:
        t = blk(t)
    emb = enc.neck(t.permute(0, 3, 1, 2))
    return {"s4": f4, "s8": f8, "s16": f16, "embedding": emb}


class ConvImageEncoder(nn.Module):
    """Hybrid conv + attention encoder: ``Bx3xSxS`` -> ``Bx out_chans x S/16 x S/16``.

    ``feature_maps(x)`` also returns the intermediate maps (1/4, 1/8, 1/16) for callers that want
    early features; ``forward`` returns only the embedding, as ``ImageEncoderViT`` does.
    """

    def __init__(self, img_size: int = 256, embed_dim: int = 192, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, out_chans: int = 128,
                 widths: tuple[int, ...] = CONV_WIDTHS,
                 blocks: tuple[int, ...] = CONV_BLOCKS) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size={img_size}: must be a multiple of 16 for the conv encoder")
        self.img_size = img_size
        w0 = widths[0]
        self.stem = nn.Sequential(_down(3, w0),
                                  nn.Conv2d(w0, w0, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w0), nn.GELU())                 # 1/2
        add_trunk(self, img_size, embed_dim, depth, num_heads, mlp_ratio, out_chans, widths,
                  blocks)

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"s4": Bx48xS/4, "s8": Bx96xS/8, "s16": BxCxS/16, "embedding": ...}``."""
        return trunk_maps(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)["embedding"]


def build_encoder(cfg: Any) -> nn.Module:
    """The image encoder named by ``cfg.encoder`` for a :class:`models.sam.SamConfig` (only
    the non-ViT kinds; ``dataengine.models.sam.build_sam`` builds the ViT itself)."""
    if cfg.encoder == "conv":
        return ConvImageEncoder(img_size=cfg.image_size, embed_dim=cfg.encoder_embed_dim,
                                depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads,
                                mlp_ratio=cfg.mlp_ratio, out_chans=cfg.prompt_embed_dim)
    raise ValueError(f"encoder={cfg.encoder!r}: one of {ENCODERS}")


class MaeHead(nn.Module):
    """Pixel decoder for masked-autoencoder pre-training: ``BxCxGxG`` -> ``Bx3x16Gx16G``."""

    def __init__(self, in_chans: int, patch: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.patch = patch
        self.net = nn.Sequential(nn.Conv2d(in_chans, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, 3 * patch * patch, 1))
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.net(emb))
