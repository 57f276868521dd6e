"""``make tune MODEL=<name> [P99_MS=<bound>]``: the serving settings with the most throughput under a p99 bound.

Triton's Model Analyzer is the anchor; TorchServe has nothing like it. One real TorchServe (the shipped
``config.properties`` on free loopback ports, with the model API on for this private instance only) and
the closed-loop client of the bench. Each point is the model's archive repacked with other frontend and
handler keys (``batchSize``, ``maxBatchDelay``, ``minWorkers``/``maxWorkers``, ``handler.threads``),
registered, loaded for ``--seconds`` at ``--concurrency`` after a warm-up, and unregistered. The search
is staged, as Model Analyzer's quick search is: every archive variant that exists for the model at its
shipped settings; then batch size x batch delay on the fastest variant; then workers x threads at the best
batching. The pick is the highest throughput whose p99 stays under the bound (no bound: the highest).
Writes ``build/tune/<name>/results.md``, ``results.json`` and ``tune.png``, and prints the keys to set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import requests

from client import KeyRing, RestClient
from loadgen import closed_loop
from profiles import read_document, record_choice, repack, this_machine
from profiles import tuned_document as profile_document
from tsctl import Keys, TorchServe, derive_config, random_endpoints

logger = logging.getLogger("tune")
VARIANT_SUFFIXES = ("", "_int8", "_onnx", "_openvino", "_exported", "_aoti")  # _compile: minutes per load
BATCH_SIZES = (1, 4, 8, 16)
BATCH_DELAYS_MS = (5, 20, 50)


@dataclass(frozen=True)
class Point:
    """One setting of the sweep: which archive, and the keys written into its model-config.yaml."""

    archive: str
    workers: int
    threads: int
    batch: int
    delay_ms: int

    @property
    def label(self) -> str:
        return f"{self.archive} w{self.workers} t{self.threads} b{self.batch} d{self.delay_ms}"


@dataclass
class Result:
    point: Point
    stage: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


def shipped_point(archive: str, document: dict[str, Any], cores: int) -> Point:
    """The settings an archive's model-config.yaml ships (threads 0 means cores / workers)."""
    workers = int(document.get("minWorkers", 1))
    threads = int(document.get("handler", {}).get("threads", 0)) or max(1, cores // workers)
    return Point(archive, workers, threads, int(document.get("batchSize", 1)), int(document.get("maxBatchDelay", 100)))


def point_keys(point: Point) -> dict[str, int]:
    """The model-config keys of ``point``: frontend keys and the handler's threads."""
    return {
        "minWorkers": point.workers,
        "maxWorkers": point.workers,
        "batchSize": point.batch,
        "maxBatchDelay": point.delay_ms,
        "threads": point.threads,
    }


def tuned_document(document: dict[str, Any], point: Point) -> dict[str, Any]:
    """The model-config.yaml of ``point``: the frontend keys and the handler's threads replaced."""
    return profile_document(document, point_keys(point))


def pick(results: Sequence[Result], bound_ms: float | None) -> Result | None:
    """The highest throughput without errors whose p99 stays under the bound."""
    fits = [r for r in results if r.errors == 0 and (bound_ms is None or r.p99_ms <= bound_ms)]
    return max(fits, key=lambda r: r.rate, default=None)


def batching_points(best: Point) -> list[Point]:
    return [replace(best, batch=b, delay_ms=d) for b in BATCH_SIZES for d in BATCH_DELAYS_MS if b > 1 or d == 5]


def worker_points(best: Point, cores: int) -> list[Point]:
    """Workers x threads that use the cores without oversubscribing them (and the shipped split)."""
    pairs = {(w, t) for w in (1, 2, 4) for t in (1, 2, 4, 8) if w * t <= cores and w <= cores}
    pairs.add((best.workers, best.threads))
    return [replace(best, workers=w, threads=t) for w, t in sorted(pairs)]


class Bench:
    """One private TorchServe with the model API on, measuring one point at a time."""

    def __init__(self, workdir: Path, payloads: list[bytes], concurrency: int, seconds: float, warmup: float) -> None:
        self.store = workdir / "store"
        shutil.rmtree(self.store, ignore_errors=True)
        self.store.mkdir(parents=True)
        endpoints = random_endpoints()
        overrides = {
            **endpoints.properties(),
            "enable_model_api": "true",  # this private instance only: points are registered and dropped
            "load_models": "",
            "allowed_urls": f"file://{self.store.resolve()}/[A-Za-z0-9_.-]+\\\\.mar",
        }
        config = derive_config(Path("config.properties"), workdir / "config.properties", overrides)
        self.server = TorchServe(workdir, config, self.store, [])
        self.payloads, self.concurrency, self.seconds, self.warmup = payloads, concurrency, seconds, warmup
        self.count = 0

    def __enter__(self) -> Bench:
        self.server.start()
        self.keys: Keys = self.server.keys()
        self.client = RestClient(self.server.endpoints, KeyRing(self.server.workdir / "key_file.json"))
        deadline = time.monotonic() + 120
        while True:  # the key file comes before the listeners
            try:
                self._management("GET", "/models")
                return self
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def _management(self, method: str, path: str, **params: Any) -> requests.Response:
        url = f"{self.server.endpoints.url('management')}{path}"
        headers = {"Authorization": f"Bearer {self.keys.management}"}
        reply = requests.request(method, url, params=params, headers=headers, timeout=900)
        if reply.status_code == 400 and "InvalidKeyException" in reply.text:
            self.keys = self.server.renew("management")
            return self._management(method, path, **params)
        return reply

    @contextlib.contextmanager
    def registered(self, point: Point, source: Path) -> Iterator[str]:
        """``source`` repacked with the keys of ``point``, registered with its workers up; yields its name."""
        self.count += 1
        name = f"tune{self.count}"
        repack(source, self.store / f"{name}.mar", tuned_document(read_document(source), point))
        reply = self._management(
            "POST", "/models", url=f"{name}.mar", model_name=name, initial_workers=point.workers, synchronous="true"
        )
        if reply.status_code != 200:
            raise SystemExit(f"registering {point.label} failed: {reply.status_code} {reply.text[:300]}")
        try:
            yield name
        finally:
            self._management("DELETE", f"/models/{name}")
            (self.store / f"{name}.mar").unlink(missing_ok=True)

    def measure(self, point: Point, source: Path, stage: str, payloads: list[bytes] | None = None) -> Result:
        with self.registered(point, source) as name:
            payloads = payloads or self.payloads

            def send(number: int) -> int:
                return self.client.predict(name, payloads[number % len(payloads)]).status

            load = closed_loop(send, concurrency=self.concurrency, seconds=self.seconds, warmup=self.warmup)
        result = Result(point, stage, load.rate, load.percentile(50), load.percentile(99), load.errors)
        logger.info(
            "[%s] %-45s %7.1f req/s  p50 %5.0f ms  p99 %5.0f ms  %d errors",
            stage,
            point.label,
            result.rate,
            result.p50_ms,
            result.p99_ms,
            result.errors,
        )
        return result


def payloads_for(name: str) -> list[bytes]:
    """What a user of each demo model sends: digit PNGs, held-out shape scenes, photos, a 640x480 JPEG."""
    import demo_models

    if name == "digits":
        images, _ = demo_models.digit_images("test")
        return [demo_models.encode(img, "PNG") for img in images[:32]]
    if name == "shapes":
        import shapes

        return [shapes.encode_jpeg(s.image) for s in shapes.held_out(8)]
    if name == "fasterrcnn":
        photos = demo_models.sample_photos(("astronaut", "coffee", "chelsea"))
        return [demo_models.encode(p, "JPEG", quality=90) for p in photos.values()]
    return [demo_models.user_image("photo_640x480.jpg")]


def run(name: str, store: Path, out: Path, bound_ms: float | None, args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    variants = [f"{name}{s}" for s in VARIANT_SUFFIXES if (store / f"{name}{s}.mar").is_file()]
    if not variants:
        raise SystemExit(f"no archive of {name} in {store}: run `make archive MODEL={name}` first")
    sources = {v: store / f"{v}.mar" for v in variants}
    shipped = shipped_point(name, read_document(sources[name]), cores)
    results: list[Result] = []
    out.mkdir(parents=True, exist_ok=True)
    with Bench(out / "server", payloads_for(name), args.concurrency, args.seconds, args.warmup) as bench:

        def stage(label: str, points: Sequence[Point]) -> Point:
            seen = {r.point for r in results}
            results.extend(bench.measure(p, sources[p.archive], label) for p in points if p not in seen)
            best = pick([r for r in results if r.point in set(points)], bound_ms) or pick(results, None)
            assert best is not None
            return best.point

        best = stage("variants", [replace(shipped, archive=v) for v in variants])
        best = stage("batching", batching_points(best))
        stage("workers", worker_points(best, cores))
        stage("shipped", [shipped])
    chosen = pick(results, bound_ms)
    # The bar: the shipped keys on the winning archive against the best there whose p99 is no worse.
    on_best = replace(shipped, archive=chosen.point.archive) if chosen else shipped
    shipped_result = next(r for r in results if r.point == on_best)
    same_variant = pick([r for r in results if r.point.archive == on_best.archive], shipped_result.p99_ms)
    report = {
        "model": name,
        "p99_bound_ms": bound_ms,
        "concurrency": args.concurrency,
        "results": [{**asdict(r.point), **{k: v for k, v in asdict(r).items() if k != "point"}} for r in results],
        "chosen": asdict(chosen.point) if chosen else None,
        "shipped": asdict(shipped),
        "shipped_vs_best_same_archive": shipped_result.rate / same_variant.rate if same_variant else None,
        "shipped_vs_best": shipped_result.rate / chosen.rate if chosen else None,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report, results, chosen, shipped_result), encoding="utf-8")
    plot(results, chosen, bound_ms, out / "tune.png")
    return report


# Shipped keys must hold on any CPU: the kit's archive and the stock one, both repacked with the same keys, at
# several batch/delay settings and at the image sizes of `make bench-plain` (`make keys-vs-stock MODEL=...`).
STOCK_POINTS = ((4, 10), (8, 20), (16, 20), (16, 50))
STOCK_SIZES = {"resnet18": ("same", "640x480"), "mobilenet_v3_small": ("same", "640x480"), "fasterrcnn": ("same",)}


@dataclass(frozen=True)
class Pair:
    """The kit and the stock archive at one batch/delay setting on one image size."""

    batch: int
    delay_ms: int
    images: str
    stock: Result
    kit: Result

    @property
    def ratio(self) -> float:
        return self.kit.rate / self.stock.rate if self.stock.rate else 0.0


def safest(pairs: Sequence[Pair]) -> tuple[int, int] | None:
    """The batch/delay setting whose worst kit/stock ratio over the image sizes is highest (errors disqualify)."""
    worst: dict[tuple[int, int], float] = {}
    for p in pairs:
        ok = p.kit.errors == 0 and p.stock.errors == 0
        key = (p.batch, p.delay_ms)
        worst[key] = min(worst.get(key, float("inf")), p.ratio if ok else 0.0)
    return max(worst, key=lambda k: worst[k], default=None)


def against_stock(name: str, store: Path, stock_store: Path, out: Path, args: argparse.Namespace) -> list[Pair]:
    """Measure the kit's and the stock archive of ``name`` at every STOCK_POINTS setting, interleaved."""
    from bench_run import payload_sets

    cores = os.cpu_count() or 1
    kit_mar, stock_mar = store / f"{name}.mar", stock_store / f"{name}_stock.mar"
    for mar in (kit_mar, stock_mar):
        if not mar.is_file():
            raise SystemExit(f"{mar} is missing: run `make {mar}` first")
    shipped = shipped_point(name, read_document(kit_mar), cores)
    payloads = payload_sets()[1]
    pairs: list[Pair] = []
    out.mkdir(parents=True, exist_ok=True)
    with Bench(out / "server", payloads["same"], args.concurrency, args.seconds, args.warmup) as bench:
        for batch, delay in STOCK_POINTS:
            point = replace(shipped, batch=batch, delay_ms=delay)
            for images in STOCK_SIZES.get(name, ("same",)):
                stock = bench.measure(replace(point, archive=f"{name}_stock"), stock_mar, images, payloads[images])
                kit = bench.measure(point, kit_mar, images, payloads[images])
                pairs.append(Pair(batch, delay, images, stock, kit))
    return pairs


def stock_markdown(name: str, pairs: Sequence[Pair], shipped: tuple[int, int], concurrency: int) -> str:
    from bench_report import machine

    lines = [
        f"# make keys-vs-stock MODEL={name}",
        "",
        f"Machine: {machine()}. Closed loop at concurrency {concurrency}; the kit's archive and TorchServe's stock "
        "handler's, repacked with the same frontend keys, measured one after the other in one TorchServe.",
        "",
        "| batchSize | maxBatchDelay | images | stock req/s | kit req/s | kit / stock | stock p99 ms | kit p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        mark = " (shipped)" if (p.batch, p.delay_ms) == shipped else ""
        lines.append(
            f"| {p.batch}{mark} | {p.delay_ms} | {p.images} | {p.stock.rate:.1f} | {p.kit.rate:.1f} | {p.ratio:.2f}x "
            f"| {p.stock.p99_ms:.0f} | {p.kit.p99_ms:.0f} |"
        )
    best = safest(pairs)
    if best:
        lines += ["", f"Highest worst-case kit / stock: batchSize {best[0]}, maxBatchDelay {best[1]}."]
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any], results: Sequence[Result], chosen: Result | None, shipped: Result) -> str:
    from bench_report import machine

    bound = f"{report['p99_bound_ms']:.0f} ms" if report["p99_bound_ms"] else "none"
    lines = [
        f"# make tune MODEL={report['model']}",
        "",
        f"Machine: {machine()}. Closed loop at concurrency {report['concurrency']}; p99 bound: {bound}.",
        "",
        "| stage | archive | workers | threads | batchSize | maxBatchDelay | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r.point
        mark = " **(chosen)**" if chosen and r.point == chosen.point else ""
        lines.append(
            f"| {r.stage}{mark} | {p.archive} | {p.workers} | {p.threads} | {p.batch} | {p.delay_ms} | {r.rate:.1f} "
            f"| {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.errors} |"
        )
    where = shipped.point.archive
    lines += ["", f"Shipped settings on {where}: {shipped.rate:.1f} req/s, p99 {shipped.p99_ms:.0f} ms."]
    for key, what in (
        ("shipped_vs_best_same_archive", "the best on that archive with a p99 no worse"),
        ("shipped_vs_best", "the chosen best"),
    ):
        if report[key]:
            lines.append(f"Shipped / {what}: {report[key]:.2f}x.")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], chosen: Result | None, bound_ms: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in dict.fromkeys(r.stage for r in results):
        mine = [r for r in results if r.stage == stage]
        ax.scatter([r.p99_ms for r in mine], [r.rate for r in mine], label=stage)
    if chosen:
        ax.scatter([chosen.p99_ms], [chosen.rate], s=160, facecolors="none", edgecolors="red", label="chosen")
    if bound_ms:
        ax.axvline(bound_ms, color="gray", linestyle="--", label="p99 bound")
    ax.set(xlabel="p99 ms", ylabel="req/s", title="make tune: throughput against p99")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def advice(report: dict[str, Any]) -> str:
    """The model-config.yaml keys to set, as a user would paste them."""
    chosen = report["chosen"]
    if chosen is None:
        return "no setting kept p99 under the bound; raise P99_MS or add workers/cores"
    lines = [
        f"best: {chosen['archive']}.mar"
        + ("" if chosen["archive"] == report["model"] else f" (build it: make model_store/{chosen['archive']}.mar)"),
        "set in models/{}/model-config.yaml:".format(report["model"]),
        f"  minWorkers: {chosen['workers']}",
        f"  maxWorkers: {chosen['workers']}",
        f"  batchSize: {chosen['batch']}",
        f"  maxBatchDelay: {chosen['delay_ms']}",
        "  handler:",
        f"    threads: {chosen['threads']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--p99-ms", type=float, default=None)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--against-stock", type=Path, default=None, metavar="STOCK_STORE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    started = time.monotonic()
    if args.against_stock:
        out = args.out or Path("build/tune") / args.model
        pairs = against_stock(args.model, args.store, args.against_stock, out, args)
        document = read_document(args.store / f"{args.model}.mar")
        shipped = (int(document.get("batchSize", 1)), int(document.get("maxBatchDelay", 100)))
        text = stock_markdown(args.model, pairs, shipped, args.concurrency)
        (out / "against_stock.md").write_text(text, encoding="utf-8")
        logger.info("%s\nwrote %s in %.0f s", text, out / "against_stock.md", time.monotonic() - started)
        return 0
    out = args.out or Path("build/tune") / args.model
    report = run(args.model, args.store, out, args.p99_ms, args)
    logger.info("%s", advice(report))
    if report["chosen"] is not None:
        chosen = report["chosen"]
        machine = this_machine()
        path = record_choice(chosen["archive"], point_keys(Point(**chosen)), machine)
        logger.info(
            "tuned keys for this machine (%s) written to %s; `make serve` applies them here", machine.describe(), path
        )
    logger.info("wrote %s and tune.png in %.0f s", out / "results.md", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
