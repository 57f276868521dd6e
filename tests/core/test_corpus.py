"""The bad-input corpus through each built archive in-process, and the decode path under fuzzing."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from corpus import JSON_TYPE, TEXT, Case, build_cases
from kit import MODELS
from servekit.config import ImageLimits
from servekit.decode import decode_image, request_image_bytes
from servekit.errors import KitError

CASES = build_cases()


def as_row(case: Case) -> dict[str, Any]:
    """The request row TorchServe's worker would hand the handler for this case."""
    if case.field:
        return {case.field: bytearray(case.body)}
    if case.content_type == JSON_TYPE:
        try:
            return {"body": json.loads(case.body)}
        except ValueError:
            return {"body": bytearray(case.body)}  # TorchServe forwards undecodable JSON as bytes
    if case.content_type.startswith("text") and case.body:
        try:
            return {"body": case.body.decode("utf-8")}
        except UnicodeDecodeError:
            return {"body": bytearray(case.body)}
    return {"body": bytearray(case.body)}


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.status for c in CASES} == {200, 400, 413, 415}


@pytest.mark.parametrize("model", [*MODELS, "hf_rtdetr"])  # every task and output family, DETR's included
def test_corpus_in_process(model: str, load_handler: Any) -> None:
    handler = load_handler(model)
    good = {"body": bytearray(next(c.body for c in CASES if c.name == "JPEG"))}
    for case in CASES:
        results = handler.handle([good, as_row(case), good])
        (s1, _), (status, body), (s3, _) = results
        assert (s1, s3) == (200, 200), case.name
        assert status == case.status, (case.name, body)
        if status != 200:
            assert body["code"] == status and case.text in body["error"], (case.name, body)
        else:
            assert isinstance(body, (list, dict)), (case.name, body)  # a segmenter answers one document


def test_exif_rotation_reaches_the_detector(load_handler: Any) -> None:
    case = next(c for c in CASES if c.name == "EXIF-rotated JPEG")
    ((status, body),) = load_handler("fasterrcnn").handle([as_row(case)])
    assert status == 200
    for item in body:  # stored 96x48, shown 48x96: boxes are in the shown orientation
        assert item["box"][2] <= 48 and item["box"][3] <= 96


LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
SEEDS = [c.body for c in CASES if c.status == 200 and not c.field and c.content_type not in (JSON_TYPE, TEXT)]


def _decode_or_kit_error(data: bytes) -> None:
    start = time.perf_counter()
    try:
        image = decode_image(data, LIMITS)
        assert image.pixels.shape[0] == 3 and image.pixels.dtype.itemsize == 1
    except KitError:
        pass
    assert time.perf_counter() - start < 2.0, "one input took over 2 s to decode or refuse"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_any_bytes_give_an_image_or_a_kit_error(data: bytes) -> None:
    _decode_or_kit_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
    st.integers(0, 1 << 20),
)
def test_fuzz_mutated_images_give_an_image_or_a_kit_error(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _decode_or_kit_error(bytes(data[: max(1, cut % (len(data) + 1))]))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.none(), st.integers(), st.text(max_size=64), st.binary(max_size=64)),
        max_size=4,
    )
)
def test_fuzz_request_rows_give_bytes_or_a_kit_error(row: dict[str, Any]) -> None:
    try:
        assert isinstance(request_image_bytes(row, LIMITS), bytes)
    except KitError:
        pass


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = io.BytesIO()
    Image.fromarray(np.zeros((5000, 5000), np.uint8)).save(bomb, format="PNG")  # ~25 MPixel, tiny file
    start = time.perf_counter()
    with pytest.raises(KitError) as info:
        decode_image(bomb.getvalue(), ImageLimits(max_pixels=1_000_000))
    assert info.value.status == 413 and time.perf_counter() - start < 0.5
