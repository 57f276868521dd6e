"""The serving pipeline, free of TorchServe: decode each item alone, run the good ones as one batch.

A service takes the raw request rows of one batch and returns exactly one answer per row: a JSON-able
result, or the :class:`KitError` (or unexpected exception) that row ended in. The TorchServe adapter
and the Triton python backend both call it, so both servers share one tested implementation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from servekit.config import (
    ClassifierConfig,
    DetectorConfig,
    ExplainSettings,
    HandlerConfig,
    ImageLimits,
    SegmenterConfig,
)
from servekit.decode import DecodedImage, decode_request
from servekit.detr import detr_detections, detr_outputs, scoring_of
from servekit.errors import BadInput, ConfigError, KitError, plain_line
from servekit.explain import Explained, choose_method, explain_batch, explanation_json, grid_shape, resolve_target
from servekit.loading import compile_module, load_labels, load_model
from servekit.postprocess import detections_to_json, topk_to_json
from servekit.protocols import answer_requests, field_flag, request_field, unwrap
from servekit.quality import ImageStats, observing
from servekit.segmentation import is_background, label_map, requested_format, segmentation_answer, segmentation_logits
from servekit.transforms import (
    classifier_batch,
    classifier_crop,
    detector_inputs,
    detector_padded_shape,
    group_by_key,
    resize_image,
    resized_shape,
    segmenter_input,
)
from servekit.yolo import (
    PAD_VALUE,
    Letterbox,
    YoloSettings,
    detect,
    infer_layout,
    letterbox,
    ultralytics_letterbox,
)

logger = logging.getLogger(__name__)

Prepared = TypeVar("Prepared")
Network = Callable[..., Any]  # a torch module, a TorchScript module or an ONNX Runtime model
Answer = Any  # JSON-able result, or the exception the request ended in


@dataclass
class StageTimes:
    """Wall time of each stage of one batch, in milliseconds."""

    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0

    def add(self, other: StageTimes) -> None:
        """Add another batch's times to these."""
        self.preprocess_ms += other.preprocess_ms
        self.inference_ms += other.inference_ms
        self.postprocess_ms += other.postprocess_ms


@dataclass
class BatchOutcome:
    """One answer per request row, in order, and how long each stage took; for the quality metrics, the
    answer of every instance (a KServe request may carry several) and the image each decoded."""

    answers: list[Answer]
    times: StageTimes = field(default_factory=StageTimes)
    instances: list[Answer] = field(default_factory=list)
    images: list[ImageStats | None] = field(default_factory=list)

    @property
    def good(self) -> int:
        """How many rows got a result rather than an error."""
        return sum(not isinstance(a, BaseException) for a in self.answers)


def run_batch(
    rows: Sequence[Any],
    prepare: Callable[[Any], Prepared],
    infer: Callable[[list[Prepared]], list[Any]],
    finish: Callable[[list[Any], list[Prepared]], list[Any]],
    pool: Executor | None = None,
) -> BatchOutcome:
    """Prepare each row alone, run the good ones together, and scatter results back in order.

    A :class:`KitError` from ``prepare`` fails its row alone. An exception from ``infer`` or
    ``finish`` fails the rows that were in the model's batch, each with its own answer. With a
    ``pool``, the rows are prepared in parallel on its threads (decode and resize release the GIL).
    """
    times = StageTimes()
    start = time.perf_counter()
    outcomes = list(pool.map(_attempt(prepare), rows)) if pool and len(rows) > 1 else map(_attempt(prepare), rows)
    answers: list[Answer] = [None] * len(rows)
    images: list[ImageStats | None] = [None] * len(rows)
    good_idx: list[int] = []
    prepared: list[Prepared] = []
    for i, (ok, value, seen) in enumerate(outcomes):
        images[i] = seen[0] if seen else None
        if ok:
            prepared.append(value)
            good_idx.append(i)
        else:
            answers[i] = value
    times.preprocess_ms = (time.perf_counter() - start) * 1000
    if not prepared:
        return BatchOutcome(answers, times, list(answers), images)
    try:
        start = time.perf_counter()
        raw = infer(prepared)
        times.inference_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        results = finish(raw, prepared)
        times.postprocess_ms = (time.perf_counter() - start) * 1000
    except Exception as exc:
        logger.exception("model failed on a batch of %d", len(prepared))
        results = [exc] * len(prepared)
    for i, result in zip(good_idx, results):
        answers[i] = result
    return BatchOutcome(answers, times, list(answers), images)


