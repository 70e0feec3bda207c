"""Latent diffusion registry: diffusers ``AutoencoderKL`` + ``UNet2DConditionModel`` + schedulers,
and the conditioning encoder τθ.

One registry of named configs (as ``segment_anything.build_sam``) for each part:

- VAE (:data:`VAE_CONFIGS`): ``sd-kl-f8`` (Stable Diffusion's KL-f8 autoencoder; load a user's
  weights from a local diffusers folder or a diffusers-layout ``.safetensors`` with
  :func:`load_vae`), ``tiny-f4`` (f=4: 64 px images -> 16x16x4 latents) and ``test-f4`` (smaller,
  unit tests).
- U-Net (:data:`UNET_CONFIGS`): ``sd-v1`` (Stable Diffusion 1.x layout), ``tiny`` (two levels,
  cross-attention in the first), ``test``.
- Text encoder (:data:`TEXT_CONFIGS`): a small transformers ``CLIPTextModel`` trained from scratch
  with the U-Net (τθ of the LDM paper).

Conditioning (:class:`LdmSpec`), as in Rombach et al. 2022:

- **class labels** and **captions** go through one token sequence into cross-attention: every
  category is a special token ``<cN>`` (N = corpus category id) with its own learned embedding,
  followed by the caption's word pieces. The tokenizer is a ``tokenizers`` WordPiece trained
  offline on the corpus captions (:func:`train_tokenizer`) and saved with the model; the
  conditioning string is built by :func:`prompt_for`.
- **layout** (mask-to-image synthesis): a category label map at latent size (uint8: 0 background,
  1..254 category id, 255 object of unknown category) enters the U-Net by concatenation, coded
  as :data:`LAYOUT_BITS` binary planes (:func:`layout_planes`) — a compact stand-in for the
  paper's one-hot maps that needs no fixed category count.
- **unconditional**: the empty prompt and an empty layout. Classifier-free guidance drops the
  conditioning with probability ``p_uncond`` (0.1) in training (:func:`drop_conditions`) and
  mixes both predictions at sampling (:func:`ddim_sample`).

Shapes: images ``Bx3xHxW`` float in [-1, 1]; latents ``Bx4x(H/f)x(W/f)`` already multiplied by
the VAE's ``scaling_factor``; token ids ``BxT`` int64; text states ``BxTxD``.

:func:`export_pipeline` writes a diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``);
a model without layout runs in ``StableDiffusionPipeline`` as is, a layout model runs in
:class:`LayoutDiffusionPipeline` (a ``StableDiffusionPipeline`` that also takes ``layout=``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

LAYOUT_BITS = 8
CONDITIONS = ("class", "caption", "layout")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-kl-f8": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                     block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                     down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                     scaling_factor=0.18215),
    "tiny-f4": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                    block_out_channels=(32, 64, 64), norm_num_groups=16,
                    down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
                    mid_block_add_attention=False, scaling_factor=1.0),
    "test-f4": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                    block_out_channels=(16, 32, 32), norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
                    mid_block_add_attention=False, scaling_factor=1.0),
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-v1": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                  attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "tiny": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=8,
                 norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "test": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}

TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-v1": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32),
    "test": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, max_position_embeddings=16),
}


@dataclass
class LdmSpec:
    """What one latent diffusion model is: its parts, conditioning and noise schedule."""

    unet: str = "tiny"
    text: str = "tiny"
    conditions: list[str] = field(default_factory=lambda: ["class", "caption", "layout"])
    latent_channels: int = 4
    latent_size: int = 16
    p_uncond: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    categories: dict[str, str] = field(default_factory=dict)   # id (str) -> name
    unet_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unet not in UNET_CONFIGS:
            raise ValueError(f"unet={self.unet!r}: one of {sorted(UNET_CONFIGS)}")
        if self.text not in TEXT_CONFIGS:
            raise ValueError(f"text={self.text!r}: one of {sorted(TEXT_CONFIGS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"conditions={self.conditions}: {bad} not in {CONDITIONS}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond={self.p_uncond}: must be in [0, 1)")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: linear or scaled_linear")
        if self.latent_size < 4:
            raise ValueError(f"latent_size={self.latent_size}: must be >= 4")

    @property
    def uses_layout(self) -> bool:
        return "layout" in self.conditions

    @property
    def max_tokens(self) -> int:
        return int(TEXT_CONFIGS[self.text]["max_position_embeddings"])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LdmSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pick_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------ VAE
def build_vae(name: str = "tiny-f4", **overrides: Any):
    """A diffusers ``AutoencoderKL`` from registry config ``name`` with random weights."""
    from diffusers import AutoencoderKL

    if name not in VAE_CONFIGS:
        raise ValueError(f"vae config {name!r}: one of {sorted(VAE_CONFIGS)}")
    return AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})


def vae_factor(vae) -> int:
    """Spatial downsampling factor f of an ``AutoencoderKL`` (2 ** (levels - 1))."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae(path: str, config: str | None = None):
    """Load an ``AutoencoderKL`` from a local diffusers folder (``config.json`` + weights, or a
    pipeline folder with ``vae/``) or from a diffusers-layout ``.safetensors`` file together with
    registry config ``config`` (e.g. ``sd-kl-f8``)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "vae", "config.json")):
            path = os.path.join(path, "vae")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json "
                                    "(not a diffusers AutoencoderKL folder)")
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    if path.endswith(".safetensors") and os.path.isfile(path):
        if not config:
            raise ValueError(f"{path}: a .safetensors file needs a registry config name "
                             f"(one of {sorted(VAE_CONFIGS)})")
        vae = build_vae(config)
        state = load_file(path)
        state = {k.removeprefix("vae."): v for k, v in state.items()}
        try:
            missing, unexpected = vae.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{path}: weights do not fit config {config!r} (missing or "
                             f"mismatched): {str(exc)[:300]}") from exc
        if missing:
            raise ValueError(f"{path}: {len(missing)} weights missing for config {config!r} "
                             f"(e.g. {missing[:3]}); is it in diffusers layout?")
        if unexpected:
            logger.warning("%s: %d unexpected keys ignored", path, len(unexpected))
        return vae
    raise FileNotFoundError(f"VAE {path!r}: not a diffusers folder or a .safetensors file")


def encode_images(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Bx3xHxW`` in [-1, 1] -> (mean, logvar), each ``BxCxhxw`` float32, unscaled."""
    dist = vae.encode(images).latent_dist
    return dist.mean.float(), dist.logvar.float()


