"""SAM registry and builder, from Meta's ``segment_anything`` classes.

One registry of named configs (as ``segment_anything.build_sam``): the published ``vit_b``,
``vit_l``, ``vit_h`` (1024 px, load Meta's official ``.pth`` checkpoints) and small configs
``tiny`` (the 3.8M-parameter model of ``../shared/findings/``: ViT at 256 px, patch 16, embed 192,
depth 6, 4 heads, window 8, global attention at 2 layers, 128-d prompt/decoder) and
``tiny-test`` (128 px, for unit tests). Every config builds the real ``Sam`` /
``ImageEncoderViT`` / ``PromptEncoder`` / ``MaskDecoder`` classes, so Meta's ``SamPredictor``
and ``SamAutomaticMaskGenerator`` work on every model unchanged. The same builder makes the SAM 2
image models (``sam2_hiera_t`` / ``_s`` / ``_b+`` / ``_l``, ``sam2-tiny-test``) of
:mod:`dataengine.models.sam2`, which keep ``Sam``'s interface (:data:`MODEL_NAMES` lists all).

:func:`build_sam` takes a state dict or a local checkpoint (official ``.pth`` read with
``weights_only=True``, ``.safetensors``, or a saved model directory); versions on any fsspec URL
are saved and loaded by :mod:`dataengine.pipeline.core.checkpoints`. The device is chosen at run
time (:mod:`dataengine.models.device`). :func:`export_onnx_decoder` exports the prompt encoder +
mask decoder as Meta's ``scripts/export_onnx_model.py`` does (``SamOnnxModel``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)

from dataengine.models.checkpoint import as_state_dict, load_state
from dataengine.models.device import pick_device
from dataengine.models.sam2 import (SAM2_CONFIGS, Sam2Config, build_sam2, get_sam2_config,
                                    is_sam2_config, load_sam2_weights)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamConfig:
    """Architecture of one SAM model (every field maps onto a ``segment_anything`` argument)."""

    name: str = "tiny"
    image_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 192
    encoder_depth: int = 6
    encoder_num_heads: int = 4
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5)
    window_size: int = 8
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 128   # = encoder out_chans = decoder transformer dim
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 512
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 128
    num_multimask_outputs: int = 3
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    encoder: str = "vit"          # vit (ImageEncoderViT) | conv (models.sam_small, hybrid CNN)
    #                               | hq (dataengine.models.sam_hq: conv + FPN, high-res fusion)
    hq_channels: int = 0          # hq: 1/4-resolution feature channels packed in the embedding
    hq_dim: int = 32              # hq: channels of the decoder's 1/4-resolution fusion map
    hq_refine_levels: int = 0     # hq: levels of the decoder's per-prompt U-Net (0 = none)
    hq_rgb: bool = False          # hq: 3 of the hq channels are the input colours (not learnt)
    hq_proto: bool = False        # hq: decoder compares each pixel with the prompted region

    def __post_init__(self) -> None:
        if self.encoder not in ("vit", "conv", "hq"):
            raise ValueError(f"encoder={self.encoder!r}: one of ['vit', 'conv', 'hq']")
        if (self.encoder == "hq") != (self.hq_channels > 0):
            raise ValueError(f"hq_channels={self.hq_channels}: > 0 exactly when encoder='hq'")
        object.__setattr__(self, "encoder_global_attn_indexes",
                           tuple(int(i) for i in self.encoder_global_attn_indexes))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_num_heads={self.encoder_num_heads}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"encoder_global_attn_indexes={bad} outside depth "
                             f"{self.encoder_depth}")
        if (self.prompt_embed_dim // 2) % self.decoder_num_heads:
            raise ValueError(f"prompt_embed_dim/2={self.prompt_embed_dim // 2} must be divisible "
                             f"by decoder_num_heads={self.decoder_num_heads}")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (``image_size / patch_size``)."""
        return self.image_size // self.patch_size

    @property
    def embedding_channels(self) -> int:
        """Channels of the (cached) image embedding: ``prompt_embed_dim``, plus the packed
        1/4-resolution features of an ``hq`` model."""
        return self.prompt_embed_dim + 16 * self.hq_channels

    @property
    def low_res_size(self) -> int:
        """Side of the low-res mask logits (``4 x embedding_size``)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"SAM config: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


def _published(name: str, dim: int, depth: int, heads: int, glob: tuple[int, ...]) -> SamConfig:
    return SamConfig(name=name, image_size=1024, patch_size=16, encoder_embed_dim=dim,
                     encoder_depth=depth, encoder_num_heads=heads,
                     encoder_global_attn_indexes=glob, window_size=14, prompt_embed_dim=256,
                     decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256)


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_h": _published("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": _published("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": _published("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamConfig(),
    "tiny-test": SamConfig(name="tiny-test", image_size=128, encoder_embed_dim=64,
                           encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                           window_size=4, prompt_embed_dim=64, decoder_mlp_dim=128,
                           decoder_num_heads=4, iou_head_hidden_dim=64),
    # dataengine.models.sam_small: hybrid conv encoder (3 conv stages + 2 global attention blocks at
    # 1/16)
    "tiny-conv": SamConfig(name="tiny-conv", encoder="conv", encoder_depth=2,
                           encoder_global_attn_indexes=(0, 1)),
    # dataengine.models.sam_hq: conv encoder + FPN whose 1/4-resolution map (and the input
    # colours) is packed into the one embedding tensor, decoder fusing it with the raw mask prompt
    "tiny-hq": SamConfig(name="tiny-hq", encoder="hq", encoder_embed_dim=160, encoder_depth=2,
                         encoder_global_attn_indexes=(0, 1), hq_channels=32, hq_dim=32,
                         hq_rgb=True),
    # tiny-hq + prototype matching in the decoder (each pixel compared with the prompted region)
    "tiny-hq-match": SamConfig(name="tiny-hq-match", encoder="hq", encoder_embed_dim=160,
                               encoder_depth=2, encoder_global_attn_indexes=(0, 1),
                               hq_channels=32, hq_dim=32, hq_rgb=True, hq_proto=True),
    # tiny-hq-match + a per-prompt U-Net over the fused 1/4-resolution map
    "tiny-hq-proto": SamConfig(name="tiny-hq-proto", encoder="hq", encoder_embed_dim=160,
                               encoder_depth=2, encoder_global_attn_indexes=(0, 1),
                               hq_channels=32, hq_dim=32, hq_refine_levels=3, hq_rgb=True,
                               hq_proto=True),
    "tiny-hq-test": SamConfig(name="tiny-hq-test", encoder="hq", image_size=128,
                              encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                              encoder_global_attn_indexes=(0,), prompt_embed_dim=64,
                              decoder_mlp_dim=128, decoder_num_heads=4, iou_head_hidden_dim=64,
                              hq_channels=8, hq_dim=16, hq_refine_levels=1, hq_rgb=True,
                              hq_proto=True),
    "tiny-conv-test": SamConfig(name="tiny-conv-test", encoder="conv", image_size=128,
                                encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                                encoder_global_attn_indexes=(0,), prompt_embed_dim=64,
                                decoder_mlp_dim=128, decoder_num_heads=4,
                                iou_head_hidden_dim=64),
}


# every buildable name: SAM v1 configs and the SAM 2 image models (dataengine.models.sam2)
MODEL_NAMES: tuple[str, ...] = (*SAM_CONFIGS, *SAM2_CONFIGS)


def get_config(config: str | SamConfig | Sam2Config | dict[str, Any]) -> SamConfig | Sam2Config:
    """A registry name, a dict (e.g. a ``config.json``) or a config -> :class:`SamConfig`, or
    :class:`dataengine.models.sam2.Sam2Config` for the SAM 2 names and dicts."""
    if isinstance(config, SamConfig):
        return config
    if is_sam2_config(config):
        return get_sam2_config(config)
    if isinstance(config, dict):
        return SamConfig.from_dict(config)
    if config not in SAM_CONFIGS:
        raise ValueError(f"SAM config {config!r} is unknown; allowed: {sorted(MODEL_NAMES)}")
    return SAM_CONFIGS[config]


def config_of(model: Sam) -> SamConfig | Sam2Config:
    """The :class:`SamConfig` a model was built from (attribute set by :func:`build_sam`)."""
    cfg = getattr(model, "sam_config", None)
    if cfg is None:
        raise ValueError("model was not built by dataengine.models.sam.build_sam "
                         "(no sam_config attribute)")
    return cfg


def decoder_args(cfg: SamConfig) -> dict[str, Any]:
    """``MaskDecoder`` keyword arguments of ``cfg`` (its two-way transformer included)."""
    return {"num_multimask_outputs": cfg.num_multimask_outputs,
            "transformer": TwoWayTransformer(depth=cfg.decoder_depth,
                                             embedding_dim=cfg.prompt_embed_dim,
                                             mlp_dim=cfg.decoder_mlp_dim,
                                             num_heads=cfg.decoder_num_heads),
            "transformer_dim": cfg.prompt_embed_dim, "iou_head_depth": cfg.iou_head_depth,
            "iou_head_hidden_dim": cfg.iou_head_hidden_dim}


def build_sam(config: str | SamConfig | dict[str, Any] = "tiny",
              checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
              *, seed: int | None = 0, device: str | torch.device | None = None) -> Sam:
    """Build a SAM model in eval mode; random init (deterministic for ``seed``) or a checkpoint.

    ``checkpoint`` is a state dict, or a local official ``.pth`` file, ``.safetensors`` file or
    saved model directory (URLs: :func:`dataengine.pipeline.core.checkpoints.load_sam`).
    """
    cfg = get_config(config)
    if isinstance(cfg, Sam2Config):
        state = None if checkpoint is None else as_state_dict(checkpoint)
        return build_sam2(cfg, state, seed=seed).to(pick_device(device))
    emb = cfg.embedding_size
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if cfg.encoder == "hq":
            from dataengine.models.sam_hq import build_hq_parts

            image_encoder, prompt_encoder, mask_decoder = build_hq_parts(cfg)
        elif cfg.encoder != "vit":
            from dataengine.models.sam_small import build_encoder

            image_encoder = build_encoder(cfg)
        else:
            image_encoder = ImageEncoderViT(
                depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim,
                img_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=cfg.encoder_num_heads, patch_size=cfg.patch_size, qkv_bias=True,
                use_rel_pos=True, global_attn_indexes=cfg.encoder_global_attn_indexes,
                window_size=cfg.window_size, out_chans=cfg.prompt_embed_dim)
        if cfg.encoder != "hq":
            prompt_encoder = PromptEncoder(
                embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
                input_image_size=(cfg.image_size, cfg.image_size),
                mask_in_chans=cfg.mask_in_chans)
            mask_decoder = MaskDecoder(**decoder_args(cfg))
        sam = Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder,
                  mask_decoder=mask_decoder, pixel_mean=list(cfg.pixel_mean),
                  pixel_std=list(cfg.pixel_std))
    sam.sam_config = cfg  # type: ignore[attr-defined]
    sam.eval()
    if checkpoint is not None:
        load_weights(sam, checkpoint)
    return sam.to(pick_device(device))


# registry in segment_anything's style: sam_model_registry["vit_b"](checkpoint=...)
sam_model_registry = {name: partial(build_sam, name) for name in MODEL_NAMES}
sam_model_registry["default"] = sam_model_registry["vit_h"]


def load_weights(model: Sam, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> Sam:
    """Load a state dict or a local checkpoint into ``model`` (strict, with a clear error)."""
    where = "a state dict" if isinstance(checkpoint, Mapping) else repr(str(checkpoint))
    if isinstance(config_of(model), Sam2Config):
        return load_sam2_weights(model, as_state_dict(checkpoint))
    return load_state(model, as_state_dict(checkpoint),
                      f"SAM checkpoint {where} does not fit config {config_of(model).name!r}")


@dataclass
class OnnxExport:
    """What :func:`export_onnx_decoder` wrote: the path and the input shapes it expects."""

    path: str
    embed_dim: int
    embed_size: int
    mask_input_size: int
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


def export_onnx_decoder(model: Sam, path: str, *, opset: int = 17,
                        return_single_mask: bool = True, use_stability_score: bool = False,
                        return_extra_metrics: bool = False, upscale: bool = True) -> OnnxExport:
    """Export prompt encoder + mask decoder to ONNX (a local file) like Meta's export script.

    Inputs: ``image_embeddings`` 1xCxSxS float32, ``point_coords`` 1xNx2 (input-frame xy,
    N dynamic), ``point_labels`` 1xN, ``mask_input`` 1x1x4Sx4S, ``has_mask_input`` (1,),
    ``orig_im_size`` (2,) float32 [H, W]. Outputs ``masks`` (logits at the original size),
    ``iou_predictions``, ``low_res_masks``. With ``upscale=False`` the graph stops at the
    low-res logits (outputs ``iou_predictions``, ``low_res_masks``; no ``orig_im_size`` input),
    so a caller upsamples only the masks it keeps (:func:`upscale_logits`).
    """
    import warnings

    from segment_anything.utils.onnx import SamOnnxModel

    cfg = config_of(model)
    cpu_model = build_sam(cfg, seed=None, device="cpu")
    cpu_model.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    cls = SamOnnxModel if upscale else _LowResOnnxModel
    onnx_model = cls(cpu_model, return_single_mask=return_single_mask,
                     use_stability_score=use_stability_score,
                     return_extra_metrics=return_extra_metrics)
    s, c, m = cfg.embedding_size, cfg.embedding_channels, cfg.low_res_size
    dummy = {
        "image_embeddings": torch.randn(1, c, s, s, dtype=torch.float),
        "point_coords": torch.randint(0, cfg.image_size, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, m, m, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([480, 640], dtype=torch.float),
    }
    output_names = ["masks", "iou_predictions", "low_res_masks"]
    if not upscale:
        dummy.pop("orig_im_size")
        output_names = ["iou_predictions", "low_res_masks"]
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(onnx_model, tuple(dummy.values()), path, export_params=True,
                          verbose=False, opset_version=opset, do_constant_folding=True,
                          input_names=list(dummy), output_names=output_names,
                          dynamic_axes=dynamic_axes, dynamo=False)
    logger.info("exported SAM decoder (%s) to %s", cfg.name, path)
    return OnnxExport(path=path, embed_dim=c, embed_size=s, mask_input_size=m,
                      input_names=list(dummy), output_names=output_names)


def predict_masks_per_pixel(decoder: Any, image_embeddings: torch.Tensor,
                            image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                            few_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with its output upscaling written as per-pixel matrix
    products (same result): both transposed convolutions have kernel 2 and stride 2, so each
    embedding pixel maps to its own 4x4 block of the low-res mask through two matmuls, a
    layer norm and GELUs, and only the final Bx(masks)xSxS logits are put in spatial order.
    ONNX Runtime runs matmuls much faster than ``ConvTranspose`` (natively and in wasm).

    With ``few_tokens`` (one image, one prompt set) the transformer is
    :func:`few_token_transformer`.

    Returns masks Bx(num mask tokens)x4Hx4W and IoU predictions Bx(num mask tokens).
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    if few_tokens:  # one prompt set per image: no copies of the embedding
        src = image_embeddings + dense
        transformer = partial(few_token_transformer, decoder.transformer)
    else:
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) + dense
        image_pe = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        transformer = decoder.transformer
    b, c, h, w = src.shape
    hs, src = transformer(src, image_pe, tokens)                 # src: B x hw x c
    n = decoder.num_mask_tokens
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    c1, c2 = conv1.out_channels, conv2.out_channels
    # ConvTranspose weight Cin x Cout x 2 x 2 -> Cin x (2 x 2 x Cout): the 2x2 offsets first
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
    x = (src @ w1).reshape(b, h * w * 4, c1) + conv1.bias
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    x = act1((x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    x = act2((x @ w2).reshape(b, h * w * 16, c2) + conv2.bias)  # pixel order (i, j, a, b, a2, b2)
    mask_tokens = hs[:, 1:1 + n, :]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens[:, i, :])
                            for i in range(n)], dim=1)          # B x n x c2
    masks = hyper_in @ x.transpose(1, 2)                        # B x n x (h w 2 2 2 2)
    masks = masks.reshape(b, n, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    masks = masks.reshape(b, n, 4 * h, 4 * w)                   # row = 4i + 2a + a2
    return masks, decoder.iou_prediction_head(hs[:, 0, :])


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """B x T x D -> B x heads x T x D/heads."""
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n).transpose(1, 2)


def _token_to_image(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> torch.Tensor:
    """``Attention(q=tokens, k=image, v=image)`` with the image-side projections moved onto the
    few tokens: q.(Wk k + bk) = (Wk^T q).k + q.bk, and as each attention row sums to one,
    A (Wv v + bv) = Wv (A v) + bv. Two B x (heads*T) x N x C products replace two N x C x D
    projections of the image."""
    n = attn.num_heads
    qh = _heads(attn.q_proj(q), n)                                   # B x n x T x d
    b, _, t, d = qh.shape
    wk = attn.k_proj.weight.reshape(n, d, -1)                        # n x d x C
    qk = torch.einsum("bhtd,hdc->bhtc", qh, wk).reshape(b, n * t, -1)
    bias = torch.einsum("bhtd,hd->bht", qh, attn.k_proj.bias.reshape(n, d))
    scores = (qk @ k.transpose(1, 2)).reshape(b, n, t, -1) + bias.unsqueeze(-1)
    a = torch.softmax(scores / math.sqrt(d), dim=-1).reshape(b, n * t, -1)
    av = (a @ v).reshape(b, n, t, -1)                                # B x n x T x C
    wv = attn.v_proj.weight.reshape(n, d, -1)
    out = torch.einsum("bhtc,hdc->bhtd", av, wv) + attn.v_proj.bias.reshape(n, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, n * d))


def _image_to_token(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> torch.Tensor:
    """``Attention(q=image, k=tokens, v=tokens)`` with the image-side projections moved onto
    the few tokens: (Wq q + bq).k = q.(Wq^T k) + bq.k, and the output projection applied to
    each token's values before the attention mixes them."""
    n = attn.num_heads
    kh = _heads(attn.k_proj(k), n)                                   # B x n x T x d
    vh = _heads(attn.v_proj(v), n)
    b, _, t, d = kh.shape
    wq = attn.q_proj.weight.reshape(n, d, -1)                        # n x d x C
    kq = torch.einsum("bhtd,hdc->bhtc", kh, wq).reshape(b, n * t, -1)
    bias = torch.einsum("bhtd,hd->bht", kh, attn.q_proj.bias.reshape(n, d)).reshape(b, 1, n * t)
    scores = (q @ kq.transpose(1, 2) + bias).reshape(b, -1, n, t)   # B x N x n x T
    a = torch.softmax(scores / math.sqrt(d), dim=-1).reshape(b, -1, n * t)
    wo = attn.out_proj.weight.reshape(-1, n, d)                      # C x n x d
    vo = torch.einsum("bhtd,chd->bhtc", vh, wo).reshape(b, n * t, -1)
    return a @ vo + attn.out_proj.bias


