"""From one request's payload to an RGB uint8 image tensor, or a :class:`KitError` saying why not.

A request may carry the image as the raw body, as a multipart field, or as JSON
``{"data": "<base64>"}`` (a ``data:image/...;base64,`` URL is accepted too). Limits on bytes and
pixels are checked before the pixels are decoded, so a small file declaring a huge image costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from servekit.config import ImageLimits
from servekit.errors import BadInput, PayloadTooLarge, UnsupportedMediaType
from servekit.quality import note_image

# Field names a request may carry its image under, in order of preference.
IMAGE_FIELDS = ("data", "body", "image", "file", "img")
_BASE64_FIELDS = ("data", "image", "b64", "img")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the model, with the size the user sees (after EXIF rotation).

    ``pixels`` is the whole image, at reduced scale when the caller asked for at most ``min_side`` and
    the JPEG was decoded in the DCT domain; ``width`` and ``height`` are always the size as sent, the
    pixels that answers (boxes) are given in.
    """

    pixels: torch.Tensor  # uint8, shape (3, h, w): (height, width) or a reduced scale of it
    width: int
    height: int


# EXIF orientations that turn the stored image by 90 or 270 degrees
_TRANSPOSED = (5, 6, 7, 8)
_ORIENTATION = 0x0112


def decode_request(row: Mapping[str, Any], limits: ImageLimits, min_side: int = 0) -> DecodedImage:
    """Extract the encoded image of one request row and decode it within ``limits`` (see :func:`decode_image`)."""
    return decode_image(request_image_bytes(row, limits), limits, min_side)


def request_image_bytes(row: Mapping[str, Any], limits: ImageLimits) -> bytes:
    """Return the encoded image carried by one TorchServe request row.

    Raises:
        BadInput: no image field, or a JSON body without a usable base64 image.
        PayloadTooLarge: the payload is over ``limits.max_bytes``.
    """
    if not isinstance(row, Mapping):
        raise BadInput("malformed request: expected a body or form fields")
    for name in IMAGE_FIELDS:
        if name in row and row[name] is not None:
            return payload_bytes(row[name], name, limits)
    fields = sorted(str(k) for k in row)
    raise BadInput(
        f"no image in the request (fields: {fields}); send the image as the body, as a multipart "
        f'field named one of {list(IMAGE_FIELDS)}, or as JSON {{"data": "<base64>"}}'
    )


def payload_bytes(value: Any, name: str, limits: ImageLimits) -> bytes:
    """Turn a field's value (bytes, JSON text, parsed JSON or base64 text) into image bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if raw[:1] == b"{":  # a JSON body sent without a JSON content type
            return _json_image(_parse_json(raw), limits)
        _check_bytes(len(raw), limits)
        return raw
    if isinstance(value, Mapping):
        return _json_image(value, limits)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return _json_image(_parse_json(text.encode("utf-8", "replace")), limits)
        if text.startswith("data:") or _looks_like_base64(text):
            return decode_base64(text, name, limits)
        raise BadInput(
            f"not an image: field '{name}' is text ({len(text)} characters starting {text[:20]!r}); "
            f'send image bytes, or base64 as JSON {{"data": "<base64>"}}'
        )
    raise BadInput(f"field '{name}' holds JSON {type(value).__name__}; expected an image or base64 text")


def decode_base64(text: str, name: str, limits: ImageLimits) -> bytes:
    """Decode base64 text (optionally a ``data:`` URL) into bytes, bounded by ``limits``."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadInput(f"field '{name}' is a data URL without ';base64,' data")
    compact = "".join(text.split())
    _check_bytes(len(compact) * 3 // 4, limits)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        bad = next((i for i, c in enumerate(compact) if not (c.isalnum() or c in "+/=")), None)
        where = f" at character {bad + 1} ({compact[bad]!r})" if bad is not None else f": {exc}"
        raise BadInput(f"base64 in field '{name}' is invalid{where}") from None
    if not data:
        raise BadInput(f"field '{name}' is empty: expected a base64 image")
    return data


def _looks_like_base64(text: str) -> bool:
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "+/=\r\n") for c in text)


def decode_image(data: bytes, limits: ImageLimits, min_side: int = 0) -> DecodedImage:
    """Decode encoded image bytes into an RGB uint8 tensor, enforcing ``limits`` first.

    Grayscale, palette, RGBA, CMYK and 16-bit images become RGB; EXIF orientation is applied; an
    animated GIF or WebP gives its first frame. With ``min_side`` (the smallest side the caller needs)
    and ``limits.reduced_jpeg``, a JPEG at least twice that on both sides is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that keeps both sides at or above ``min_side``.

    Raises:
        BadInput: empty, not an image, corrupt or truncated.
        UnsupportedMediaType: an image in a format ``limits.formats`` does not list.
        PayloadTooLarge: over ``limits.max_bytes`` or ``limits.max_pixels``.
    """
    if not data:
        raise BadInput("empty request body: expected an image")
    _check_bytes(len(data), limits)
    image = _open(data, limits)
    try:
        image.seek(0)
        orientation = image.getexif().get(_ORIENTATION, 1)
        width, height = image.size[::-1] if orientation in _TRANSPOSED else image.size
        if min_side and limits.reduced_jpeg and image.format == "JPEG" and min(image.size) >= 2 * min_side:
            image.draft("RGB", (min_side, min_side))
        if orientation != 1:
            image = ImageOps.exif_transpose(image) or image
        rgb = _to_rgb(image)
        array = np.array(rgb, dtype=np.uint8)  # one copy, writable, owned by the tensor
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadInput(f"image data is corrupt or truncated ({image.format}): {exc}") from None
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    note_image(pixels, width, height)
    return DecodedImage(pixels=pixels, width=width, height=height)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"image declares far more pixels than the limit of {limits.max_pixels}") from None
    except UnidentifiedImageError:
        sniffed = sniff_format(data)
        if sniffed:
            raise BadInput(f"image data is corrupt or truncated ({sniffed}): its header cannot be read") from None
        raise BadInput(
            f"not an image: {len(data)} bytes starting {data[:8]!r} are none of {list(limits.formats)}"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadInput(f"image data is corrupt or truncated: {exc}") from None
    if image.format not in limits.formats:
        raise UnsupportedMediaType(f"image format {image.format} is not accepted; accepted: {list(limits.formats)}")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadInput(f"image is {width}x{height} pixels: nothing to run the model on")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} pixels ({width * height}), the limit is {limits.max_pixels}")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise BadInput(
            f"image is {width}x{height} pixels, an aspect ratio over the limit of {limits.max_aspect_ratio:g}:1"
        )
    return image


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format that ``data``'s magic number announces, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_bytes(size: int, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise PayloadTooLarge(f"image is {size} bytes, the limit is {limits.max_bytes} bytes")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"body is not valid JSON: {exc}") from None


def _json_image(body: Any, limits: ImageLimits) -> bytes:
    if not isinstance(body, Mapping):
        raise BadInput(f'JSON body must be an object like {{"data": "<base64>"}}, got {type(body).__name__}')
    for name in _BASE64_FIELDS:
        if name in body:
            value = body[name]
            if not isinstance(value, str):
                raise BadInput(f"JSON field '{name}' must be a base64 string, got {type(value).__name__}")
            return decode_base64(value.strip(), name, limits)
    raise BadInput(
        f"JSON body has no image: expected a base64 string under one of {list(_BASE64_FIELDS)}, "
        f"got keys {sorted(map(str, body))}"
    )
