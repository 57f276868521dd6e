"""The bad-input corpus: every case generated here from code, with the status and error text expected.

``make corpus`` prints it as a Markdown table. Valid-but-odd images (grayscale, palette, CMYK, 16-bit,
EXIF-rotated, animated, ...) expect 200; the rest the right 4xx and a message that says what is wrong.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from demo_models import encode, png_declaring

MAX_BYTES = 20 * 1024 * 1024  # the default handler.limits.max_bytes of every demo model
OCTET, JSON_TYPE, TEXT = "application/octet-stream", "application/json", "text/plain"
# a JPEG cut short: the bad image the handler tests put among good ones in a batch
CORRUPT = encode(np.zeros((64, 64, 3), np.uint8), "JPEG")[:300]


@dataclass(frozen=True)
class Case:
    """One request: its body, how it is sent, and the answer expected."""

    name: str
    body: bytes
    content_type: str = OCTET
    field: str | None = None  # send as a multipart form field of this name
    status: int = 200
    text: str = ""  # a substring of the error message (empty for 200)


def _photo(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    noise = rng.integers(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _exif_rotated() -> bytes:
    image = _photo((96, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return _save(image, "JPEG", exif=exif)


def _animated(fmt: str) -> bytes:
    frames = [_photo(seed=i) for i in range(3)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit_png() -> bytes:
    array = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _save(Image.fromarray(array), "PNG")


def _corrupt_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build_cases() -> list[Case]:
    """The whole corpus (built fresh each call; a few MB in memory)."""
    jpeg, png = _save(_photo(), "JPEG", quality=90), _save(_photo(), "PNG")
    rng = np.random.default_rng(1)
    bad = 400
    makers: list[Callable[[], Case]] = [
        # --- not images at all
        lambda: Case("empty body", b"", status=bad, text="empty request body"),
        lambda: Case("random bytes", rng.bytes(2048), status=bad, text="not an image"),
        lambda: Case("text/plain", b"hello, model", TEXT, status=bad, text="is text"),
        lambda: Case("HTML", b"<!doctype html><html><body>hi</body></html>", "text/html", status=bad, text="is text"),
        lambda: Case(
            "SVG",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
            "image/svg+xml",
            status=bad,
            text="not an image",
        ),
        lambda: Case(
            "PDF",
            b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
            "application/pdf",
            status=bad,
            text="not an image",
        ),
        lambda: Case("unicode junk", "ÿ😀\u202e\u0000ünïcödé".encode(), TEXT, status=bad, text="not an image"),
        lambda: Case("unicode junk as bytes", "ÿ😀\u202eünïcödé".encode(), status=bad, text="not an image"),
        # --- broken images
        lambda: Case("truncated JPEG", jpeg[: len(jpeg) // 2], status=bad, text="corrupt or truncated"),
        lambda: Case("truncated PNG", png[: len(png) // 2], status=bad, text="corrupt or truncated"),
        lambda: Case("JPEG header only", jpeg[:20], status=bad, text="corrupt or truncated"),
        lambda: Case("corrupted PNG data", _corrupt_middle(png), status=bad, text="corrupt or truncated"),
        lambda: Case("zero-size PNG", png_declaring(0, 0), status=bad, text="image"),
        lambda: Case("1x1000 PNG (aspect ratio)", _save(_photo((1000, 1)), "PNG"), status=bad, text="aspect ratio"),
        # --- too large
        lambda: Case("PNG declaring 20000x20000", png_declaring(20000, 20000), status=413, text="pixels"),
        lambda: Case(
            "PNG declaring 8000x6000", png_declaring(8000, 6000), status=413, text="image is 8000x6000 pixels"
        ),
        lambda: Case("body over the byte limit", jpeg + b"\0" * (MAX_BYTES + 1 - len(jpeg)), status=413, text="bytes"),
        # --- unsupported formats
        lambda: Case("TIFF", _save(_photo(), "TIFF"), status=415, text="image format TIFF is not accepted"),
        lambda: Case("ICO", _save(_photo((32, 32)), "ICO"), status=415, text="image format ICO is not accepted"),
        # --- JSON forms
        lambda: Case(
            "JSON without the field",
            json.dumps({"image_url": "x"}).encode(),
            JSON_TYPE,
            status=bad,
            text="JSON body has no image",
        ),
        lambda: Case(
            "JSON with a number",
            json.dumps({"data": 12}).encode(),
            JSON_TYPE,
            status=bad,
            text="must be a base64 string, got int",
        ),
        lambda: Case(
            "JSON with null", json.dumps({"data": None}).encode(), JSON_TYPE, status=bad, text="must be a base64 string"
        ),
        lambda: Case("JSON list", json.dumps([_b64(png)]).encode(), JSON_TYPE, status=bad, text="JSON list"),
        lambda: Case("JSON empty object", b"{}", JSON_TYPE, status=bad, text="JSON body has no image"),
        lambda: Case("malformed JSON", b'{"data": "abc', JSON_TYPE, status=bad, text="not valid JSON"),
        lambda: Case(
            "invalid base64",
            json.dumps({"data": "iVBORw0K*GgoAAAANSUhEUg=="}).encode(),
            JSON_TYPE,
            status=bad,
            text="base64 in field 'data' is invalid at character 9",
        ),
        lambda: Case(
            "base64 of text",
            json.dumps({"data": _b64(b"just some text")}).encode(),
            JSON_TYPE,
            status=bad,
            text="not an image",
        ),
        lambda: Case(
            "data URL without base64",
            json.dumps({"data": "data:image/png,abc"}).encode(),
            JSON_TYPE,
            status=bad,
            text="data URL without ';base64,'",
        ),
        lambda: Case("multipart, unknown field", png, field="upload", status=bad, text="no image in the request"),
        # --- valid forms and odd-but-valid images: 200
        lambda: Case("JPEG", jpeg),
        lambda: Case("PNG as multipart 'data'", png, field="data"),
        lambda: Case("PNG as multipart 'image'", png, field="image"),
        lambda: Case("JSON base64", json.dumps({"data": _b64(png)}).encode(), JSON_TYPE),
        lambda: Case("JSON data URL", json.dumps({"data": "data:image/png;base64," + _b64(png)}).encode(), JSON_TYPE),
        lambda: Case("WebP", _save(_photo(), "WEBP")),
        lambda: Case("BMP", _save(_photo(), "BMP")),
        lambda: Case("1x1 PNG", _save(_photo((1, 1)), "PNG")),
        lambda: Case("grayscale JPEG", _save(_photo().convert("L"), "JPEG")),
        lambda: Case("palette PNG", _save(_photo().convert("P"), "PNG")),
        lambda: Case("RGBA PNG", _save(_photo().convert("RGBA"), "PNG")),
        lambda: Case("CMYK JPEG", _save(_photo().convert("CMYK"), "JPEG")),
        lambda: Case("16-bit PNG", _sixteen_bit_png()),
        lambda: Case("EXIF-rotated JPEG", _exif_rotated()),
        lambda: Case("animated GIF", _animated("GIF")),
        lambda: Case("animated WebP", _animated("WEBP")),
    ]
    return [make() for make in makers]


def main() -> int:
    sys.stdout.write("| case | sent as | status | error contains |\n|---|---|---|---|\n")
    for case in build_cases():
        how = f"multipart '{case.field}'" if case.field else case.content_type
        sys.stdout.write(f"| {case.name} | {how} | {case.status} | {case.text} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
