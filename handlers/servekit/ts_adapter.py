"""The thin TorchServe glue: context to typed config once, batch answers to per-request statuses.

Entry files (``servekit_classifier.py``, ``servekit_detector.py``) subclass :class:`TorchServeAdapter`
and set ``task``. All logic lives in TorchServe-free modules; this file only reads the context,
emits metrics and maps each answer to its status in one place (:func:`encode_answers`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar

import torch

from servekit.config import parse_handler_config
from servekit.errors import ConfigError, NotReady, error_body, status_of
from servekit.host import available_cores
from servekit.loading import choose_device, intra_op_threads
from servekit.quality import COUNTER, HISTOGRAM, ClassSlots, quality_metrics
from servekit.service import BatchOutcome, VisionService, build_service

logger = logging.getLogger(__name__)

JSON = "application/json"
METRIC_PREFIX = "Servekit"


class TorchServeAdapter:
    """A TorchServe custom handler (``initialize`` + ``handle``) over a kit service."""

    task: ClassVar[str] = ""

    def __init__(self) -> None:
        self.service: VisionService[Any] | None = None
        self.model_name = ""
        self.initialized = False
        self.slots = ClassSlots()

    def initialize(self, context: Any) -> None:
        """Parse the archive's config once, pick device and threads, and load the model."""
        properties = context.system_properties
        model_dir = Path(properties.get("model_dir", "."))
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        config = parse_handler_config(yaml_config.get("handler"))
        if config.task != self.task:
            raise ConfigError(f"handler.task is {config.task!r} but this archive's handler serves {self.task!r}")
        workers = int(yaml_config.get("maxWorkers", yaml_config.get("minWorkers", 1)))
        threads = intra_op_threads(config.threads, workers, available_cores())
        torch.set_num_threads(threads)
        gpu_id = properties.get("gpu_id")
        device = choose_device(int(gpu_id) if gpu_id is not None else None)
        self.model_name = str(getattr(context, "model_name", model_dir.name))
        max_batch = int(properties.get("batch_size") or yaml_config.get("batchSize", 1) or 1)
        self.service = build_service(config, model_dir, device, max_batch, self.model_name)
        self.initialized = True
        logger.info("servekit %s model %s loaded on %s with %d threads", self.task, self.model_name, device, threads)

    def handle(self, data: Sequence[Any], context: Any) -> list[bytes]:
        """Answer a batch: one JSON body per request, errors with their own status."""
        requests = len(getattr(context, "request_processor", None) or data)
        if self.service is None:
            outcome = BatchOutcome([NotReady("model is not loaded yet")] * len(data))
        else:
            outcome = self.service.handle(data, explanation_rows(context, requests, len(data)))
        emit_metrics(context, self.model_name, outcome, self.slots)
        return encode_answers(outcome.answers, context, requests, under_envelope(data, requests))


def explanation_rows(context: Any, requests: int, rows: int) -> list[bool]:
    """Which rows came to ``/explanations/<model>`` or KServe's ``/v1/models/<model>:explain``: the frontend
    sets the ``explain`` header of each such request (TorchServe's stock handlers read request 0's only)."""
    if requests != rows or getattr(context, "request_processor", None) is None:
        return []
    return [context.get_request_header(i, "explain") == "True" for i in range(rows)]


def under_envelope(rows: Sequence[Any], requests: int) -> bool:
    """Whether TorchServe's ``kserve``/``kservev2`` envelope parsed the requests before the handler.

    The frontend hands the handler one row per request whose values are the wire's bytes (or a body it
    parsed as JSON); an envelope hands it the instances of the first request, or each request's v2 input.
    """
    if len(rows) != requests:
        return True
    return any(
        not isinstance(row, Mapping) or "datatype" in row or isinstance(row.get("data"), (str, list)) for row in rows
    )


def encode_answers(
    answers: Sequence[Any], context: Any, requests: int | None = None, envelope: bool = False
) -> list[Any]:
    """Turn each answer into a JSON body, setting a failed request's status on the context.

    This is the one place where errors become HTTP statuses. Over gRPC, TorchServe 0.12 drops the
    per-request status, so the body (``{"error": ..., "code": ...}``) carries it as well. Under
    TorchServe's envelopes the answers stay objects (the envelope wraps them, TorchServe writes the JSON)
    and may outnumber the ``requests``: the first failed instance of the one request sets its status.
    """
    requests = len(answers) if requests is None else requests
    bodies: list[Any] = []
    statused: set[int] = set()
    for idx, answer in enumerate(answers):
        target = min(idx, requests - 1)
        context.set_response_content_type(target, JSON)
        body = answer
        if isinstance(answer, BaseException):
            body = error_body(answer)
            code = status_of(answer)
            if target not in statused:
                # The status line gets the standard ASCII phrase, never request-derived text: TorchServe
                # 0.12 frames the phrase by its length in characters, so non-ASCII text kills the worker.
                context.set_response_status(code, HTTPStatus(code).phrase, target)
                statused.add(target)
        bodies.append(body if envelope else json.dumps(body).encode("utf-8"))
    return bodies


def emit_metrics(context: Any, model_name: str, outcome: BatchOutcome, slots: ClassSlots | None = None) -> None:
    """Counters for batches, requests, rejected requests and per-stage milliseconds, and the model-quality
    samples of :mod:`servekit.quality` (histograms and bounded counters), on TorchServe's Prometheus endpoint."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    from ts.metrics.dimension import Dimension  # TorchServe's own types; only the glue imports ts
    from ts.metrics.metric_type_enum import MetricTypes

    values = {
        "Batches": 1,
        "Requests": len(outcome.answers),
        "RejectedRequests": len(outcome.answers) - outcome.good,
        "PreprocessMs": outcome.times.preprocess_ms,
        "InferenceMs": outcome.times.inference_ms,
        "PostprocessMs": outcome.times.postprocess_ms,
    }
    model = [Dimension("ModelName", model_name), Dimension("Level", "Model")]
    for name, value in values.items():
        metrics.add_counter(f"{METRIC_PREFIX}{name}", value, None, model)
    kinds = {COUNTER: MetricTypes.COUNTER, HISTOGRAM: MetricTypes.HISTOGRAM}
    times = outcome.times
    seconds = (times.preprocess_ms + times.inference_ms + times.postprocess_ms) / 1000
    for sample in quality_metrics(outcome.instances, outcome.images, slots or ClassSlots(), seconds):
        dims = [*model, *(Dimension(k, v) for k, v in sample.labels)]
        metrics.add_metric(sample.name, sample.value, sample.unit, None, dims, kinds[sample.kind])