def decode_latents(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> images ``Bx3xHxW`` in [-1, 1]."""
    return vae.decode(latents / scale).sample.clamp(-1, 1)


# ---------------------------------------------------------------------------- tokenizer
def category_token(cat_id: int) -> str:
    """The special token of category ``cat_id``: ``<c17>``."""
    return f"<c{int(cat_id)}>"


def train_tokenizer(captions: Iterable[str], category_ids: Iterable[int], *,
                    vocab_size: int = 2000, max_length: int = 32):
    """A WordPiece tokenizer trained offline on ``captions`` with one special token per
    category; returns a transformers fast tokenizer (``save_pretrained``-able)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cats = [category_token(c) for c in sorted({int(c) for c in category_ids})]
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + cats,
                                        min_frequency=1)
    corpus = [c for c in captions if c] or ["a photo"]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")),
                                              ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)


def load_tokenizer(path: str):
    """A tokenizer saved by :func:`train_tokenizer` (``save_pretrained`` folder)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def tokenizer_to_json(tokenizer) -> str:
    """The tokenizer as one JSON string (``tokenizers`` format), for checkpoints and configs."""
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_from_json(data: str, max_length: int):
    """Inverse of :func:`tokenizer_to_json`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data), pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_length)


def prompt_for(spec: LdmSpec, class_ids: Sequence[int] = (), caption: str = "") -> str:
    """The conditioning string: category tokens, then the caption (parts the spec uses)."""
    parts: list[str] = []
    if "class" in spec.conditions:
        parts += [category_token(c) for c in sorted({int(c) for c in class_ids})]
    if "caption" in spec.conditions and caption:
        parts.append(caption)
    return " ".join(parts)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """``B`` prompts -> ``BxT`` int64 token ids (padded / truncated to ``max_length``)."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


# ------------------------------------------------------------------------- text encoder
def build_text_encoder(name: str, tokenizer):
    """τθ: a small transformers ``CLIPTextModel`` (random init) over ``tokenizer``'s vocab."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in TEXT_CONFIGS:
        raise ValueError(f"text config {name!r}: one of {sorted(TEXT_CONFIGS)}")
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TEXT_CONFIGS[name])
    return CLIPTextModel(cfg)


def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """``BxT`` token ids -> ``BxTxD`` hidden states for cross-attention."""
    return text_encoder(ids)[0]


