"""``make eval MODEL=<name> DATA=<path>``: the task metric of an archive, measured through a real server.

The archive ``model_store/<name>.mar`` is served by a TorchServe started from the shipped
``config.properties`` (free loopback ports, token auth on), or with ``--server triton`` its ensemble in
``model_repository/cpu`` by the bundled tritonserver. Every image of DATA is sent as the file it is (a JPEG
stays a JPEG), ``--concurrency`` at a time, with a progress bar; a file the server rejects is counted and
named in the report and the run goes on. The report, ``build/eval/<name>/report.md`` (``<name>-triton/`` for
Triton) with ``metrics.json``, ``answers.jsonl`` (each file's status and answer) and its pictures, names the
archive (and its sha256), the server, the machine and the data's digest.

    make eval MODEL=digits DATA=build/data/digits/test
    make eval MODEL=shapes DATA=build/data/shapes/val          # COCO AP through TorchServe
    make eval MODEL=shapes_seg DATA=build/data/shapes_seg/val SERVER=triton
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cli import error_line
from client import Reply
from eval_data import DataError, Dataset, load_dataset, read_mask
from eval_metrics import (
    Scores,
    answer_label_map,
    classification_scores,
    coco_results,
    detection_scores,
    pixel_confusion,
    segmentation_scores,
)
from servekit.errors import ConfigError

logger = logging.getLogger("evaluate")
Predict = Callable[[str, bytes], Reply]


@dataclass(frozen=True)
class Archive:
    """What a ``.mar`` serves: its task, labels and handler settings, read from inside it."""

    path: Path
    name: str
    task: str
    labels: tuple[str, ...]
    handler: Mapping[str, Any]
    sha256: str
    size: int

    def describe(self) -> str:
        model = self.handler.get("model", {})
        return (
            f"{self.path} ({self.size / 1e6:.1f} MB, sha256 {self.sha256[:16]}, {model.get('format', '?')} "
            f"{model.get('file', '')}{', ' + model['precision'] if model.get('precision') else ''})"
        )


def read_archive(path: Path) -> Archive:
    """The task, labels and handler section of a built archive, from its ``model-config.yaml``."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; `make archive MODEL={path.stem}` builds it")
    with zipfile.ZipFile(path) as mar:
        names = set(mar.namelist())
        document = yaml.safe_load(mar.read("model-config.yaml")) if "model-config.yaml" in names else None
        if not isinstance(document, dict) or not isinstance(document.get("handler"), dict):
            raise ConfigError(f"{path} holds no servekit model-config.yaml; it is not an archive of this kit")
        handler = document["handler"]
        labels_file = handler.get("labels", "labels.json")
        labels = json.loads(mar.read(labels_file)) if labels_file in names else []
    if isinstance(labels, dict):
        labels = [labels[k] for k in sorted(labels, key=int)]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    task = str(handler.get("task", "classification"))
    return Archive(path, path.stem, task, tuple(str(x) for x in labels), handler, digest, path.stat().st_size)


def read_folder(models: Path, name: str) -> Archive:
    """The same description from a model folder (the Triton repository is generated from it)."""
    document = yaml.safe_load((models / name / "model-config.yaml").read_text(encoding="utf-8"))
    handler = document["handler"]
    labels = json.loads((models / name / handler.get("labels", "labels.json")).read_text(encoding="utf-8"))
    folder = models / name
    digest = hashlib.sha256((folder / "model-config.yaml").read_bytes()).hexdigest()
    return Archive(folder, name, str(handler.get("task")), tuple(labels), handler, digest, 0)


# ---------------------------------------------------------------------------------------------- sending


