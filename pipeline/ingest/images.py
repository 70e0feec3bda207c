"""Decode, check, orient, resize and re-encode one image (Pillow); the same geometry for masks.

:func:`process_image` fully decodes the bytes (a truncated or corrupt file is an error), refuses
images over a pixel limit before decoding them (decompression bombs), applies the EXIF
orientation, converts to 8-bit RGB (CMYK, 16-bit, palette with transparency, grayscale, alpha
composited on white), optionally resizes like img2dataset (``none``, ``keep_ratio``: the longest
side becomes ``image_size``, ``center_crop``: the shortest side becomes ``image_size``, then a
centred square crop) and re-encodes (jpeg / webp / png at ``encode_quality``). When nothing
changes the original bytes pass through untouched.

:class:`Geometry` records what was done to the pixels so :func:`apply_to_mask` can bring a mask
drawn on the original file into the stored image's frame (same EXIF transpose, resize and crop).
Every rejection raises :class:`BadImage` with a reason a user can act on.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

RESIZE_MODES = ("none", "keep_ratio", "center_crop")
ENCODE_FORMATS = ("jpeg", "webp", "png")
PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
EXT = {"jpeg": "jpg", "webp": "webp", "png": "png"}
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImage(ValueError):
    """An input that cannot become a corpus image; ``str(exc)`` is the quarantine reason."""


@dataclass
class ImageConfig:
    """How images are checked, resized and encoded."""

    resize_mode: str = "none"
    image_size: int = 512
    resize_only_if_bigger: bool = True
    encode_format: str = "jpeg"
    encode_quality: int = 95
    max_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit
    reencode: bool = False  # re-encode even when nothing else changes

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: allowed {RESIZE_MODES}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format={self.encode_format!r}: allowed {ENCODE_FORMATS}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size={self.image_size!r}: must be an integer >= 8")
        if not isinstance(self.encode_quality, int) or not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality={self.encode_quality!r}: must be in 1..100")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels!r}: must be a positive integer")


@dataclass(frozen=True)
class Geometry:
    """Original file frame -> stored frame: EXIF orientation, resize target, crop box."""

    raw_size: tuple[int, int]                 # (w, h) of the pixels in the file
    orientation: int = 1                      # EXIF orientation applied (1 = none)
    resize_to: tuple[int, int] | None = None  # (w, h) after resize, in the upright frame
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) after resize

    @property
    def upright_size(self) -> tuple[int, int]:
        w, h = self.raw_size
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the stored image."""
        if self.crop is not None:
            return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]
        return self.resize_to or self.upright_size


@dataclass
class ProcessedImage:
    """The stored image: bytes, extension and sizes, plus how it was derived."""

    data: bytes
    ext: str
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str
    orig_mode: str
    passthrough: bool
    geometry: Geometry