def _attempt(prepare: Callable[[Any], Prepared]) -> Callable[[Any], tuple[bool, Any, list[ImageStats]]]:
    """``prepare`` as (True, result) or (False, the exception), with the images it decoded: one row's
    failure stays its own."""

    def run(row: Any) -> tuple[bool, Any, list[ImageStats]]:
        with observing() as seen:
            try:
                return True, prepare(row), seen
            except KitError as exc:
                return False, exc, seen
            except Exception as exc:
                logger.exception("unexpected error while decoding a request")
                return False, exc, seen

    return run


def classifier_item(row: Any, config: ClassifierConfig) -> torch.Tensor:
    """One request row as the classifier's uint8 crop: decoded (at reduced scale when the JPEG is at least
    twice ``resize``), short side resized, centre-cropped. TorchServe's service and Triton's step share it."""
    decoded = decode_request(row, config.limits, config.decode_side)
    return classifier_crop(decoded.pixels, config)


# the resized uint8 image, the (height, width) as sent, the answer format the request asked for
SegmenterItem = tuple[torch.Tensor, tuple[int, int], str]


def segmenter_item(row: Any, config: SegmenterConfig) -> SegmenterItem:
    """One request row resized by the segmenter's recipe (uint8), with the size its answer is given in and
    the format it asked for: decoded at reduced scale when the JPEG allows. TorchServe's service and
    Triton's step share it."""
    answer_format = requested_format(row, config.format)
    decoded = decode_request(row, config.limits, config.decode_side)
    size = (decoded.height, decoded.width)
    return segmenter_input(decoded.pixels, config, size), size, answer_format


def segmenter_answers(
    logits: Sequence[torch.Tensor], items: Sequence[SegmenterItem], config: SegmenterConfig, labels: list[str]
) -> list[Any]:
    """One answer per image from its ``[C, h, w]`` logits, in the pixels of the image as sent."""
    return [
        segmentation_answer(
            label_map(one, height, width),
            labels,
            answer_format=answer_format,
            min_area=config.min_area,
            ignore=config.ignore,
        )
        for one, (_, (height, width), answer_format) in zip(logits, items)
    ]


DetrItem = tuple[torch.Tensor, tuple[int, int]]  # the resized uint8 image, the (width, height) as sent


def detr_item(row: Any, config: DetectorConfig) -> DetrItem:
    """One request row resized by a DETR processor's recipe (uint8; the target shape computed from the size
    as sent, so a reduced-scale JPEG decode gives the same shape), with the size its boxes are given in."""
    decoded = decode_request(row, config.limits, config.decode_side)
    shape = resized_shape(decoded.height, decoded.width, config.resize, config.max_size)
    pixels = resize_image(decoded.pixels, shape, config.interpolation, antialias=config.antialias)
    return pixels, (decoded.width, decoded.height)


def detr_answers(
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    items: Sequence[DetrItem],
    config: DetectorConfig,
    scoring: str,
    labels: list[str],
) -> list[Any]:
    """One JSON answer per image from its queries' logits and boxes, in the pixels of the image as sent."""
    answers = []
    for (logits, boxes), (_, size) in zip(outputs, items):
        found = detr_detections(logits, boxes, size, scoring, config.max_detections)
        answers.append(detections_to_json(found, labels, size, config.score_threshold, config.max_detections))
    return answers