def send_all(predict: Predict, model: str, dataset: Dataset, concurrency: int, label: str = "") -> list[Reply]:
    """Every sample's file, as it is on disk, ``concurrency`` at a time; replies in the samples' order. A
    connection error is that file's reply (status 599), never the end of the run."""
    from tqdm import tqdm

    def one(path: Path) -> Reply:
        try:
            return predict(model, path.read_bytes())
        except Exception as exc:  # a reset connection, a timeout: this file's failure, named in the report
            return Reply(599, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "code": 599})

    paths = [s.path for s in dataset.samples]
    with tqdm(total=len(paths), desc=label or model, unit="img", disable=None, file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            replies = []
            for reply in pool.map(one, paths):
                replies.append(reply)
                bar.update()
    return replies


@contextlib.contextmanager
def torchserve(store: Path, names: Sequence[str], workdir: Path, timeout: float = 600) -> Iterator[tuple[Predict, str]]:
    """A real TorchServe serving ``names`` from ``store`` (the shipped config, free loopback ports); yields
    a predict function and the server's description. Always stopped."""
    from client import KeyRing, RestClient
    from tsctl import started

    with started(workdir, store, names) as server:
        server.wait_ready(names, timeout=timeout)
        client = RestClient(server.endpoints, KeyRing(workdir / "key_file.json"))
        yield (
            client.predict,
            f"TorchServe {_version('torchserve')} at {server.endpoints.url('inference')} (REST, token auth on)",
        )


@contextlib.contextmanager
def triton(repository: Path, names: Sequence[str], workdir: Path) -> Iterator[tuple[Predict, str]]:
    """The bundled tritonserver over ``repository`` with the ensembles ``names``; always stopped."""
    from client import TritonClient
    from tritonctl import Triton, TritonEndpoints

    missing = [n for n in names if not (repository / n).is_dir()]
    if missing:
        raise ConfigError(f"{repository} has no ensemble {', '.join(missing)}; `make triton-repo` generates it")
    server = Triton(workdir, repository, list(names), TritonEndpoints.random())
    server.start()
    try:
        server.wait_ready()
        client = TritonClient(server.endpoints.http_url, "http")
        yield (
            client.predict,
            f"tritonserver (nvidia-pytriton {_version('nvidia-pytriton')}) at {server.endpoints.http_url} (HTTP)",
        )
    finally:
        server.stop()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Outcome:
    """The metric of one archive on one dataset, and the files the server would not answer."""

    scores: Scores
    answered: int
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {file, status, error}


def rejected_files(dataset: Dataset, replies: Sequence[Reply]) -> list[dict[str, Any]]:
    """The files whose reply was not a 2xx, with the server's status and message."""
    out = []
    for sample, reply in zip(dataset.samples, replies):
        if not reply.ok:
            body = reply.body if isinstance(reply.body, Mapping) else {"error": str(reply.body)}
            out.append({"file": str(sample.path), "status": reply.status, "error": str(body.get("error", body))[:300]})
    return out


def score(dataset: Dataset, replies: Sequence[Reply]) -> Outcome:
    """The task metric over the answered files; the rejected ones are counted and named apart."""
    kept = [(s, r.body) for s, r in zip(dataset.samples, replies) if r.ok]
    rejected = rejected_files(dataset, replies)
    if not kept:
        first = rejected[0] if rejected else {"file": "-", "status": "-", "error": "no samples"}
        raise ConfigError(
            f"the server answered none of the {len(replies)} images (e.g. {first['file']}: {first['status']} "
            f"{first['error'][:120]})"
        )
    if dataset.task == "classification":
        scores = classification_scores([int(s.truth) for s, _ in kept], [a for _, a in kept], dataset.labels)
    elif dataset.task == "detection":
        ids = [int(s.truth) for s, _ in kept]
        results = coco_results(ids, [a for _, a in kept], dataset.labels, dataset.category_names)
        scores = detection_scores(dataset.coco or {}, results, ids)
    else:
        confusion = np.zeros((len(dataset.labels), len(dataset.labels) + 1), dtype=np.int64)
        for sample, answer in kept:
            truth = read_mask(Path(sample.truth))
            confusion += pixel_confusion(truth, answer_label_map(answer), len(dataset.labels), dataset.ignore_index)
        scores = segmentation_scores(confusion, dataset.labels)
    return Outcome(scores, len(kept), rejected)


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    from bench_report import machine as describe

    return describe()


def format_value(name: str, value: float) -> str:
    return f"{value:.0f}" if name == "images" else f"{value:.4f}"


def report_document(
    archive: Archive, dataset: Dataset, outcome: Outcome, server: str, *, seconds: float, concurrency: int
) -> dict[str, Any]:
    """``metrics.json``: everything the report says, machine-readable."""
    return {
        "model": archive.name,
        "archive": {
            "path": str(archive.path),
            "sha256": archive.sha256,
            "bytes": archive.size,
            "handler": dict(archive.handler),
        },
        "server": server,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": {
            "path": str(dataset.root),
            "layout": dataset.layout,
            "sha256": dataset.digest(),
            "images": len(dataset.samples),
            "unmatched_classes": list(dataset.unmatched),
        },
        "headline": outcome.scores.headline,
        "metrics": outcome.scores.metrics,
        "per_class": {"name": outcome.scores.per_class_name, "values": outcome.scores.per_class},
        "answered": outcome.answered,
        "rejected": outcome.rejected,
        "excluded": [{"file": f, "why": why} for f, why in dataset.excluded],
        "seconds": round(seconds, 2),
        "concurrency": concurrency,
    }


