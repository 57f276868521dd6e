"""Decoding requests: every accepted form and format gives RGB pixels; the rest a clear KitError."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from servekit.config import ImageLimits
from servekit.decode import decode_image, request_image_bytes
from servekit.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

LIMITS = ImageLimits()


def encoded(mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "PNG", **params: object) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_each_accepted_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(encoded(fmt=fmt), LIMITS)
    assert image.pixels.shape == (3, 30, 40) and image.pixels.dtype.is_floating_point is False
    assert (image.width, image.height) == (40, 30)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_odd_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(encoded(mode, fmt=fmt), LIMITS)
    assert image.pixels.shape == (3, 30, 40)


def test_rgba_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), LIMITS).pixels.min().item() == 255


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), LIMITS)
    assert (decoded.width, decoded.height) == (20, 40)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixels = decode_image(buffer.getvalue(), LIMITS).pixels
    assert pixels[0].float().mean() > 200 and pixels[2].float().mean() < 50


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "error", "text"),
    [
        (b"", BadInput, "empty request body"),
        (b"hello world", BadInput, "not an image"),
        (encoded(fmt="JPEG")[:200], BadInput, "corrupt or truncated"),
        (encoded(fmt="TIFF"), UnsupportedMediaType, "image format TIFF is not accepted"),
        (png_header_only(20000, 20000), PayloadTooLarge, "pixels"),
        (png_header_only(8000, 6000), PayloadTooLarge, "image is 8000x6000 pixels (48000000), the limit is 40000000"),
        (b"\0" * (LIMITS.max_bytes + 1), PayloadTooLarge, "the limit is 20971520 bytes"),
    ],
)
def test_bad_images(data: bytes, error: type, text: str) -> None:
    with pytest.raises(error) as info:
        decode_image(data, LIMITS)
    assert text in info.value.message


def test_request_forms() -> None:
    png = encoded()
    b64 = base64.b64encode(png).decode()
    assert request_image_bytes({"body": bytearray(png)}, LIMITS) == png
    assert request_image_bytes({"data": png}, LIMITS) == png
    assert request_image_bytes({"file": png}, LIMITS) == png  # multipart field
    assert request_image_bytes({"body": {"data": b64}}, LIMITS) == png  # JSON parsed by TorchServe
    assert request_image_bytes({"body": json.dumps({"data": b64}).encode()}, LIMITS) == png  # JSON as bytes
    assert request_image_bytes({"body": f"data:image/png;base64,{b64}"}, LIMITS) == png  # text/plain data URL
    assert request_image_bytes({"body": {"image": b64[:40] + "\n" + b64[40:]}}, LIMITS) == png


@pytest.mark.parametrize(
    ("row", "text"),
    [
        ({}, "no image in the request"),
        ({"something": b"x"}, "fields: ['something']"),
        ({"body": {"date": "abc"}}, "JSON body has no image"),
        ({"body": {"data": 12}}, "JSON field 'data' must be a base64 string, got int"),
        ({"body": {"data": "aGVsbG8*d29ybGQ="}}, "base64 in field 'data' is invalid at character 8 ('*')"),
        ({"body": b"{not json"}, "body is not valid JSON"),
        ({"body": [1, 2]}, "field 'body' holds JSON list"),
        ({"body": "data:image/png,abc"}, "data URL without ';base64,'"),
        ("just a string", "malformed request"),
    ],
)
def test_bad_request_forms(row: object, text: str) -> None:
    with pytest.raises(BadInput) as info:
        request_image_bytes(row, LIMITS)  # type: ignore[arg-type]
    assert text in info.value.message


def test_base64_over_byte_limit_is_refused_before_decoding() -> None:
    limits = ImageLimits(max_bytes=100)
    with pytest.raises(PayloadTooLarge):
        request_image_bytes({"body": {"data": "A" * 400}}, limits)


# ---------------------------------------------------------------- reduced-scale JPEG decode


def photo_jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    """A smooth gradient photo (JPEG quality 95), optionally with an EXIF orientation."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) * 127 // (width + height)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(("min_side", "scale"), [(100, 8), (200, 4), (300, 2), (500, 2), (600, 1)])
def test_a_big_jpeg_decodes_at_the_smallest_dct_scale_that_keeps_min_side(min_side: int, scale: int) -> None:
    image = decode_image(photo_jpeg(1600, 1000), LIMITS, min_side)
    assert (image.width, image.height) == (1600, 1000)  # the size as sent, always
    assert tuple(image.pixels.shape) == (3, -(-1000 // scale), -(-1600 // scale))
    assert min(image.pixels.shape[1:]) >= min_side


def test_the_reduced_decode_keeps_exif_rotation_and_the_size_as_sent() -> None:
    image = decode_image(photo_jpeg(1600, 1000, orientation=6), LIMITS, 200)
    assert (image.width, image.height) == (1000, 1600)
    assert tuple(image.pixels.shape) == (3, 400, 250)


def test_reduced_decode_is_off_for_png_small_jpegs_and_when_configured() -> None:
    assert decode_image(encoded(size=(1600, 1000)), LIMITS, 100).pixels.shape == (3, 1000, 1600)
    assert decode_image(photo_jpeg(300, 200), LIMITS, 160).pixels.shape == (3, 200, 300)
    off = ImageLimits(reduced_jpeg=False)
    assert decode_image(photo_jpeg(1600, 1000), off, 100).pixels.shape == (3, 1000, 1600)


def test_the_reduced_decode_stays_close_to_the_full_decode_after_the_resize() -> None:
    from servekit.config import ClassifierConfig, ModelSource
    from servekit.transforms import classifier_crop

    config = ClassifierConfig(task="classification", model=ModelSource(architecture="resnet18"))  # 256 / 224
    data = photo_jpeg(2400, 1600)
    full = classifier_crop(decode_image(data, LIMITS).pixels, config).float()
    reduced = classifier_crop(decode_image(data, LIMITS, 256).pixels, config).float()
    assert (full - reduced).abs().mean() < 1.5 and (full - reduced).abs().max() < 16


def test_boxes_come_back_in_the_pixels_as_sent_through_a_reduced_decode() -> None:
    import torch

    from servekit.yolo import letterbox, unletterbox

    image = decode_image(photo_jpeg(2400, 1600), LIMITS, 320)
    assert image.pixels.shape[2] < 2400
    _, geometry = letterbox(image.pixels, 320, (image.width, image.height))
    box = torch.tensor([[600.0, 400.0, 1800.0, 1200.0]])
    square = box.clone()
    square[:, 0::2] = square[:, 0::2] * geometry.scale_x + geometry.left
    square[:, 1::2] = square[:, 1::2] * geometry.scale_y + geometry.top
    assert torch.allclose(unletterbox(square, geometry), box, atol=1.0)
    assert (geometry.width, geometry.height) == (2400, 1600)