def letterboxed_item(row: Any, config: DetectorConfig) -> tuple[torch.Tensor, Letterbox]:
    """One request row letterboxed to ``input_size`` (uint8), with its geometry in the pixels as sent:
    decoded at reduced scale when the JPEG allows. TorchServe's service and Triton's step share it."""
    if config.letterbox == "ultralytics":  # decoded in full, as their predictor reads the image
        decoded = decode_request(row, config.limits)
        return ultralytics_letterbox(decoded.pixels, config.input_size)
    decoded = decode_request(row, config.limits, config.input_size)
    return letterbox(decoded.pixels, config.input_size, (decoded.width, decoded.height))


@dataclass(frozen=True)
class ExplainItem:
    """One image to explain: the model's uint8 input, the box of the image as sent it shows, the target the
    request named (None: the model's choice) and whether it asked for a PNG heatmap."""

    pixels: torch.Tensor
    box: tuple[int, int, int, int]
    target: int | None
    png: bool


def explain_item(row: Any, pixels: torch.Tensor, box: tuple[int, int, int, int], labels: list[str]) -> ExplainItem:
    """A request row's explanation item; a bad ``target`` fails this request alone."""
    target = resolve_target(request_field(row, "target"), labels, len(labels))
    return ExplainItem(pixels, box, target, field_flag(row, "png"))


def crop_box(height: int, width: int, config: ClassifierConfig) -> tuple[int, int, int, int]:
    """The [x0, y0, x1, y1] of an image as sent that a classifier's resize and center crop show."""
    out_h, out_w = resized_shape(height, width, config.resize)
    if not config.crop:
        return 0, 0, width, height
    crop_h, crop_w = config.input_size
    top, left = (out_h - crop_h) / 2, (out_w - crop_w) / 2
    sy, sx = height / out_h, width / out_w
    return (
        max(0, round(left * sx)),
        max(0, round(top * sy)),
        min(width, round((left + crop_w) * sx)),
        min(height, round((top + crop_h) * sy)),
    )


def explain_method(settings: ExplainSettings, model: Network) -> str:
    """The explanation method a model's config resolves to, checked when the model loads (a gradient method
    on a graph, or a Grad-CAM layer the network lacks, fails the load with one line)."""
    network = explained_network(model)
    method = choose_method(settings.method, network)
    if method == "gradcam" and settings.layer and settings.layer not in dict(network.named_modules()):
        raise ConfigError(f"handler.explain.layer {settings.layer!r} is not a module of this network")
    return method


def explained_network(model: Network) -> Network:
    """The network explanations run on: a torch.compile'd module's original (hooks and gradients)."""
    return getattr(model, "_orig_mod", model)


def explanation_answers(
    raw: Sequence[Explained], items: Sequence[ExplainItem], labels: list[str], settings: ExplainSettings
) -> list[Any]:
    return [
        explanation_json(one, labels, item.box, png=settings.png or item.png, layer=settings.layer)
        for one, item in zip(raw, items)
    ]


