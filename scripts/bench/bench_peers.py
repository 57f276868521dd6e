"""``make bench-peers``: the kit against LitServe and Ray Serve, the same weights, images and client.

What users leaving TorchServe pick instead (pytorch/serve #3396; LitServe #454; vitrivr-engine #142), each written
the way its own docs write an image classifier, in ``scripts/bench/peers/`` (no kit code there), run from their
own venv (``build/peers/venv``: LitServe, Ray Serve; torch and torchvision seen from the kit's venv through a
``.pth`` file, so every side runs the same torch build). Sides:

- the kit's archive as ``make archive`` builds it (``model_store/<model>.mar``: the folder's model, or the variant
  ``make variants`` chose for it) and its ONNX Runtime archive, on TorchServe with the shipped config (token
  auth on);
- LitServe (``max_batch_size`` 8, ``batch_timeout`` 10 ms, multipart upload) and Ray Serve (``@serve.batch`` 8 /
  10 ms, raw body), each with its batching keys.

Each side is measured in two process layouts on this machine's cores (N single-thread processes, one process of N
threads; TorchServe's workers and the handler's ``threads``, LitServe's ``workers_per_device``, Ray's replicas) at
the middle image size, and keeps its better one. Then rounds, the sides in a rotating order, each side started,
warmed, loaded at every size (closed loop, ``--concurrency`` clients, raw JPEG bytes) and stopped, so that one
side never runs beside another. Per point: req/s, p50, p99, and the CPU seconds the side's whole process tree
(frontend, workers, Ray's raylet and proxies) spent per answered request. Each side's answer to each image is
checked against the kit's (top-1 index, top-5 scores). Writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import requests

from client import Reply
from loadgen import closed_loop

logger = logging.getLogger("bench-peers")
PEERS_DIR = Path(__file__).resolve().parent / "peers"
VENV = Path("build/peers/venv")
SIZES = ("chelsea_451x300.jpg", "photo_640x480.jpg", "phone_4032x3024.jpg")
PEER_BATCH, PEER_BATCH_TIMEOUT_S = 8, 0.01  # the peers' docs' settings, and the kit's batchSize


@dataclass(frozen=True)
class Layout:
    """Processes x intra-op threads per process."""

    workers: int
    threads: int

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.threads}"


def layouts(cores: int) -> tuple[Layout, Layout]:
    """The two documented layouts on ``cores``: one single-thread process per core, one process of every core."""
    return Layout(cores, 1), Layout(1, cores)


@dataclass
class Point:
    """One side at one image size in one round."""

    side: str
    layout: str
    size: str
    round: int
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    errors: int


@dataclass
class Answer:
    """A side's first answer to an image: top-5 (index, score), best first."""

    side: str
    size: str
    status: int
    top5: list[tuple[int, float]] = field(default_factory=list)


def top5_of(body: Any) -> list[tuple[int, float]]:
    """The (index, score) pairs of a classification answer: the kit's ``{label, index, score}`` list, which the
    peers were written to answer too."""
    if isinstance(body, list):
        return [(int(item["index"]), float(item["score"])) for item in body[:5]]
    return []