def report_markdown(doc: Mapping[str, Any], pictures: Sequence[str]) -> str:
    """``report.md`` from :func:`report_document`'s dict."""
    data, metrics = doc["data"], doc["metrics"]
    lines = [
        f"# Evaluation of {doc['model']}",
        "",
        f"- archive: `{doc['archive']['path']}` (sha256 `{doc['archive']['sha256']}`)",
        f"- server: {doc['server']}, concurrency {doc['concurrency']}",
        f"- machine: {doc['machine']}",
        f"- data: `{data['path']}` ({data['layout']}, {data['images']} images, sha256 `{data['sha256']}`)",
        f"- answered {doc['answered']} of {data['images']}; rejected by the server: {len(doc['rejected'])}; "
        f"left out by the layout: {len(doc['excluded'])}; {doc['seconds']:.1f} s; {doc['date']}",
    ]
    if data["unmatched_classes"]:
        lines.append(
            f"- classes of the data the model has no label for (not scored): {', '.join(data['unmatched_classes'])}"
        )
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [
        f"| {'**' + k + '**' if k == doc['headline'] else k} | {format_value(k, v)} |" for k, v in metrics.items()
    ]
    per_class = doc["per_class"]
    if per_class["values"]:
        lines += ["", f"| class | {per_class['name']} |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in per_class["values"].items()]
    for title, rows, keys in (
        ("Rejected by the server", doc["rejected"], ("file", "status", "error")),
        ("Left out by the layout", doc["excluded"], ("file", "why")),
    ):
        if rows:
            lines += ["", f"## {title} ({len(rows)})", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r[k]).replace("|", "/") for k in keys) + " |" for r in rows]
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pictures]
    return "\n".join(lines) + "\n"


def draw_pictures(scores: Scores, out: Path) -> list[Path]:
    """The confusion matrix (classification, segmentation as row shares) and the per-class bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if scores.confusion and len(scores.confusion) <= 40:
        matrix = np.asarray(scores.confusion, dtype=np.float64)
        shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        size = max(4.0, 0.35 * matrix.shape[1] + 2)
        fig, ax = plt.subplots(figsize=(size, size * matrix.shape[0] / matrix.shape[1] + 0.8))
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(matrix.shape[1]), scores.confusion_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), scores.confusion_labels[: matrix.shape[0]], fontsize=7)
        ax.set_xlabel("answered")
        ax.set_ylabel("truth")
        if matrix.shape[1] <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                if value:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_title("confusion (row shares)")
        fig.tight_layout()
        written.append(out / "confusion.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if scores.per_class and len(scores.per_class) <= 60:
        names = list(scores.per_class)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(names) + 2), 3.2))
        ax.bar(range(len(names)), [scores.per_class[n] for n in names], color="#1f77b4")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(scores.per_class_name)
        fig.tight_layout()
        written.append(out / "per_class.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(out: Path, doc: Mapping[str, Any], scores: Scores) -> Path:
    """``metrics.json``, the pictures and ``report.md`` under ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    pictures = draw_pictures(scores, out)
    (out / "report.md").write_text(report_markdown(doc, [str(p) for p in pictures]), encoding="utf-8")
    return out / "report.md"