# ---------------------------------------------------------------------------------- U-Net
def build_unet(spec: LdmSpec):
    """The ``UNet2DConditionModel`` of ``spec`` (random init): latent (+ layout planes) in,
    ε out, cross-attention width = the text encoder's width."""
    from diffusers import UNet2DConditionModel

    cfg = dict(UNET_CONFIGS[spec.unet])
    cfg.update(sample_size=spec.latent_size, out_channels=spec.latent_channels,
               in_channels=spec.latent_channels + (LAYOUT_BITS if spec.uses_layout else 0),
               cross_attention_dim=int(TEXT_CONFIGS[spec.text]["hidden_size"]))
    cfg.update(spec.unet_overrides)
    return UNet2DConditionModel(**cfg)


def build_noise_scheduler(spec: LdmSpec):
    """DDPM scheduler with the spec's β schedule (training)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_start=spec.beta_start,
                         beta_end=spec.beta_end, beta_schedule=spec.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def build_ddim_scheduler(spec: LdmSpec):
    """DDIM scheduler with the spec's β schedule (sampling)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_start=spec.beta_start,
                         beta_end=spec.beta_end, beta_schedule=spec.beta_schedule,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


# ---------------------------------------------------------------------------------- layout
def layout_planes(layout: torch.Tensor) -> torch.Tensor:
    """``Bxhxw`` uint8 label map -> ``BxLAYOUT_BITSxhxw`` float planes in {-1, 0, 1}: the
    binary code of each label, zero where the label is 0 (background / dropped)."""
    lab = layout.long()
    bits = torch.stack([(lab >> i) & 1 for i in range(LAYOUT_BITS)], dim=1).float()
    return (bits * 2 - 1) * (lab > 0).unsqueeze(1).float()


def unet_input(spec: LdmSpec, latents: torch.Tensor, layout: torch.Tensor | None) -> torch.Tensor:
    """Latents with the layout planes concatenated when the spec uses layout."""
    if not spec.uses_layout:
        return latents
    if layout is None:
        layout = torch.zeros(latents.shape[0], *latents.shape[2:], dtype=torch.uint8,
                             device=latents.device)
    return torch.cat([latents, layout_planes(layout).to(latents)], dim=1)


