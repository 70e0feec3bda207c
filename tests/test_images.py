"""pipeline.ingest.images: decode + check, EXIF orientation, RGB conversion, resize, re-encode."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dataengine.pipeline.ingest.images import (BadImage, ImageConfig, apply_to_mask, process_image,
                                               resize_plan)


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w=64, h=48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_plain_rgb_jpeg_passes_through_untouched():
    data = _encode(_photo(), quality=90)
    out = process_image(data)
    assert out.passthrough and out.data == data and out.ext == "jpg"
    assert (out.width, out.height) == (64, 48)


def test_png_and_webp_pass_through_with_their_extension():
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp")):
        data = _encode(_photo(), fmt)
        out = process_image(data)
        assert out.passthrough and out.data == data and out.ext == ext


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file named .jpg\n" * 3, "not an image"),
])
def test_empty_and_text_files_are_rejected(data, reason):
    with pytest.raises(BadImage, match=reason):
        process_image(data)


def test_truncated_jpeg_is_rejected():
    data = _encode(_photo(256, 256), quality=95)
    with pytest.raises(BadImage, match="truncated|corrupt"):
        process_image(data[: len(data) // 2])


def test_decompression_bomb_is_rejected_before_decoding():
    # A real PNG whose header claims 20000x20000 pixels (the data is tiny).
    png = _encode(Image.new("L", (8, 8)), "PNG")
    ihdr = png.index(b"IHDR")
    body = struct.pack(">II", 20000, 20000) + png[ihdr + 12: ihdr + 17]
    chunk = b"IHDR" + body
    bomb = png[: ihdr] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[ihdr + 21:]
    with pytest.raises(BadImage, match="decompression bomb"):
        process_image(bomb)
    with pytest.raises(BadImage, match="max_pixels=100"):
        process_image(_encode(_photo(20, 20), "PNG"), ImageConfig(max_pixels=100))


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(_photo().convert("CMYK"), quality=95)
    out = process_image(data)
    im = _decode(out.data)
    assert not out.passthrough and out.orig_mode == "CMYK" and im.mode == "RGB"
    ref = np.asarray(_photo(), dtype=int)
    assert np.abs(np.asarray(im, dtype=int) - ref).mean() < 12


def test_16bit_png_is_scaled_to_8bit_rgb():
    arr = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    assert _decode(data).mode.startswith("I")
    out = process_image(data, ImageConfig(encode_format="png"))
    got = np.asarray(_decode(out.data))
    assert got.shape == (32, 64, 3) and out.ext == "png"
    np.testing.assert_array_equal(got[..., 0], (arr.astype(np.uint32) // 257).astype(np.uint8))


def test_palette_png_with_transparency_is_composited_on_white():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))
    pal.info["transparency"] = 0  # index 0 (red) is transparent
    data = _encode(pal, "PNG", transparency=0)
    out = process_image(data, ImageConfig(encode_format="png"))
    got = np.asarray(_decode(out.data))
    assert got[0, 0].tolist() == [0, 0, 255] and got[0, 15].tolist() == [255, 255, 255]


def test_grayscale_becomes_rgb():
    data = _encode(_photo().convert("L"), quality=95)
    out = process_image(data)
    got = np.asarray(_decode(out.data))
    assert got.shape == (48, 64, 3) and out.orig_mode == "L"
    assert np.abs(got[..., 0].astype(int) - got[..., 2]).max() <= 2


def test_exif_orientation_is_applied_and_masks_follow():
    im = _photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    data = _encode(im, quality=95, exif=exif.tobytes())
    out = process_image(data)
    assert (out.width, out.height) == (48, 64) and out.geometry.orientation == 6
    # a mask drawn on the raw file, moved by the same geometry, lands on the same pixels
    mask = np.zeros((48, 64), bool)
    mask[0:10, 0:20] = True  # top-left of the raw file (dark red/green corner)
    stored = apply_to_mask(mask, out.geometry)
    assert stored.shape == (64, 48)
    upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270))
    assert stored.sum() == mask.sum()
    np.testing.assert_array_equal(stored, np.asarray(Image.fromarray(mask).transpose(
        Image.Transpose.ROTATE_270)))
    got = np.asarray(_decode(out.data), dtype=int)
    assert np.abs(got[stored] - upright[stored]).mean() < 12


def test_resize_modes_like_img2dataset():
    cfg = ImageConfig(resize_mode="keep_ratio", image_size=32)
    assert resize_plan(64, 48, cfg) == ((32, 24), None)
    assert resize_plan(16, 12, cfg) == (None, None)  # never upscale by default
    cc = ImageConfig(resize_mode="center_crop", image_size=32)
    assert resize_plan(64, 48, cc) == ((43, 32), (5, 0, 37, 32))
    data = _encode(_photo(64, 48), quality=95)
    out = process_image(data, cc)
    assert (out.width, out.height) == (32, 32) and not out.passthrough
    small = process_image(_encode(_photo(16, 12)), cfg)
    assert small.passthrough
    mask = np.ones((48, 64), bool)
    assert apply_to_mask(mask, out.geometry).shape == (32, 32)


def test_jpeg_draft_downscale_keeps_quality():
    y, x = np.mgrid[0:768, 0:1024]
    arr = np.stack([x / 4, y / 3, 128 + 100 * np.sin(x / 40.0) * np.cos(y / 30.0)], -1)
    big = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    cfg = ImageConfig(resize_mode="keep_ratio", image_size=200, encode_quality=95)
    fast = process_image(_encode(big, quality=95), cfg)  # JPEG: decoded at a reduced scale
    full = process_image(_encode(big, "PNG"), cfg)       # PNG: full decode, then resize
    assert (fast.width, fast.height) == (full.width, full.height) == (200, 150)
    a = np.asarray(_decode(fast.data), dtype=float)
    b = np.asarray(_decode(full.data), dtype=float)
    psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
    assert psnr > 35


@pytest.mark.parametrize("fmt,ext", [("jpeg", "jpg"), ("webp", "webp"), ("png", "png")])
def test_reencode_formats(fmt, ext):
    out = process_image(_encode(_photo()), ImageConfig(encode_format=fmt, reencode=True,
                                                       encode_quality=80))
    assert out.ext == ext and not out.passthrough
    assert _decode(out.data).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[ext]


def test_config_validation_names_field_and_allowed_values():
    with pytest.raises(ValueError, match="resize_mode='big'.*keep_ratio"):
        ImageConfig(resize_mode="big")
    with pytest.raises(ValueError, match="encode_quality=0"):
        ImageConfig(encode_quality=0)
    with pytest.raises(ValueError, match="mask is"):
        apply_to_mask(np.ones((3, 3), bool), process_image(_encode(_photo())).geometry)