class VisionService(Generic[Prepared]):
    """What both tasks share: the model, its labels, its device and its input limits."""

    def __init__(self, model: Network, labels: list[str], limits: ImageLimits, device: torch.device) -> None:
        self.model = model
        self.labels = labels
        self.limits = limits
        self.device = device
        self.model_name = ""  # the name KServe v2 answers carry (TorchServe's registered name)
        self.max_batch = 1  # the frontend's batchSize: requests carrying several instances run in batches of it
        self._pool: Executor | None = None

    def decode(self, row: Any) -> DecodedImage:
        """Extract and decode the image of one request row, in full."""
        return decode_request(row, self.limits)

    def handle(self, rows: Sequence[Any], explain: Sequence[bool] = ()) -> BatchOutcome:
        """Answer one batch of request rows: the instances of every row (plain, KServe v1 or v2 bodies) run
        as one model batch, decoded in parallel on the worker's threads; one answer per row.

        ``explain`` marks the rows that came to the explanations endpoint; a row may also ask itself (an
        ``explain`` field). Those rows are explained, the rest of the batch is predicted as usual.
        """
        requests = [unwrap(row) for row in rows]
        marked = list(explain) + [False] * (len(rows) - len(explain))
        instances = [
            (inst, flag or field_flag(inst, "explain")) for r, flag in zip(requests, marked) for inst in r.instances
        ]
        step = max(self.max_batch, len(rows), 1)  # several instances per request: no batch beyond batchSize
        outcome = BatchOutcome([])
        for start in range(0, len(instances), step):
            part = instances[start : start + step]
            answers: list[Answer] = [None] * len(part)
            images: list[ImageStats | None] = [None] * len(part)
            for wanted, steps in ((False, (self.prepare, self.infer, self.finish)), (True, self.explain_steps())):
                index = [i for i, (_, flag) in enumerate(part) if flag == wanted]
                if not index:
                    continue
                done = run_batch([part[i][0] for i in index], *steps, self.decode_pool())
                for i, answer, seen in zip(index, done.answers, done.images):
                    answers[i], images[i] = answer, seen
                outcome.times.add(done.times)
            outcome.answers.extend(answers)
            outcome.images.extend(images)
        folded = answer_requests(requests, outcome.answers, self.model_name, marked)
        # a request whose body itself is bad has no instances: its error is counted as an instance's
        errors = [r.error for r in requests if r.error is not None]
        return BatchOutcome(folded, outcome.times, outcome.answers + errors, outcome.images)

    def explain_steps(self) -> tuple[Callable[[Any], Any], Callable[[list[Any]], Any], Callable[..., list[Any]]]:
        """prepare, infer and finish of an explanation (a model that cannot explain refuses each request)."""

        def refuse(_: Any) -> Any:
            raise BadInput("this model does not answer explanations: classifiers and segmenters do")

        return refuse, lambda items: items, lambda raw, items: list(raw)

    def decode_pool(self) -> Executor | None:
        """A pool of as many threads as torch's intra-op threads (none when that is 1), made once."""
        threads = torch.get_num_threads()
        if threads <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="servekit-decode")
        return self._pool

    def prepare(self, row: Any) -> Prepared:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, items: list[Prepared]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, raw: Any, items: list[Prepared]) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class ExplainingService(VisionService[Prepared]):
    """A service that also answers explanations (classifiers, segmenters): a subclass prepares each row as an
    :class:`ExplainItem` and explains a batch through :meth:`explained`; the method (resolved when the model
    loads), its settings and the answers are shared."""

    config: ClassifierConfig | SegmenterConfig
    explain_method: str

    def explain_steps(self) -> tuple[Callable[[Any], Any], Callable[[list[Any]], Any], Callable[..., list[Any]]]:
        return self.explain_prepare, self.explain_infer, self.explain_finish

    def explain_prepare(self, row: Any) -> ExplainItem:  # pragma: no cover - abstract
        raise NotImplementedError

    def explain_infer(self, items: list[ExplainItem]) -> list[Explained]:  # pragma: no cover - abstract
        raise NotImplementedError

    def explained(
        self,
        network: Network,
        scores: Callable[[torch.Tensor], torch.Tensor],
        batch: torch.Tensor,
        targets: Sequence[int | None],
        **options: Any,
    ) -> list[Explained]:
        """:func:`explain_batch` with this model's method and ``handler.explain`` settings; ``options`` are
        the batch's own (``probabilities``, ``base``)."""
        settings = self.config.explain
        return explain_batch(
            network,
            scores,
            batch,
            targets,
            method=self.explain_method,
            grid=grid_shape(int(batch.shape[2]), int(batch.shape[3]), settings.grid),
            budget=settings.budget,
            steps=settings.steps,
            layer=settings.layer,
            chunk=max(self.max_batch, 1),
            **options,
        )

    def explain_finish(self, raw: list[Explained], items: list[ExplainItem]) -> list[Any]:
        return explanation_answers(raw, items, self.labels, self.config.explain)