def agreement(kit: Answer, other: Answer) -> tuple[bool, float]:
    """Same top-1 index, and the largest score difference over the kit's top-5 indices the other also ranks."""
    theirs = dict(other.top5)
    shared = [abs(score - theirs[index]) for index, score in kit.top5 if index in theirs]
    same = bool(kit.top5 and other.top5 and kit.top5[0][0] == other.top5[0][0])
    return same, max(shared, default=float("nan"))


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every process below it, now (a process gone is left out)."""
    import psutil

    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


class Side(Protocol):
    name: str
    layout: Layout

    def __enter__(self) -> Side: ...

    def __exit__(self, *exc: object) -> None: ...

    def send(self, payload: bytes) -> Reply: ...

    def root(self) -> int: ...


class KitSide:
    """An archive on its own TorchServe (the shipped config on free loopback ports, token auth on), repacked
    with the layout's workers and threads; its other keys as the archive ships them."""

    def __init__(self, name: str, archive: Path, layout: Layout, workdir: Path) -> None:
        self.name, self.archive, self.layout, self.workdir = name, archive, layout, workdir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> KitSide:
        from profiles import read_document
        from tune import Bench, shipped_point

        shipped = shipped_point(self.archive.stem, read_document(self.archive), os.cpu_count() or 1)
        point = replace(shipped, workers=self.layout.workers, threads=self.layout.threads)
        self.bench = self._stack.enter_context(Bench(self.workdir, [], 1, 0, 0))
        self.model = self._stack.enter_context(self.bench.registered(point, self.archive))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def send(self, payload: bytes) -> Reply:
        return self.bench.client.predict(self.model, payload)

    def root(self) -> int:
        return int(self.bench.server.pgid_file.read_text())


