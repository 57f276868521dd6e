"""Closed-loop load: ``concurrency`` threads, each sending its next request when the last one answers.

Shared by ``make bench`` (throughput and latency per server and backend) and ``make soak`` (statuses and
memory over minutes). The call under load is any ``send(i) -> status``; latencies are kept only after
the warm-up.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Status = int | str  # an HTTP-style status, or the name of the exception a request ended in


@dataclass
class LoadResult:
    """What one closed-loop run measured after its warm-up."""

    seconds: float
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def rate(self) -> float:
        """Answered requests per second (any status)."""
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not (isinstance(status, int) and status < 400))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def closed_loop(
    send: Callable[[int], Status],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 0.0,
    on_warm: Callable[[], None] | None = None,
) -> LoadResult:
    """Run ``send`` from ``concurrency`` threads for ``warmup + seconds``; measure the last ``seconds``.

    ``send(i)`` gets a running request number (to pick a payload) and returns the status. ``on_warm`` runs
    once when the warm-up ends (the soak snapshots worker memory there).
    """
    result = LoadResult(seconds=seconds, concurrency=concurrency)
    lock = threading.Lock()
    counter = iter(range(1 << 62))
    start = time.monotonic()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    def loop() -> None:
        while (began := time.monotonic()) < stop_at:
            with lock:
                number = next(counter)
            try:
                status: Status = send(number)
            except Exception as exc:
                status = type(exc).__name__
            ended = time.monotonic()
            if began >= measure_from:
                with lock:
                    result.statuses[status] += 1
                    result.latencies_ms.append((ended - began) * 1000)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    if on_warm is not None:
        time.sleep(max(0.0, measure_from - time.monotonic()))
        on_warm()
    for thread in threads:
        thread.join()
    return result


SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} ([0-9.eE+-]+|NaN)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')
MetricSample = tuple[str, dict[str, str], float]  # name, labels, value


def metric_samples(metrics_text: str) -> list[MetricSample]:
    """Every labelled sample of a Prometheus text exposition (TorchServe's or Triton's metrics endpoint)."""
    return [(name, dict(LABEL.findall(labels)), float(value)) for name, labels, value in SAMPLE.findall(metrics_text)]


def metric_total(samples: list[MetricSample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(value for found, have, value in samples if found == name and labels.items() <= have.items())


def servekit_counters(metrics_text: str, model: str) -> dict[str, float]:
    """The kit handler's ``Servekit*`` Prometheus counters of one model, by short name."""
    return {
        name.removeprefix("Servekit"): value
        for name, labels, value in metric_samples(metrics_text)
        if name.startswith("Servekit") and labels.get("ModelName") == model
    }