class ClassifierService(ExplainingService[torch.Tensor]):
    """Top-k classification: uint8 crops per item, one normalized float batch through the model."""

    def __init__(self, config: ClassifierConfig, model: Network, labels: list[str], device: torch.device) -> None:
        probe = torch.rand(2, 3, *config.input_size, device=device).to(memory_format=torch.channels_last)
        model = fused_for_inference(model, probe)
        self.channels_last = adopt_channels_last(model, probe)
        super().__init__(model, labels, config.limits, device)
        self.config = config
        self.explain_method = explain_method(config.explain, model)

    def prepare(self, row: Any) -> torch.Tensor:
        return classifier_item(row, self.config)

    def infer(self, items: list[torch.Tensor]) -> torch.Tensor:
        batch = in_layout(classifier_batch(items, self.config).to(self.device), self.channels_last)
        with torch.inference_mode():
            return self.model(batch).float().cpu()

    def finish(self, raw: torch.Tensor, items: list[torch.Tensor]) -> list[Any]:
        return topk_to_json(raw, self.labels, self.config.topk)

    def explain_prepare(self, row: Any) -> ExplainItem:
        decoded = decode_request(row, self.config.limits, self.config.decode_side)
        box = crop_box(decoded.height, decoded.width, self.config)
        return explain_item(row, classifier_crop(decoded.pixels, self.config), box, self.labels)

    def explain_infer(self, items: list[ExplainItem]) -> list[Explained]:
        batch = in_layout(
            classifier_batch([item.pixels for item in items], self.config).to(self.device), self.channels_last
        )
        network = explained_network(self.model)
        return self.explained(network, lambda x: network(x).float(), batch, [item.target for item in items])


MIN_CONVS_FOR_CHANNELS_LAST = 3


def prefers_channels_last(model: Network) -> bool:
    """Whether a torch network (eager or TorchScript) is mostly convolutions, which oneDNN runs faster in
    channels-last layout (2 cores, AVX-512: resnet18 at batch 8 1.21x, TorchScript mobilenet_v3_small 1.42x,
    fasterrcnn_mobilenet_v3_large_320_fpn 1.24x; a ViT's one patch conv: left alone)."""
    if not isinstance(model, torch.nn.Module):
        return False
    if hasattr(model, "_orig_mod"):  # torch.compile'd and warmed up in the layout it was given
        return False
    convs = sum(isinstance(m, torch.nn.Conv2d) or getattr(m, "original_name", "") == "Conv2d" for m in model.modules())
    return convs >= MIN_CONVS_FOR_CHANNELS_LAST


def fused_for_inference(model: Network, sample: Any) -> Network:
    """An eager network with each BatchNorm folded into the convolution before it (torch.fx), when it traces
    and answers ``sample`` as the original does; else the network as it was. oneDNN then runs one op where
    it ran two (resnet18 at batch 8, channels-last, 2 cores: 90 -> 69 ms)."""
    if not isinstance(model, torch.nn.Module) or isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return model
    if hasattr(model, "_orig_mod") or not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model)
        with torch.inference_mode():
            same = torch.allclose(fused(sample), model(sample), rtol=1e-3, atol=1e-4)
    except Exception as exc:  # a network that does not trace symbolically (control flow on shapes, say)
        logger.info("convolutions and batch norms stay apart (%s)", plain_line(str(exc))[:120])
        return model
    if not same:
        logger.warning("folding batch norms into convolutions changed the outputs: the network stays as it was")
        return model
    return fused


def adopt_channels_last(model: Network, sample: Any) -> bool:
    """Put a mostly-convolutional torch network in channels-last layout if one forward pass on ``sample``
    (a channels-last batch, or a detector's list of images) works there; else leave it as it was."""
    if not prefers_channels_last(model):
        return False
    model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            model(sample)
    except Exception as exc:  # a graph that views its activations as contiguous, say
        logger.warning("the network fails in channels-last layout (%s): it stays contiguous", plain_line(str(exc)))
        model.to(memory_format=torch.contiguous_format)
        return False
    return True


