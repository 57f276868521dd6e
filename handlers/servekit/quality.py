"""Model-quality metrics: what the served model saw and answered, with bounded label sets.

TorchServe, Triton and KServe export latency and counts, never the model's own answers. Each decoded image
leaves an :class:`ImageStats` (pixels and aspect as sent, the reduced-scale decode used, the mean
brightness of a thumbnail); each answer is summarized (top-1 confidence, classes, detections, segmented
area, or the error class). :func:`quality_metrics` turns one batch of them into metric samples that the
TorchServe glue emits on its Prometheus endpoint and the Triton step through the python backend's custom
metrics. Labels stay bounded: classes beyond the first ``CLASS_SLOTS`` a worker answered count as
``other``; aspect and decode scale are a few fixed bins; errors are the kit's error classes.

The images seen by ``decode_request`` are recorded while :func:`observing` is active in the thread (the
service wraps each request's preparation in it), so the pure decode functions need no extra argument.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from servekit.errors import KitError
from servekit.segmentation import is_background

CLASS_SLOTS = 20  # classes named per worker; the rest are "other"
OTHER = "other"
ASPECT_BINS = ((0.5, "tall"), (0.8, "portrait"), (1.25, "square"), (2.0, "landscape"), (float("inf"), "wide"))
HISTOGRAM, COUNTER = "histogram", "counter"


@dataclass(frozen=True)
class ImageStats:
    """What one decoded image looked like."""

    pixels: int  # width x height as sent
    aspect: float  # width / height as sent
    brightness: float  # mean of a thumbnail of the decoded pixels, in [0, 1]
    scale: int  # the JPEG's reduced-scale decode: 1 (full), 2, 4 or 8


@dataclass(frozen=True)
class Sample:
    """One metric sample: a histogram observation or a counter increment."""

    name: str
    value: float
    kind: str
    unit: str = "count"
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class ClassSlots:
    """The bounded set of class labels a worker reports: the first ``size`` it answered, then ``other``."""

    size: int = CLASS_SLOTS
    named: set[str] = field(default_factory=set)

    def label(self, name: str) -> str:
        if name in self.named:
            return name
        if len(self.named) < self.size:
            self.named.add(name)
            return name
        return OTHER


_SEEN: ContextVar[list[ImageStats] | None] = ContextVar("servekit_seen_images", default=None)


def image_stats(pixels: torch.Tensor, width: int, height: int) -> ImageStats:
    """The stats of one decoded uint8 [3, h, w] image whose size as sent is ``width`` x ``height``."""
    step = max(1, max(int(pixels.shape[-1]), int(pixels.shape[-2])) // 64)
    thumb = pixels[:, ::step, ::step]
    brightness = float(thumb.float().mean()) / 255.0 if thumb.numel() else 0.0
    scale = max(1, round(height / max(1, int(pixels.shape[-2]))))
    return ImageStats(width * height, width / max(1, height), round(brightness, 4), scale)


def note_image(pixels: torch.Tensor, width: int, height: int) -> None:
    """Record a decoded image when :func:`observing` is active in this thread (else nothing)."""
    seen = _SEEN.get()
    if seen is not None:
        seen.append(image_stats(pixels, width, height))


@contextlib.contextmanager
def observing() -> Iterator[list[ImageStats]]:
    """Collect the images decoded in this thread inside the ``with`` block."""
    seen: list[ImageStats] = []
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


def aspect_bin(aspect: float) -> str:
    return next(name for bound, name in ASPECT_BINS if aspect < bound)


def error_class(error: BaseException) -> str:
    """The error's class name for a label: the kit's own classes, else ``InternalError``."""
    return type(error).__name__ if isinstance(error, KitError) else "InternalError"


def answer_samples(answer: Any, slots: ClassSlots) -> list[Sample]:
    """The samples of one instance's answer: a classification's top-1, a detection list, a segmentation,
    an explanation, or an error."""
    if isinstance(answer, BaseException):
        return [Sample("ServekitBadInputs", 1, COUNTER, labels=(("ErrorClass", error_class(answer)),))]
    if isinstance(answer, Mapping) and "explanation" in answer:
        return [Sample("ServekitExplanations", 1, COUNTER)]
    if isinstance(answer, Mapping) and "classes" in answer:  # a segmentation
        classes = answer["classes"]
        area = sum(float(c.get("area", 0.0)) for c in classes if not is_background(str(c["label"])))
        return [
            Sample("ServekitSegmentedArea", round(area, 4), HISTOGRAM, "ratio"),
            *(
                Sample("ServekitAnswers", 1, COUNTER, labels=(("Class", slots.label(str(c["label"]))),))
                for c in classes
            ),
        ]
    if isinstance(answer, list):
        return list_samples(answer, slots)
    return []


def list_samples(answer: list[Any], slots: ClassSlots) -> list[Sample]:
    """A detection list (items with a box; empty when nothing was found) or a classifier's top-k."""
    if not answer or "box" in answer[0]:
        top = [Sample("ServekitTop1Confidence", float(answer[0]["score"]), HISTOGRAM, "ratio")] if answer else []
        return [
            Sample("ServekitDetectionsPerImage", len(answer), HISTOGRAM),
            *top,
            *(Sample("ServekitAnswers", 1, COUNTER, labels=(("Class", slots.label(str(d["label"]))),)) for d in answer),
        ]
    best = answer[0]
    return [
        Sample("ServekitTop1Confidence", float(best["score"]), HISTOGRAM, "ratio"),
        Sample("ServekitAnswers", 1, COUNTER, labels=(("Class", slots.label(str(best["label"]))),)),
    ]


def image_samples(stats: ImageStats) -> list[Sample]:
    return [
        Sample("ServekitImageMegapixels", round(stats.pixels / 1e6, 4), HISTOGRAM, "megapixels"),
        Sample("ServekitImageBrightness", stats.brightness, HISTOGRAM, "ratio"),
        Sample("ServekitImageAspect", 1, COUNTER, labels=(("Aspect", aspect_bin(stats.aspect)),)),
        Sample("ServekitDecodeScale", 1, COUNTER, labels=(("Scale", str(stats.scale)),)),
    ]


def quality_metrics(
    answers: Sequence[Any], images: Sequence[ImageStats | None], slots: ClassSlots, seconds: float = 0.0
) -> list[Sample]:
    """The samples of one batch's instances (answers and the images they decoded, in order): histogram
    observations one by one, counters summed per name and labels. ``seconds``, the batch's time in the
    worker, is observed once per instance (``ServekitRequestSeconds``: the worker's share of each request's
    latency, for a p99 next to TorchServe's queue latency)."""
    samples = [s for a in answers for s in answer_samples(a, slots)]
    if seconds > 0:
        samples += [Sample("ServekitRequestSeconds", round(seconds, 4), HISTOGRAM, "s") for _ in answers]
    samples += [s for stats in images if stats is not None for s in image_samples(stats)]
    counts: Counter[tuple[str, str, tuple[tuple[str, str], ...]]] = Counter()
    out: list[Sample] = []
    for s in samples:
        if s.kind == COUNTER:
            counts[(s.name, s.unit, s.labels)] += s.value
        else:
            out.append(s)
    out += [Sample(name, value, COUNTER, unit, labels) for (name, unit, labels), value in counts.items()]
    return out