class PeerSide:
    """A peer's app file run by the peers' venv Python in its own session, on a free loopback port."""

    def __init__(self, name: str, script: str, layout: Layout, *, python: Path, weights: Path, arch: str, logs: Path):
        self.name, self.script, self.layout, self.python = name, script, layout, python
        self.weights, self.arch, self.logs = weights, arch, logs
        self._local = threading.local()

    def __enter__(self) -> PeerSide:
        from tsctl import free_ports

        self.port = free_ports(1)[0]
        env = {
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "PEER_WEIGHTS": str(self.weights.resolve()),
            "PEER_ARCH": self.arch,
            "PEER_PORT": str(self.port),
            "PEER_WORKERS": str(self.layout.workers),
            "PEER_THREADS": str(self.layout.threads),
            "PEER_BATCH": str(PEER_BATCH),
            "PEER_BATCH_TIMEOUT": str(PEER_BATCH_TIMEOUT_S),
            "RAY_USAGE_STATS_ENABLED": "0",  # no usage report leaves the machine
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's agents on 127.0.0.1, not the host's address
        }
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.name}-{self.layout.label}.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.python), str(PEERS_DIR / self.script)],
                cwd=PEERS_DIR,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}/predict"
        return self

    def wait_ready(self, payload: bytes, timeout: float = 180.0) -> None:
        """Until the first image is answered (a peer's health route can answer before its workers load)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}: see {self.logs}")
            with contextlib.suppress(requests.RequestException):
                if self.send(payload).status == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not answer within {timeout:.0f} s: see {self.logs}")
            time.sleep(1.0)

    def __exit__(self, *exc: object) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            tree = [self.process.pid, *(p.pid for p in psutil.Process(self.process.pid).children(recursive=True))]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:  # a process that left the session (Ray's workers) still goes
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def send(self, payload: bytes) -> Reply:
        if self.script.startswith("litserve"):
            reply = self._session().post(self.url, files={"content": ("image.jpg", payload, "image/jpeg")}, timeout=120)
        else:
            reply = self._session().post(self.url, data=payload, timeout=120)
        try:
            return Reply(reply.status_code, reply.json())
        except ValueError:
            return Reply(reply.status_code, reply.text)

    def root(self) -> int:
        return self.process.pid


def peers_python(venv: Path = VENV) -> Path:
    """The peers' venv (made once per requirements file): LitServe and Ray Serve on top of the kit's torch."""
    requirements = PEERS_DIR / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    python, stamp = venv.absolute() / "bin" / "python", venv / f".installed-{digest}"
    if stamp.is_file():
        return python
    logger.info("creating %s with %s (a minute; pip's output in %s)", venv, requirements.name, venv / "pip.log")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import sysconfig

    Path(purelib, "servekit_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    with open(venv / "pip.log", "wb") as log:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-r", str(requirements)], stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise SystemExit(f"installing the peers failed: see {venv / 'pip.log'}")
    stamp.touch()
    return python


@dataclass(frozen=True)
class Load:
    """The closed loop of every point: clients, seconds measured, seconds of warm-up before."""

    concurrency: int
    seconds: float
    warmup: float


def measure(side: Side, payload: bytes, size: str, round_: int, load_: Load) -> Point:
    """Closed loop on ``side`` with ``payload``; CPU of its process tree over the measured window."""
    marks: dict[str, float] = {}

    def send(number: int) -> int:
        return side.send(payload).status

    def warm() -> None:
        marks["cpu"] = tree_cpu_seconds(side.root())

    load = closed_loop(send, concurrency=load_.concurrency, seconds=load_.seconds, warmup=load_.warmup, on_warm=warm)
    cpu = tree_cpu_seconds(side.root()) - marks.get("cpu", 0.0)
    point = Point(
        side.name,
        side.layout.label,
        size,
        round_,
        load.rate,
        load.percentile(50),
        load.percentile(99),
        1000.0 * cpu / max(1, load.count),
        load.errors,
    )
    logger.info(
        "[round %d] %-22s %-4s %-20s %6.1f req/s  p50 %5.0f ms  p99 %5.0f ms  CPU %5.1f ms/request  %d errors",
        round_,
        point.side,
        point.layout,
        size,
        point.rate,
        point.p50_ms,
        point.p99_ms,
        point.cpu_ms_per_request,
        point.errors,
    )
    return point


@dataclass
class Plan:
    sides: dict[str, Any]  # name -> factory(layout) -> Side
    payloads: dict[str, bytes]
    rounds: int
    load: Load
    cores: int


@contextlib.contextmanager
def running(plan: Plan, name: str, layout: Layout) -> Iterator[Side]:
    side = plan.sides[name](layout)
    with side:
        if isinstance(side, PeerSide):
            side.wait_ready(next(iter(plan.payloads.values())))
        yield side


@contextlib.contextmanager
def neighbours(count: int) -> Iterator[None]:
    """``count`` processes that each keep a core busy (a neighbour's work on a shared node), stopped after."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def run(plan: Plan) -> tuple[list[Point], list[Answer], dict[str, str]]:
    """The layout round at the middle size, then ``plan.rounds`` rounds of every size in a rotating order."""
    middle = SIZES[len(SIZES) // 2]
    points: list[Point] = []
    chosen: dict[str, Layout] = {}
    for name in plan.sides:
        tried: list[tuple[Point, Layout]] = []
        for layout in layouts(plan.cores):
            with running(plan, name, layout) as side:
                tried.append((measure(side, plan.payloads[middle], middle, 0, plan.load), layout))
        points.extend(point for point, _ in tried)
        chosen[name] = max((t for t in tried if t[0].errors == 0), key=lambda t: t[0].rate, default=tried[0])[1]
    answers: list[Answer] = []
    names = list(plan.sides)
    for round_ in range(1, plan.rounds + 1):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            with running(plan, name, chosen[name]) as side:
                for size, payload in plan.payloads.items():
                    if round_ == 1:
                        reply = side.send(payload)
                        answers.append(Answer(name, size, reply.status, top5_of(reply.body)))
                    points.append(measure(side, payload, size, round_, plan.load))
    return points, answers, {name: layout.label for name, layout in chosen.items()}


def medians(points: Sequence[Point]) -> dict[tuple[str, str], Point]:
    """Per (side, size), over the measuring rounds (round 0 chose the layouts): the median of each figure."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for point in points:
        if point.round > 0:
            groups.setdefault((point.side, point.size), []).append(point)
    summary = {}
    for key, group in groups.items():
        summary[key] = replace(
            group[0],
            round=len(group),
            rate=statistics.median(p.rate for p in group),
            p50_ms=statistics.median(p.p50_ms for p in group),
            p99_ms=statistics.median(p.p99_ms for p in group),
            cpu_ms_per_request=statistics.median(p.cpu_ms_per_request for p in group),
            errors=sum(p.errors for p in group),
        )
    return summary


def layout_lines(points: Sequence[Point], kept: dict[str, str]) -> list[str]:
    lines = [
        "| side | layout | req/s | p50 ms | p99 ms | CPU ms/request | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.round == 0:
            mark = "**kept**" if kept[p.side] == p.layout else ""
            lines.append(
                f"| {p.side} | {p.layout} | {p.rate:.1f} | {p.p50_ms:.0f} | {p.p99_ms:.0f} | "
                f"{p.cpu_ms_per_request:.1f} | {mark} |"
            )
    return lines


def size_lines(summary: dict[tuple[str, str], Point], sizes: Sequence[str], sides: Sequence[str]) -> list[str]:
    lines = [
        "| image | side | layout | req/s | p50 ms | p99 ms | CPU ms/request | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for p in (summary[(side, size)] for side in sides if (side, size) in summary):
            lines.append(
                f"| {size} | {p.side} | {p.layout} | {p.rate:.1f} | {p.p50_ms:.0f} | {p.p99_ms:.0f} | "
                f"{p.cpu_ms_per_request:.1f} | {p.errors} |"
            )
    return lines


def ratio_lines(summary: dict[tuple[str, str], Point], sizes: Sequence[str], sides: Sequence[str]) -> list[str]:
    """The kit's req/s over each peer's (above 1: the kit ahead) and CPU per request (below 1: the kit cheaper)."""
    kits = [s for s in sides if s.startswith("kit")]
    peers = [s for s in sides if not s.startswith("kit")]
    lines = ["| image | kit side | peer | req/s, kit / peer | CPU per request, kit / peer |", "|---|---|---|---|---|"]
    for size, kit, peer in ((size, kit, peer) for size in sizes for kit in kits for peer in peers):
        a, b = summary.get((kit, size)), summary.get((peer, size))
        if a and b and b.rate > 0 and b.cpu_ms_per_request > 0:
            cpu = a.cpu_ms_per_request / b.cpu_ms_per_request
            lines.append(f"| {size} | {kit} | {peer} | {a.rate / b.rate:.2f}x | {cpu:.2f} |")
    return lines


def answer_lines(answers: Sequence[Answer], reference_side: str) -> list[str]:
    lines = ["| image | side | status | same top-1 | largest top-5 score difference |", "|---|---|---|---|---|"]
    reference = {a.size: a for a in answers if a.side == reference_side}
    for answer in answers:
        if answer.side != reference_side and answer.size in reference:
            same, diff = agreement(reference[answer.size], answer)
            verdict = "yes" if same else "no"
            lines.append(f"| {answer.size} | {answer.side} | {answer.status} | {verdict} | {diff:.1e} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    points = [Point(**p) for p in report["points"]]
    summary = medians(points)
    sides = list(report["layouts"])
    answers = [Answer(**{**a, "top5": [tuple(t) for t in a["top5"]]}) for a in report["answers"]]
    return (
        "\n".join(
            [
                f"# The kit against LitServe and Ray Serve: {report['model']}",
                "",
                f"Command: `{report['command']}` ({report['date']}). Machine: {report['machine']}."
                + (
                    f" **{report['neighbours']} busy neighbour process(es) ran beside every side.**"
                    if report.get("neighbours")
                    else ""
                ),
                f"Closed loop, {report['concurrency']} concurrent clients, {report['seconds']:.0f} s measured "
                f"after {report['warmup']:.0f} s of warm-up per point; {report['rounds']} rounds, sides in a "
                "rotating order, one side running at a time; figures are the medians over the rounds. CPU per "
                "request: the CPU seconds of the side's whole process tree in the measured window over the "
                "requests answered in it.",
                "",
                "Sides: " + "; ".join(f"{k}: {v}" for k, v in report["peers"].items()) + ".",
                "",
                f"## Process layouts (workers x threads, at {SIZES[len(SIZES) // 2]}, round 0)",
                "",
                *layout_lines(points, report["layouts"]),
                "",
                "## Every size",
                "",
                *size_lines(summary, report["sizes"], sides),
                "",
                "## Ratios, the kit's over each peer's (same run)",
                "",
                *ratio_lines(summary, report["sizes"], sides),
                "",
                f"## Answers against {sides[0]}'s (first answer of round 1)",
                "",
                *answer_lines(answers, sides[0]),
            ]
        )
        + "\n"
    )


def kit_archives(model: str, store: Path, models: Path) -> dict[str, Path]:
    """``make archive``'s archive (the folder's choice of ``make variants`` when it recorded one: named so), and
    the ONNX Runtime archive when it is built."""
    choice = models / model / "variant.yaml"
    label = "kit"
    if choice.is_file():
        import yaml

        label = f"kit {yaml.safe_load(choice.read_text(encoding='utf-8')).get('kind', 'chosen')} (chosen)"
    archives = {label: store / f"{model}.mar"}
    if (store / f"{model}_onnx.mar").is_file():
        archives["kit onnx"] = store / f"{model}_onnx.mar"
    if not archives[label].is_file():
        raise SystemExit(f"missing {archives[label]}: run `make archive MODEL={model}` first")
    return archives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier's folder (state_dict)")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/bench-peers"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--sides", default="", help="a subset of the sides, comma-separated (kit, litserve, ray)")
    parser.add_argument("--neighbours", type=int, default=0, help="busy processes beside every side (a shared node)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import yaml

    import demo_models
    from bench_report import machine

    folder = args.models / args.model
    handler = yaml.safe_load((folder / "model-config.yaml").read_text(encoding="utf-8"))["handler"]
    arch, weights = handler["model"].get("architecture", ""), folder / handler["model"]["file"]
    if handler.get("task") != "classification" or handler["model"].get("format") != "state_dict" or not arch:
        raise SystemExit(f"make bench-peers serves a torchvision classifier's state_dict; {folder} is not one")
    python = peers_python()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    sides: dict[str, Any] = {}
    for name, archive in kit_archives(args.model, args.store, args.models).items():
        sides[name] = lambda layout, name=name, archive=archive: KitSide(name, archive, layout, args.out / "torchserve")
    for name, script in (("litserve", "litserve_app.py"), ("ray serve", "ray_app.py")):
        sides[name] = lambda layout, name=name, script=script: PeerSide(
            name, script, layout, python=python, weights=weights, arch=arch, logs=args.out / "logs"
        )
    if args.sides:
        wanted = {s.strip() for s in args.sides.split(",")}
        sides = {k: v for k, v in sides.items() if k.split()[0] in wanted}
    payloads = {size: demo_models.user_image(size) for size in SIZES}
    plan = Plan(sides, payloads, args.rounds, Load(args.concurrency, args.seconds, args.warmup), cores)
    with neighbours(args.neighbours):
        points, answers, chosen = run(plan)
    report = {
        "model": args.model,
        "command": " ".join(["scripts/bench/bench_peers.py", *(argv if argv is not None else sys.argv[1:])])
        + " (what make bench-peers runs)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "neighbours": args.neighbours,
        "sizes": list(SIZES),
        "peers": {
            "litserve": f"LitServe (max_batch_size {PEER_BATCH}, batch_timeout {PEER_BATCH_TIMEOUT_S * 1000:.0f} ms, "
            "workers_per_device, multipart upload)",
            "ray serve": f"Ray Serve (@serve.batch {PEER_BATCH} / {PEER_BATCH_TIMEOUT_S * 1000:.0f} ms, num_replicas, "
            f"max_ongoing_requests {2 * PEER_BATCH}, raw body)",
            "kit": "TorchServe 0.12.0 with the archive's own batchSize and maxBatchDelay",
        },
        "layouts": chosen,
        "points": [asdict(p) for p in points],
        "answers": [asdict(a) for a in answers],
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out / "results.md").write_text(markdown(report), encoding="utf-8")
    logger.info("wrote %s", args.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
