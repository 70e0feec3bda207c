"""SAM 2 / 2.1 image models (Hiera encoder) behind SAM v1's ``Sam`` interface.

Built from Meta's official ``sam2`` package classes (``Hiera``, ``FpnNeck``, SAM 2's
``PromptEncoder`` and ``MaskDecoder``), without hydra configs: one registry of named
:class:`Sam2Config` s (``sam2_hiera_t``, ``sam2_hiera_s``, ``sam2_hiera_b+``, ``sam2_hiera_l``, the
image parts of ``configs/sam2{,.1}/sam2{,.1}_hiera_*.yaml``, and ``sam2-tiny-test`` for unit
tests). SAM 2 and SAM 2.1 share the image architecture, so both checkpoint families load into the
same config. Only the image path is built: the video memory modules are not, and their weights in
an official checkpoint are skipped.

:class:`Sam2Model` has the attributes every SAM v1 caller uses (``image_encoder.img_size``,
``prompt_encoder``, ``mask_decoder(image_embeddings=..., image_pe=..., sparse_prompt_embeddings=...,
dense_prompt_embeddings=..., multimask_output=...) -> (low-res logits, IoU)``, ``preprocess``,
``postprocess_masks``, ``mask_threshold``, ``device``), so ``SamPredictor``, the automatic
generator, the embedding cache, the trainers and the server drive it unchanged. Two SAM 2 facts are
kept:

- **The image embedding is packed.** SAM 2's decoder also reads two high-resolution feature maps
  (stride 4 and 8, after the decoder's ``conv_s0`` / ``conv_s1``); :class:`Sam2ImageEncoder` folds
  them into the channels of the stride-16 grid (pixel-unshuffle) after the 256 embedding channels,
  so "the embedding of an image" stays one ``CxSxS`` tensor (C = 256 + 16*32 + 4*64 = 1024 for the
  published models) that the cache stores and the decoder unpacks. ``conv_s0`` / ``conv_s1`` and
  ``no_mem_embed`` belong to the image side here (keys ``image_encoder.*``).
- **The input frame is a square resize** (SAM 2's ``SAM2Transforms``: no aspect-preserving
  padding): :class:`SquareResize` replaces ``ResizeLongestSide`` (``model.transform``), with the
  same methods, so ``input_size`` is always ``(S, S)``.

:func:`official_state_dict` maps an official checkpoint (``{"model": state}`` of ``SAM2Base``,
read weights-only by :mod:`dataengine.models.checkpoint`) onto these keys.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FAMILY = "sam2"


@dataclass(frozen=True)
class Sam2Config:
    """Architecture of one SAM 2 image model (fields map onto the official yaml's arguments)."""

    name: str = "sam2_hiera_t"
    family: str = FAMILY
    image_size: int = 1024
    embed_dim: int = 96                       # Hiera stage-1 width (x2 per stage)
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    prompt_embed_dim: int = 256               # FPN d_model = prompt / decoder width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    # single-mask answers fall back to the best multimask output when not stable (SAM 2's
    # build_sam2(apply_postprocessing=True))
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        for k in ("stages", "global_att_blocks", "window_pos_embed_bkg_spatial_size",
                  "window_spec"):
            object.__setattr__(self, k, tuple(int(v) for v in getattr(self, k)))
        for k in ("pixel_mean", "pixel_std"):
            object.__setattr__(self, k, tuple(float(v) for v in getattr(self, k)))
        if self.family != FAMILY:
            raise ValueError(f"family={self.family!r}: a Sam2Config has family {FAMILY!r}")
        if len(self.stages) != 4 or len(self.window_spec) != 4:
            raise ValueError(f"stages={self.stages} and window_spec={self.window_spec} need 4 "
                             f"entries (Hiera's four stages)")
        if self.image_size % 32:
            raise ValueError(f"image_size={self.image_size}: must be a multiple of 32")
        side = self.image_size // 4
        if side % self.window_spec[0]:
            raise ValueError(f"window_spec[0]={self.window_spec[0]} must divide the stage-1 "
                             f"grid {side} (image_size / 4)")
        depth = sum(self.stages)
        bad = [i for i in self.global_att_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_att_blocks={bad} outside Hiera depth {depth}")
        if self.prompt_embed_dim % 8 or (self.prompt_embed_dim // 2) % self.decoder_num_heads:
            raise ValueError(f"prompt_embed_dim={self.prompt_embed_dim}: must be a multiple of "
                             f"8 with prompt_embed_dim/2 divisible by decoder_num_heads="
                             f"{self.decoder_num_heads}")

    encoder = "hiera"

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (``image_size / 16``)."""
        return self.image_size // 16

    @property
    def low_res_size(self) -> int:
        """Side of the low-res mask logits (``4 x embedding_size``)."""
        return 4 * self.embedding_size

    @property
    def packed_channels(self) -> int:
        """Channels of the packed embedding: C + 16 * C/8 + 4 * C/4 (= 4 C)."""
        c = self.prompt_embed_dim
        return c + 16 * (c // 8) + 4 * (c // 4)

    @property
    def channel_list(self) -> list[int]:
        """Hiera's output widths, deepest first (the neck's ``backbone_channel_list``)."""
        return [self.embed_dim * 2 ** i for i in (3, 2, 1, 0)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sam2Config:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"SAM 2 config: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


SAM2_CONFIGS: dict[str, Sam2Config] = {
    "sam2_hiera_t": Sam2Config(),
    "sam2_hiera_s": Sam2Config(name="sam2_hiera_s", stages=(1, 2, 11, 2),
                               global_att_blocks=(7, 10, 13)),
    "sam2_hiera_b+": Sam2Config(name="sam2_hiera_b+", embed_dim=112, num_heads=2,
                                stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                                window_pos_embed_bkg_spatial_size=(14, 14)),
    "sam2_hiera_l": Sam2Config(name="sam2_hiera_l", embed_dim=144, num_heads=2,
                               stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                               window_spec=(8, 4, 16, 8)),
    # unit tests: 128 px, 8x8 embedding grid (as tiny-test), the same classes
    "sam2-tiny-test": Sam2Config(name="sam2-tiny-test", image_size=128, embed_dim=16,
                                 stages=(1, 1, 2, 1), global_att_blocks=(3,),
                                 window_pos_embed_bkg_spatial_size=(4, 4),
                                 window_spec=(8, 4, 4, 2), prompt_embed_dim=64,
                                 decoder_mlp_dim=128, decoder_num_heads=4,
                                 iou_head_hidden_dim=64),
}

# official checkpoint file names (facebook/sam2*-hiera-*) -> registry name
OFFICIAL_FILES = {
    "sam2_hiera_tiny": "sam2_hiera_t", "sam2_hiera_small": "sam2_hiera_s",
    "sam2_hiera_base_plus": "sam2_hiera_b+", "sam2_hiera_large": "sam2_hiera_l",
    "sam2.1_hiera_tiny": "sam2_hiera_t", "sam2.1_hiera_small": "sam2_hiera_s",
    "sam2.1_hiera_base_plus": "sam2_hiera_b+", "sam2.1_hiera_large": "sam2_hiera_l",
}


def is_sam2_config(config: Any) -> bool:
    """Whether ``config`` (a name, dict or config) names a SAM 2 model."""
    if isinstance(config, Sam2Config):
        return True
    if isinstance(config, dict):
        return config.get("family") == FAMILY
    return isinstance(config, str) and config in SAM2_CONFIGS


def get_sam2_config(config: str | Sam2Config | dict[str, Any]) -> Sam2Config:
    """A registry name, a dict (a saved ``config.json``) or a config -> :class:`Sam2Config`."""
    if isinstance(config, Sam2Config):
        return config
    if isinstance(config, dict):
        return Sam2Config.from_dict(config)
    if config not in SAM2_CONFIGS:
        raise ValueError(f"SAM 2 config {config!r} is unknown; allowed: {sorted(SAM2_CONFIGS)}")
    return SAM2_CONFIGS[config]


# ---- the input frame -------------------------------------------------------------------------

class SquareResize:
    """SAM 2's input frame: the image resized to ``S x S`` (no padding), with the methods of
    ``segment_anything``'s ``ResizeLongestSide`` so ``SamPredictor`` and the pipeline use it."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> SxSx3 float32 in [0, 255]: bilinear with antialiasing on floats, as
        ``SAM2Transforms`` (torchvision ``Resize``) does."""
        t = torch.from_numpy(np.asarray(image).astype(np.float32)).permute(2, 0, 1)[None]
        return self.apply_image_torch(t)[0].permute(1, 2, 0).numpy()

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW float -> Bx3xSxS."""
        s = self.target_length
        return F.interpolate(image.float(), (s, s), mode="bilinear", align_corners=False,
                             antialias=True)

    def get_preprocess_shape(self, oldh: int, oldw: int, long_side_length: int
                             ) -> tuple[int, int]:
        return long_side_length, long_side_length

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in the original image -> the ``S x S`` frame."""
        h, w = original_size
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (self.target_length / w)
        out[..., 1] = out[..., 1] * (self.target_length / h)
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]
                           ) -> torch.Tensor:
        h, w = original_size
        scale = torch.tensor([self.target_length / w, self.target_length / h],
                             dtype=torch.float, device=coords.device)
        return coords.float() * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]
                          ) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


# ---- the modules -----------------------------------------------------------------------------

def _pack(embed: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    return torch.cat([embed, F.pixel_unshuffle(s0, 4), F.pixel_unshuffle(s1, 2)], dim=1)


def unpack(packed: torch.Tensor, dim: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Packed ``Bx4CxSxS`` embedding -> (``BxCxSxS`` image embedding, [``Bx C/8 x 4S``,
    ``Bx C/4 x 2S``] high-resolution features)."""
    n0 = 16 * (dim // 8)
    embed = packed[:, :dim]
    s0 = F.pixel_shuffle(packed[:, dim:dim + n0], 4)
    s1 = F.pixel_shuffle(packed[:, dim + n0:], 2)
    return embed, [s0, s1]


class Sam2ImageEncoder(nn.Module):
    """Hiera + FPN neck + the decoder's high-res projections: ``Bx3xSxS`` normalised ->
    packed ``Bx4CxS/16xS/16`` embedding (see the module docstring)."""

    def __init__(self, cfg: Sam2Config) -> None:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck
        from sam2.modeling.position_encoding import PositionEmbeddingSine

        super().__init__()
        c = cfg.prompt_embed_dim
        self.img_size = cfg.image_size
        self.dim = c
        self.trunk = Hiera(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, stages=cfg.stages,
                           global_att_blocks=cfg.global_att_blocks,
                           window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size,
                           window_spec=cfg.window_spec)
        self.neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=c,
                                                                    normalize=True,
                                                                    temperature=10000),
                            d_model=c, backbone_channel_list=cfg.channel_list,
                            fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
        self.conv_s0 = nn.Conv2d(c, c // 8, kernel_size=1, stride=1)
        self.conv_s1 = nn.Conv2d(c, c // 4, kernel_size=1, stride=1)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image embedding ``BxCxS/16xS/16``, [stride-4, stride-8 features]) as SAM 2's
        ``SAM2ImagePredictor.set_image`` computes them."""
        feats, _pos = self.neck(self.trunk(x))
        feats = feats[:-1]  # scalp=1: the stride-32 level is not used
        s0 = self.conv_s0(feats[0])
        s1 = self.conv_s1(feats[1])
        embed = feats[2] + self.no_mem_embed.view(1, -1, 1, 1)
        return embed, [s0, s1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed, (s0, s1) = self.features(x)
        return _pack(embed, s1, s0)


def _prompt_encoder_class() -> type:
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    class Sam2PromptEncoder(PromptEncoder):
        """SAM 2's prompt encoder; a box goes in as two corner points ahead of the clicks (as
        ``SAM2ImagePredictor`` prompts it), so v1-style ``(points, boxes, masks)`` calls give
        SAM 2's tokens."""

        def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None,
                    boxes: torch.Tensor | None, masks: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            if boxes is not None:
                corners = boxes.reshape(-1, 2, 2)
                labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device)
                labels = labels.repeat(corners.shape[0], 1)
                if points is not None:
                    points = (torch.cat([corners, points[0]], 1),
                              torch.cat([labels, points[1].to(labels.dtype)], 1))
                else:
                    points = (corners, labels)
            return super().forward(points=points, boxes=None, masks=masks)

    return Sam2PromptEncoder


def _mask_decoder_class() -> type:
    from sam2.modeling.sam.mask_decoder import MaskDecoder

    class Sam2MaskDecoder(MaskDecoder):
        """SAM 2's mask decoder with SAM v1's call: the packed embedding in, ``(BxKxLxL
        low-res logits, BxK IoU)`` out (object-score logits dropped, as
        ``SAM2ImagePredictor`` does)."""

        def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                    sparse_prompt_embeddings: torch.Tensor,
                    dense_prompt_embeddings: torch.Tensor, multimask_output: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            embed, high_res = unpack(image_embeddings, self.transformer_dim)
            repeat = embed.shape[0] != sparse_prompt_embeddings.shape[0]
            masks, iou, _tokens, _obj = super().forward(
                image_embeddings=embed, image_pe=image_pe,
                sparse_prompt_embeddings=sparse_prompt_embeddings,
                dense_prompt_embeddings=dense_prompt_embeddings,
                multimask_output=multimask_output, repeat_image=repeat,
                high_res_features=high_res)
            return masks, iou

    return Sam2MaskDecoder


class Sam2Model(nn.Module):
    """A SAM 2 image model with SAM v1's ``Sam`` attributes (see the module docstring)."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, cfg: Sam2Config) -> None:
        from sam2.modeling.sam.transformer import TwoWayTransformer

        super().__init__()
        c, emb = cfg.prompt_embed_dim, cfg.embedding_size
        self.image_encoder = Sam2ImageEncoder(cfg)
        self.prompt_encoder = _prompt_encoder_class()(
            embed_dim=c, image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans)
        self.mask_decoder = _mask_decoder_class()(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=c,
                                          mlp_dim=cfg.decoder_mlp_dim,
                                          num_heads=cfg.decoder_num_heads),
            transformer_dim=c, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=cfg.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=cfg.dynamic_multimask_stability_thresh)
        # the high-res projections run once per image, on the image side (Sam2ImageEncoder)
        del self.mask_decoder.conv_s0, self.mask_decoder.conv_s1
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), False)
        self.sam_config = cfg
        self.transform = SquareResize(cfg.image_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``Bx3xHxW`` pixels in [0, 255] (already ``S x S``; smaller is zero-padded)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        s = self.image_encoder.img_size
        return F.pad(x, (0, s - w, 0, s - h))

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, ...],
                          original_size: tuple[int, ...]) -> torch.Tensor:
        """Low-res logits ``BxKxLxL`` -> ``BxKxHxW`` at the original size (one bilinear
        resize, as ``SAM2Transforms.postprocess_masks``)."""
        s = self.image_encoder.img_size
        if tuple(input_size) != (s, s):  # a frame that is not the square resize
            masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
            masks = masks[..., :input_size[0], :input_size[1]]
        return F.interpolate(masks.float(), tuple(int(v) for v in original_size),
                             mode="bilinear", align_corners=False)


def build_sam2(config: str | Sam2Config | dict[str, Any] = "sam2_hiera_t",
               checkpoint: Mapping[str, torch.Tensor] | None = None, *,
               seed: int | None = 0) -> Sam2Model:
    """A :class:`Sam2Model` in eval mode on the CPU: random init (deterministic for ``seed``) or
    a state dict (ours, or an official ``SAM2Base`` one: :func:`official_state_dict`)."""
    cfg = get_sam2_config(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = Sam2Model(cfg)
    model.eval()
    if checkpoint is not None:
        load_sam2_weights(model, checkpoint)
    return model


# ---- official checkpoints --------------------------------------------------------------------

# SAM2Base keys of the video memory (not built here) and where the image parts go
_VIDEO_ONLY = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc",
               "no_obj_ptr", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "mask_downsample.",
               "no_obj_embed_spatial")
_RENAMES = (("sam_mask_decoder.conv_s0.", "image_encoder.conv_s0."),
            ("sam_mask_decoder.conv_s1.", "image_encoder.conv_s1."),
            ("no_mem_embed", "image_encoder.no_mem_embed"),
            ("sam_mask_decoder.", "mask_decoder."),
            ("sam_prompt_encoder.", "prompt_encoder."))


def is_official_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has the official ``SAM2Base`` key layout."""
    return any(k.startswith("sam_mask_decoder.") for k in state)


def official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official SAM 2 / 2.1 checkpoint's state dict -> :class:`Sam2Model` keys (video-memory
    weights dropped)."""
    out: dict[str, torch.Tensor] = {}
    skipped = 0
    for k, v in state.items():
        if k.startswith(_VIDEO_ONLY):
            skipped += 1
            continue
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    logger.info("SAM 2 checkpoint: %d image tensors kept, %d video-memory tensors skipped",
                len(out), skipped)
    return out


def config_for_state(state: Mapping[str, torch.Tensor]) -> str:
    """The registry name whose Hiera width and depth match an (official or our) state dict."""
    prefix = "image_encoder.trunk."
    width = state[f"{prefix}patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[3] for k in state if k.startswith(f"{prefix}blocks.")})
    for name, cfg in SAM2_CONFIGS.items():
        if cfg.embed_dim == width and sum(cfg.stages) == depth:
            return name
    raise ValueError(f"no SAM 2 config has a Hiera of width {width} and depth {depth}; "
                     f"known: {sorted(SAM2_CONFIGS)}")


def load_sam2_weights(model: Sam2Model, state: Mapping[str, torch.Tensor]) -> Sam2Model:
    """Load ours or an official state dict strictly (a ValueError naming the config when a key
    or a shape does not fit)."""
    from dataengine.models.checkpoint import load_state

    if is_official_state(state):
        state = official_state_dict(state)
    return load_state(model, state, f"SAM 2 checkpoint does not fit config "
                                    f"{model.sam_config.name!r}")