def in_layout(value: Any, channels_last: bool) -> Any:
    """A network or a batch in channels-last layout when ``channels_last`` (both take ``.to(memory_format)``)."""
    return value.to(memory_format=torch.channels_last) if channels_last else value


class SegmenterService(ExplainingService[SegmenterItem]):
    """Semantic segmentation: images of one resized shape run as one forward pass (a fixed [h, w] recipe
    makes every batch one pass); each answer is for the image as sent."""

    def __init__(self, config: SegmenterConfig, model: Network, labels: list[str], device: torch.device) -> None:
        shape = resized_shape(64, 64, config.resize, config.max_size, config.size_divisor)
        probe = torch.zeros(1, 3, *shape, device=device).to(memory_format=torch.channels_last)
        self.channels_last = adopt_channels_last(model, probe)
        super().__init__(model, labels, config.limits, device)
        self.config = config
        self.explain_method = explain_method(config.explain, model)

    def prepare(self, row: Any) -> SegmenterItem:
        return segmenter_item(row, self.config)

    def infer(self, items: list[SegmenterItem]) -> list[torch.Tensor]:
        logits: list[torch.Tensor] = [torch.empty(0)] * len(items)
        with torch.inference_mode():
            for group in group_by_key([tuple(item[0].shape) for item in items]):
                batch = classifier_batch([items[i][0] for i in group], self.config).to(self.device)
                out = segmentation_logits(self.model(in_layout(batch, self.channels_last))).float().cpu()
                for index, one in zip(group, out):
                    logits[index] = one
        return logits

    def finish(self, raw: list[torch.Tensor], items: list[SegmenterItem]) -> list[Any]:
        return segmenter_answers(raw, items, self.config, self.labels)

    def explain_prepare(self, row: Any) -> ExplainItem:
        decoded = decode_request(row, self.config.limits, self.config.decode_side)
        size = (decoded.height, decoded.width)
        pixels = segmenter_input(decoded.pixels, self.config, size)
        return explain_item(row, pixels, (0, 0, decoded.width, decoded.height), self.labels)

    def explain_infer(self, items: list[ExplainItem]) -> list[Explained]:
        """Each class's score is its logit averaged over the image; the default target is the class with the
        largest area that is neither background nor one of ``ignore``; the answer's score is the class's
        probability averaged over the pixels (its expected share of the image)."""
        network = explained_network(self.model)
        ignored = [i for i, label in enumerate(self.labels) if label in self.config.ignore or is_background(label)]

        def scores(x: torch.Tensor) -> torch.Tensor:
            return segmentation_logits(network(in_layout(x, self.channels_last))).float().mean(dim=(2, 3))

        explained: list[Explained] = [None] * len(items)  # type: ignore[list-item]
        for group in group_by_key([tuple(item.pixels.shape) for item in items]):
            batch = classifier_batch([items[i].pixels for i in group], self.config).to(self.device)
            with torch.inference_mode():
                logits = segmentation_logits(network(in_layout(batch, self.channels_last))).float()
            probs = logits.softmax(1)
            areas = probs.argmax(1)
            targets = [items[i].target for i in group]
            for k, target in enumerate(targets):
                if target is None:
                    counts = torch.bincount(areas[k].flatten(), minlength=max(len(self.labels), 1)).float()
                    counts[ignored] = -1
                    targets[k] = int(counts.argmax())
            found = self.explained(network, scores, batch, targets, probabilities=False, base=logits.mean(dim=(2, 3)))
            for k, (index, one) in enumerate(zip(group, found)):  # score: the class's mean pixel probability
                explained[index] = dataclasses.replace(one, score=float(probs[k, one.target].mean()))
        return explained