def few_token_transformer(transformer: Any, image_embedding: torch.Tensor,
                          image_pe: torch.Tensor, point_embedding: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer`` for one prompt set of a few tokens (T: the output tokens and
    the prompts), the same function computed in another order: every product with the image's
    N = 64x64 positions is N x C x (heads*T) instead of N x C x C/2, which for T up to a
    dozen roughly halves the decoder's work (the click path's cost)."""
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + point_embedding
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        k = keys + key_pe
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image,
                                                        queries + point_embedding, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, k,
                                                  queries + point_embedding, queries))
    queries = queries + _token_to_image(transformer.final_attn_token_to_image,
                                        queries + point_embedding, keys + key_pe, keys)
    return transformer.norm_final_attn(queries), keys


class _LowResOnnxModel(torch.nn.Module):
    """Meta's ``SamOnnxModel`` without the upsampling to the original size."""

    def __init__(self, model: Sam, **kw: Any) -> None:
        from segment_anything.utils.onnx import SamOnnxModel

        super().__init__()
        self.inner = SamOnnxModel(model, **kw)

    @torch.no_grad()
    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.inner
        sparse = m._embed_points(point_coords, point_labels)
        dense = m._embed_masks(mask_input, has_mask_input)
        masks, scores = predict_masks_per_pixel(
            m.model.mask_decoder, image_embeddings, m.model.prompt_encoder.get_dense_pe(),
            sparse, dense, few_tokens=True)
        if m.use_stability_score:
            from segment_anything.utils.amg import calculate_stability_score

            scores = calculate_stability_score(masks, m.model.mask_threshold,
                                               m.stability_score_offset)
        if m.return_single_mask:
            masks, scores = m.select_masks(masks, scores, point_coords.shape[1])
        return scores, masks


def upscale_logits(low_res: np.ndarray, input_size: tuple[int, int],
                   original_size: tuple[int, int], img_size: int) -> np.ndarray:
    """SxS low-res logits -> HxW logits at the original size, as ``Sam.postprocess_masks``
    does (bilinear to the padded input frame, crop, bilinear to the original size), with
    OpenCV on one mask at a time."""
    import cv2

    up = cv2.resize(np.ascontiguousarray(low_res, np.float32), (img_size, img_size),
                    interpolation=cv2.INTER_LINEAR)
    up = up[:input_size[0], :input_size[1]]
    return cv2.resize(up, (original_size[1], original_size[0]), interpolation=cv2.INTER_LINEAR)