def write_answers(path: Path, dataset: Dataset, replies: Sequence[Reply]) -> Path:
    """Every file's status and answer as the server sent it, one JSON line each (``answers.jsonl``)."""
    with path.open("w", encoding="utf-8") as out:
        for sample, reply in zip(dataset.samples, replies):
            out.write(json.dumps({"file": str(sample.path), "status": reply.status, "answer": reply.body}) + "\n")
    return path


def summary_line(name: str, doc: Mapping[str, Any], report: Path) -> str:
    """The one line ``make eval`` ends with."""
    metrics = doc["metrics"]
    shown = ", ".join(f"{k} {format_value(k, v)}" for k, v in metrics.items() if k != "images")
    rejected = f"; {len(doc['rejected'])} rejected" if doc["rejected"] else ""
    excluded = f"; {len(doc['excluded'])} left out" if doc["excluded"] else ""
    return f"{name}: {shown} on {doc['answered']} images{rejected}{excluded} -> {report}"


# ---------------------------------------------------------------------------------------------- entry point


def evaluate(
    name: str,
    data: Path,
    *,
    server: str = "torchserve",
    store: Path = Path("model_store"),
    models: Path = Path("models"),
    repository: Path = Path("model_repository/cpu"),
    out: Path = Path("build/eval"),
    concurrency: int = 8,
    label_map: Path | None = None,
    images: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Serve ``name``, send it ``data`` and score its answers; returns the report's dict and path."""
    import time

    archive = read_archive(store / f"{name}.mar") if server == "torchserve" else read_folder(models, name)
    dataset = load_dataset(data, archive.task, archive.labels, label_map=label_map, images=images)
    for file, why in dataset.excluded[:5]:
        logger.warning("left out %s: %s", file, why)
    if len(dataset.excluded) > 5:
        logger.warning("... and %d more left out (listed in the report)", len(dataset.excluded) - 5)
    workdir = out / name / "server"
    started = time.perf_counter()
    serving = torchserve(store, [name], workdir) if server == "torchserve" else triton(repository, [name], workdir)
    with serving as (predict, description):
        ready = time.perf_counter()
        logger.info("%s ready in %.0f s; sending %d files", description, ready - started, len(dataset.samples))
        replies = send_all(predict, name, dataset, concurrency)
        logger.info("answered in %.1f s", time.perf_counter() - ready)
    outcome = score(dataset, replies)
    target = out / (name if server == "torchserve" else f"{name}-{server}")
    target.mkdir(parents=True, exist_ok=True)
    write_answers(target / "answers.jsonl", dataset, replies)
    doc = report_document(
        archive, dataset, outcome, description, seconds=time.perf_counter() - started, concurrency=concurrency
    )
    return doc, write_report(target, doc, outcome.scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the archive model_store/<name>.mar (or the Triton ensemble <name>)")
    parser.add_argument("data", type=Path, help="ImageFolder or CSV, COCO JSON (or its folder), images + masks")
    parser.add_argument("--server", choices=("torchserve", "triton"), default="torchserve")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--out", type=Path, default=Path("build/eval"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--label-map", type=Path, default=None, help="JSON or CSV: data class name -> model label")
    parser.add_argument("--images", type=Path, default=None, help="COCO: the folder of the images it lists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("evaluate").setLevel(logging.INFO)
    try:
        doc, report = evaluate(
            args.name,
            args.data,
            server=args.server,
            store=args.store,
            out=args.out,
            concurrency=args.concurrency,
            label_map=args.label_map,
            images=args.images,
        )
    except (DataError, ConfigError) as exc:
        sys.stderr.write(error_line(exc, f"evaluate {args.name}") + "\n")
        return 2
    except Exception as exc:  # a server that does not start: one line, the logs named in it
        sys.stderr.write(error_line(exc, f"evaluate {args.name}") + "\n")
        return 2
    sys.stdout.write(summary_line(args.name, doc, report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