class DetectorService(VisionService[DecodedImage]):
    """Detection over images of any sizes in one batch (torchvision detectors take a list); the network's
    weights in channels-last layout when it is mostly convolutions (oneDNN then runs every conv so)."""

    def __init__(self, config: DetectorConfig, model: Network, labels: list[str], device: torch.device) -> None:
        adopt_channels_last(model, [torch.zeros(3, 64, 64, device=device)])
        super().__init__(model, labels, config.limits, device)
        self.config = config

    def prepare(self, row: Any) -> DecodedImage:
        return self.decode(row)

    def infer(self, items: list[DecodedImage]) -> list[Mapping[str, torch.Tensor]]:
        """Run images of equal padded shape together, so no answer depends on its batch-mates."""
        inputs = [t.to(self.device) for t in detector_inputs([item.pixels for item in items])]
        outputs: list[Mapping[str, torch.Tensor]] = [{}] * len(items)
        with torch.inference_mode():
            for group in group_by_key([self.batch_key(item) for item in items]):
                for index, output in zip(group, self.model([inputs[i] for i in group])):
                    outputs[index] = output
        return outputs

    def batch_key(self, item: DecodedImage) -> tuple[int, int]:
        """The model's padded input shape for this image (one group for detectors of other kinds)."""
        transform = getattr(self.model, "transform", None)
        if transform is None or getattr(transform, "fixed_size", None) or not hasattr(transform, "min_size"):
            return (0, 0)
        return detector_padded_shape(
            item.height, item.width, transform.min_size[-1], transform.max_size, transform.size_divisible
        )

    def finish(self, raw: list[Mapping[str, torch.Tensor]], items: list[DecodedImage]) -> list[Any]:
        return [
            detections_to_json(
                out,
                self.labels,
                (item.width, item.height),
                self.config.score_threshold,
                self.config.max_detections,
                mask_threshold=self.config.mask_threshold,
            )
            for out, item in zip(raw, items)
        ]


