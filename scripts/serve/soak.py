"""``make soak``: concurrent load mixing good and bad inputs on every model, for a fixed time.

Prints requests served, answers by status (and any status that was not the one expected), and each
worker's resident memory after warm-up and at the end. Exits non-zero on an unexpected status or on
memory growth of 10 % or more after warm-up. ``tests/serve/test_e2e_faults.py`` runs a one-minute version
(``test_soak_one_minute``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from loadgen import closed_loop
from tsctl import Endpoints, Keys, TorchServe, derive_config, random_endpoints

logger = logging.getLogger("soak")
MODELS = ("digits", "resnet18", "mobilenet_v3_small", "fasterrcnn")
MAX_GROWTH = 0.10


@dataclass(frozen=True)
class Payload:
    """One request to send and the status it must get."""

    name: str
    body: bytes
    content_type: str
    expected: int


@dataclass
class SoakReport:
    """What a soak run saw."""

    seconds: float
    statuses: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    memory_start: dict[int, int] = field(default_factory=dict)
    memory_end: dict[int, int] = field(default_factory=dict)

    @property
    def served(self) -> int:
        return sum(self.statuses.values())

    def growth(self) -> dict[int, float]:
        """Relative RSS growth per worker PID still alive at the end."""
        return {pid: self.memory_end[pid] / rss - 1 for pid, rss in self.memory_start.items() if pid in self.memory_end}

    def ok(self) -> bool:
        return not self.unexpected and all(g < MAX_GROWTH for g in self.growth().values())

    def lines(self) -> list[str]:
        rate = self.served / max(self.seconds, 1e-9)
        out = [f"served {self.served} requests in {self.seconds:.0f} s ({rate:.1f}/s)"]
        out.append("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())))
        out.append("unexpected: " + (", ".join(f"{k}: {n}" for k, n in self.unexpected.items()) or "none"))
        for pid, rss in self.memory_start.items():
            end = self.memory_end.get(pid)
            tail = f"{end / 2**20:.1f} MiB ({(end / rss - 1) * 100:+.1f} %)" if end else "gone"
            out.append(f"worker {pid}: {rss / 2**20:.1f} MiB after warm-up -> {tail}")
        return out


def worker_memory(endpoints: Endpoints, keys: Keys, models: Sequence[str]) -> dict[int, int]:
    """Resident memory of every model worker process, by PID."""
    headers = {"Authorization": f"Bearer {keys.management}"}
    memory = {}
    for model in models:
        reply = requests.get(f"{endpoints.url('management')}/models/{model}", headers=headers, timeout=10)
        for worker in reply.json()[0]["workers"]:
            try:
                memory[int(worker["pid"])] = psutil.Process(int(worker["pid"])).memory_info().rss
            except (psutil.NoSuchProcess, ValueError, KeyError):
                continue
    return memory


def run_soak(
    endpoints: Endpoints,
    keys: Keys,
    payloads: Sequence[Payload],
    models: Sequence[str],
    *,
    seconds: float,
    concurrency: int = 8,
    warmup: float = 10.0,
) -> SoakReport:
    """Load every model with ``payloads`` from ``concurrency`` threads for ``seconds`` after ``warmup``."""
    report = SoakReport(seconds=seconds)
    jobs = [(m, p) for p in payloads for m in models]
    url = endpoints.url("inference")
    sessions = threading.local()

    def send(number: int) -> int:
        model, payload = jobs[number % len(jobs)]
        session = getattr(sessions, "session", None) or requests.Session()
        sessions.session = session
        headers = {"Authorization": f"Bearer {keys.inference}", "Content-Type": payload.content_type}
        status = session.post(f"{url}/predictions/{model}", data=payload.body, headers=headers, timeout=180).status_code
        if status != payload.expected:
            report.unexpected[f"{model}/{payload.name}: {status}"] += 1  # Counter updates hold the GIL
        return status

    def snapshot() -> None:
        report.memory_start = worker_memory(endpoints, keys, models)

    load = closed_loop(send, concurrency=concurrency, seconds=seconds, warmup=warmup, on_warm=snapshot)
    report.statuses = load.statuses
    for status, count in load.statuses.items():
        if not isinstance(status, int):
            report.unexpected[f"request failed: {status}"] += count
    report.memory_end = worker_memory(endpoints, keys, models)
    return report


def default_payloads() -> list[Payload]:
    """A mix of good images and the most common bad inputs."""
    import demo_models

    photos = demo_models.sample_photos(("chelsea", "astronaut", "coffee"))
    good = [
        Payload(f"{n}.jpg", demo_models.encode(img, "JPEG"), "application/octet-stream", 200)
        for n, img in photos.items()
    ]
    jpeg = good[0].body
    bad = [
        Payload("truncated.jpg", jpeg[: len(jpeg) // 2], "application/octet-stream", 400),
        Payload("text", b"not an image", "text/plain", 400),
        Payload("json-without-data", b'{"x": 1}', "application/json", 400),
        Payload("bomb.png", demo_models.png_declaring(20000, 20000), "application/octet-stream", 413),
    ]
    return good + bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    workdir = Path("build/soak")
    workdir.mkdir(parents=True, exist_ok=True)
    config = derive_config(Path("config.properties"), workdir / "config.properties", random_endpoints().properties())
    server = TorchServe(workdir, config, Path("model_store"), [f"{m}={m}.mar" for m in MODELS])
    server.start()
    try:
        keys = server.wait_ready(MODELS)
        report = run_soak(
            server.endpoints, keys, default_payloads(), MODELS, seconds=args.minutes * 60, concurrency=args.concurrency
        )
    finally:
        server.stop()
    for line in report.lines():
        logger.info(line)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