def resize_plan(w: int, h: int, cfg: ImageConfig
                ) -> tuple[tuple[int, int] | None, tuple[int, int, int, int] | None]:
    """(resize target or None, crop box or None) for an upright ``w x h`` image."""
    if cfg.resize_mode == "none":
        return None, None
    size = cfg.image_size
    if cfg.resize_mode == "keep_ratio":
        s = size / max(w, h)
    else:
        s = size / min(w, h)
    if s > 1 and cfg.resize_only_if_bigger:
        s = 1.0
    target = (max(1, round(w * s)), max(1, round(h * s)))
    resize = None if target == (w, h) else target
    crop = None
    if cfg.resize_mode == "center_crop":
        nw, nh = target
        c = min(nw, nh, size)
        box = ((nw - c) // 2, (nh - c) // 2, (nw - c) // 2 + c, (nh - c) // 2 + c)
        crop = None if box == (0, 0, nw, nh) else box
    return resize, crop


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        elif mode == "I" and arr.max(initial=0) <= 255:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:  # 16-bit samples
            arr8 = (np.clip(arr, 0, 65535).astype(np.uint32) // 257).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is treated as "no orientation"
        return 1
    return value if value in ORIENTATION_OPS else 1


def _encode(im: Image.Image, cfg: ImageConfig) -> bytes:
    buf = io.BytesIO()
    if cfg.encode_format == "jpeg":
        im.save(buf, "JPEG", quality=cfg.encode_quality)
    elif cfg.encode_format == "webp":
        im.save(buf, "WEBP", quality=cfg.encode_quality)
    else:
        im.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def process_image(data: bytes, cfg: ImageConfig | None = None) -> ProcessedImage:
    """Check and convert one image file's bytes into the stored image (RGB, upright).

    Raises :class:`BadImage` (empty, not an image, over ``max_pixels``, truncated or corrupt).
    """
    cfg = cfg or ImageConfig()
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image: Pillow cannot identify the format") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure is bad input
        raise BadImage(f"cannot open image: {type(exc).__name__}: {exc}") from exc
    raw_w, raw_h = im.size
    if raw_w < 1 or raw_h < 1:
        raise BadImage(f"image has no pixels ({raw_w}x{raw_h})")
    if raw_w * raw_h > cfg.max_pixels:
        raise BadImage(f"decompression bomb: {raw_w}x{raw_h} = {raw_w * raw_h} pixels exceeds "
                       f"max_pixels={cfg.max_pixels}")
    fmt = im.format or ""
    orientation = _orientation(im)
    geometry = Geometry((raw_w, raw_h), orientation)
    up_w, up_h = geometry.upright_size
    resize, crop = resize_plan(up_w, up_h, cfg)
    if resize is not None and fmt == "JPEG":
        # Decode straight at a reduced DCT scale that is still >= the target (same result
        # quality: the final resize is from an image at least as large as the target).
        need = resize if orientation not in (5, 6, 7, 8) else (resize[1], resize[0])
        im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else None, need)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
        raise BadImage(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from exc
    orig_mode = im.mode
    unchanged = (orientation == 1 and resize is None and crop is None and orig_mode == "RGB"
                 and fmt in PASSTHROUGH_FORMATS and not cfg.reencode)
    if unchanged:
        return ProcessedImage(data, PASSTHROUGH_FORMATS[fmt], raw_w, raw_h, raw_w, raw_h, fmt,
                              orig_mode, True, Geometry((raw_w, raw_h)))
    try:
        rgb = _to_rgb(im)
        if orientation != 1:
            rgb = rgb.transpose(ORIENTATION_OPS[orientation])
        if resize is not None:
            rgb = rgb.resize(resize, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if crop is not None:
            rgb = rgb.crop(crop)
        out = _encode(rgb, cfg)
    except Exception as exc:  # noqa: BLE001 - e.g. an exotic mode Pillow cannot convert
        raise BadImage(f"cannot convert image ({fmt} {orig_mode}): {exc}") from exc
    geometry = Geometry((raw_w, raw_h), orientation, resize, crop)
    assert rgb.size == geometry.size, (rgb.size, geometry)
    return ProcessedImage(out, EXT[cfg.encode_format], rgb.size[0], rgb.size[1], up_w, up_h, fmt,
                          orig_mode, False, geometry)


def apply_to_mask(mask: np.ndarray, geometry: Geometry, *, upright: bool = False) -> np.ndarray:
    """Bring an ``HxW`` bool mask into the stored image's frame.

    The mask is in the file's raw pixel frame (COCO), or already upright when ``upright`` is
    True (YOLO labels, which are relative to the EXIF-rotated image).
    """
    expect = geometry.upright_size if upright else geometry.raw_size
    if (mask.shape[1], mask.shape[0]) != expect:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                         f"{expect[0]}x{expect[1]}")
    m = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    if not upright and geometry.orientation != 1:
        m = m.transpose(ORIENTATION_OPS[geometry.orientation])
    if geometry.resize_to is not None:
        m = m.resize(geometry.resize_to, Image.Resampling.BILINEAR)
    if geometry.crop is not None:
        m = m.crop(geometry.crop)
    return np.asarray(m) >= 128