def drop_conditions(ids: torch.Tensor, layout: torch.Tensor | None, null_ids: torch.Tensor,
                    p: float, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classifier-free guidance training: replace each sample's tokens (and layout) by the
    unconditional ones with probability ``p``."""
    drop = torch.rand(ids.shape[0], generator=generator) < p
    ids = torch.where(drop[:, None], null_ids.to(ids)[None].expand_as(ids), ids)
    if layout is not None:
        layout = torch.where(drop[:, None, None], torch.zeros_like(layout), layout)
    return ids, layout


# ---------------------------------------------------------------------------------- model
class LatentDiffusion(torch.nn.Module):
    """τθ + ε-model in one module (what Ray Train wraps in DDP)."""

    def __init__(self, spec: LdmSpec, tokenizer) -> None:
        super().__init__()
        self.spec = spec
        self.unet = build_unet(spec)
        self.text_encoder = build_text_encoder(spec.text, tokenizer)
        self.register_buffer("null_ids", tokenize(tokenizer, [""], spec.max_tokens)[0],
                             persistent=False)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        """ε prediction ``BxCxhxw`` for scaled noisy latents at timesteps ``t`` (``B`` int64)."""
        states = encode_text(self.text_encoder, ids)
        x = unet_input(self.spec, noisy, layout)
        return self.unet(x, t, encoder_hidden_states=states).sample


def diffusion_loss(model: torch.nn.Module, latents: torch.Tensor, ids: torch.Tensor,
                   layout: torch.Tensor | None, scheduler, *, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """LDM eq. (2): E ||ε - εθ(z_t, t, τθ(y))||² with t uniform and ε ~ N(0, I)."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = model(noisy, timesteps, ids, layout)
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


@torch.no_grad()
def ddim_sample(model: LatentDiffusion, ids: torch.Tensor, layout: torch.Tensor | None, *,
                steps: int = 50, guidance: float = 1.0, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance (``guidance`` 1 = plain conditional);
    returns scaled latents ``BxCxhxw``."""
    spec = model.spec
    sched = build_ddim_scheduler(spec)
    sched.set_timesteps(steps)
    device = next(model.parameters()).device
    b = ids.shape[0]
    x = torch.randn((b, spec.latent_channels, spec.latent_size, spec.latent_size),
                    generator=generator).to(device)
    ids = ids.to(device)
    cond = encode_text(model.text_encoder, ids)
    uncond = encode_text(model.text_encoder, model.null_ids[None].expand_as(ids).to(device))
    lay = layout.to(device) if layout is not None else None
    empty = torch.zeros_like(lay) if lay is not None else None
    for t in sched.timesteps:
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        if guidance == 1.0:
            eps = model.unet(unet_input(spec, x, lay), tt, encoder_hidden_states=cond).sample
        else:
            xin = torch.cat([unet_input(spec, x, empty), unet_input(spec, x, lay)])
            e = model.unet(xin, torch.cat([tt, tt]),
                           encoder_hidden_states=torch.cat([uncond, cond])).sample
            eu, ec = e.chunk(2)
            eps = eu + guidance * (ec - eu)
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, step: int,
               decay: float = 0.999) -> None:
    """EMA of ``source``'s weights into ``target`` (same architecture), with diffusers-style
    warm-up: decay = min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if v.dtype.is_floating_point:
            v.mul_(d).add_(src[k].detach().to(v.dtype), alpha=1 - d)
        else:
            v.copy_(src[k])


# ------------------------------------------------------------------------------ grid / I/O
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``Bx3xHxW`` in [-1, 1] -> ``BxHxWx3`` uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_png(rows: Sequence[np.ndarray], pad: int = 2) -> bytes:
    """Rows of ``NxHxWx3`` uint8 images -> one PNG (bytes)."""
    from PIL import Image

    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def export_pipeline(out_dir: str, model: LatentDiffusion, vae, tokenizer) -> str:
    """Write a diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``) plus our
    ``ldm_spec.json``; returns ``out_dir``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoder, tokenizer=tokenizer,
                                   unet=model.unet, scheduler=build_ddim_scheduler(model.spec),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "ldm_spec.json"), "w") as f:
        json.dump(model.spec.to_json(), f, indent=1)
    return out_dir


def load_exported(path: str) -> tuple[LatentDiffusion, Any, Any]:
    """(model, vae, tokenizer) from an :func:`export_pipeline` folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with open(os.path.join(path, "ldm_spec.json")) as f:
        spec = LdmSpec.from_json(json.load(f))
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    model = LatentDiffusion(spec, tokenizer)
    model.unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"),
                                                      local_files_only=True)
    model.text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"),
                                                       local_files_only=True)
    return model, load_vae(os.path.join(path, "vae")), tokenizer


def _layout_pipeline_class():
    from diffusers import StableDiffusionPipeline

    class LayoutDiffusionPipeline(StableDiffusionPipeline):
        """``StableDiffusionPipeline`` whose U-Net also takes a layout map (``layout=``: ``hxw``
        or ``Bxhxw`` uint8 labels at latent size) by concatenation."""

        def __call__(self, prompt: str | list[str] = "", layout: Any = None,
                     num_inference_steps: int = 50, guidance_scale: float = 3.0,
                     generator: torch.Generator | None = None, output_type: str = "pil"):
            with open(os.path.join(self.config._name_or_path, "ldm_spec.json")) as f:
                spec = LdmSpec.from_json(json.load(f))
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            model = LatentDiffusion.__new__(LatentDiffusion)
            torch.nn.Module.__init__(model)
            model.spec, model.unet, model.text_encoder = spec, self.unet, self.text_encoder
            model.register_buffer("null_ids", tokenize(self.tokenizer, [""], spec.max_tokens)[0])
            ids = tokenize(self.tokenizer, prompts, spec.max_tokens)
            lay = None
            if layout is not None:
                lay = torch.as_tensor(np.asarray(layout, dtype=np.uint8))
                lay = lay[None].expand(len(prompts), -1, -1) if lay.ndim == 2 else lay
            z = ddim_sample(model, ids, lay, steps=num_inference_steps, guidance=guidance_scale,
                            generator=generator)
            images = decode_latents(self.vae, z, self.vae.config.scaling_factor)
            arr = to_uint8(images)
            if output_type == "np":
                return arr
            from PIL import Image
            return [Image.fromarray(a) for a in arr]

    return LayoutDiffusionPipeline


def __getattr__(name: str) -> Any:
    if name == "LayoutDiffusionPipeline":  # built lazily: diffusers pipelines import slowly
        cls = _layout_pipeline_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