class DetrDetectorService(VisionService[DetrItem]):
    """DETR-family detectors: images of one resized shape run as one forward pass (no padding, so no answer
    depends on its batch-mates; RT-DETR's fixed 640 x 640 makes every batch one pass); no NMS."""

    def __init__(
        self, config: DetectorConfig, model: Network, labels: list[str], device: torch.device, scoring: str
    ) -> None:
        super().__init__(model, labels, config.limits, device)
        self.config = config
        self.scoring = scoring

    def prepare(self, row: Any) -> DetrItem:
        return detr_item(row, self.config)

    def infer(self, items: list[DetrItem]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(items)
        with torch.inference_mode():
            for group in group_by_key([tuple(pixels.shape) for pixels, _ in items]):
                batch = classifier_batch([items[i][0] for i in group], self.config).to(self.device)
                logits, boxes = detr_outputs(self.model(batch))
                for index, one_logits, one_boxes in zip(group, logits.float().cpu(), boxes.float().cpu()):
                    outputs[index] = (one_logits, one_boxes)
        return outputs

    def finish(self, raw: list[tuple[torch.Tensor, torch.Tensor]], items: list[DetrItem]) -> list[Any]:
        return detr_answers(raw, items, self.config, self.scoring, self.labels)


def detr_scoring(config: DetectorConfig, model_dir: Path) -> str:
    """The scoring a DETR-family detector uses: as configured, else its Hugging Face model type's.

    Raises:
        ConfigError: ``scoring: auto`` on a graph, which does not say.
    """
    if config.scoring != "auto":
        return config.scoring
    if config.model.format != "transformers":
        raise ConfigError(
            "handler.scoring must be softmax or sigmoid for a DETR-family graph (auto reads a Hugging Face folder)"
        )
    from servekit.hf_source import read_config

    return scoring_of(str(read_config(model_dir).get("model_type", "")))


class YoloDetectorService(VisionService[tuple[torch.Tensor, Letterbox]]):
    """Raw-output detectors: every image letterboxed to one square, so a batch is one forward pass."""

    def __init__(self, config: DetectorConfig, model: Network, labels: list[str], device: torch.device) -> None:
        super().__init__(model, labels, config.limits, device)
        self.config = config
        self.settings = yolo_settings(config, config.layout if config.layout != "auto" else self.probe_layout())

    def probe_layout(self) -> str:
        """The layout of this model's output, from one forward pass on a gray image."""
        shape = raw_output_shape(self.model, self.config.input_size, self.device)
        return infer_layout(shape, len(self.labels) or None)

    def prepare(self, row: Any) -> tuple[torch.Tensor, Letterbox]:
        return letterboxed_item(row, self.config)

    def infer(self, items: list[tuple[torch.Tensor, Letterbox]]) -> torch.Tensor:
        batch = torch.stack([pixels for pixels, _ in items]).to(self.device).to(torch.float32).div_(255.0)
        with torch.inference_mode():
            return raw_tensor(self.model(batch)).float().cpu()

    def finish(self, raw: torch.Tensor, items: list[tuple[torch.Tensor, Letterbox]]) -> list[Any]:
        geometries = [geometry for _, geometry in items]
        return yolo_answers(raw, geometries, self.settings, self.labels, self.config.max_detections)


def yolo_settings(config: DetectorConfig, layout: str) -> YoloSettings:
    """The postprocessing of a raw-output detector's config, with its layout resolved."""
    return YoloSettings(
        layout, config.score_threshold, config.iou_threshold, config.max_detections, config.agnostic_nms
    )


def yolo_answers(
    raw: torch.Tensor, geometries: Sequence[Letterbox], settings: YoloSettings, labels: list[str], max_detections: int
) -> list[Any]:
    """One JSON answer per image of a raw-output batch: thresholds, NMS, boxes in the pixels as sent."""
    answers = []
    for out, geometry in zip(raw, geometries):
        found = detect(out, geometry, settings)
        answers.append(detections_to_json(found, labels, (geometry.width, geometry.height), 0.0, max_detections))
    return answers


def raw_output_shape(model: Network, size: int, device: torch.device) -> list[int]:
    """The shape of a raw-output detector's prediction for one gray letterboxed ``size`` x ``size`` image."""
    gray = torch.full((1, 3, size, size), PAD_VALUE / 255.0, device=device)
    with torch.inference_mode():
        return [int(d) for d in raw_tensor(model(gray)).shape]


def raw_tensor(output: Any) -> torch.Tensor:
    """The raw prediction tensor of a model output (the first element of a tuple or list)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"the model returned {type(output).__name__}, not a raw prediction tensor")
    return output


def build_service(
    config: HandlerConfig, model_dir: Path, device: torch.device, max_batch: int = 1, model_name: str = ""
) -> VisionService[Any]:
    """Load the model folder's network and labels and return the service for its task.

    With ``handler.compile``, the classifier is compiled and run once at every batch size from 1 to
    ``max_batch`` (the frontend's ``batchSize``) before the first request. ``model_name`` is the name
    KServe v2 answers carry; requests with several instances run in model batches of ``max_batch``.
    """
    service = _service(config, model_dir, device, max_batch)
    service.max_batch = max(1, max_batch)
    service.model_name = model_name
    return service


def _service(config: HandlerConfig, model_dir: Path, device: torch.device, max_batch: int) -> VisionService[Any]:
    if config.model.format == "transformers":
        from servekit.hf_source import check_task

        check_task(model_dir, config.task)
        if isinstance(config, DetectorConfig) and config.output != "detr":
            raise ConfigError("a Hugging Face detector folder is served with handler.output: detr")
    model = load_model(model_dir, config.model, device)
    labels = load_labels(model_dir / config.labels)
    if isinstance(config, ClassifierConfig):
        if config.compile is not None:
            shape = (3, *config.input_size)
            warmup = [torch.zeros(size, *shape, device=device) for size in range(1, max(1, max_batch) + 1)]
            model = compile_module(model, config.compile, warmup)
        return ClassifierService(config, model, labels, device)
    if isinstance(config, SegmenterConfig):
        return SegmenterService(config, model, labels, device)
    if config.output == "yolo":
        return YoloDetectorService(config, model, labels, device)
    if config.output == "detr":
        return DetrDetectorService(config, model, labels, device, detr_scoring(config, model_dir))
    return DetectorService(config, model, labels, device)
