"""``make demo``: serve every archive with the shipped config, send real requests, print the answers, stop.

The server runs from ``build/demo/`` on free loopback ports (so it never collides with ``make serve``);
every other setting is the shipped ``config.properties``, token authorization included.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import requests

import demo_models
import shapes
import shapes_eval
import shapes_seg
from client import GrpcClient, KeyRing, Reply, RestClient, predict_many
from loadgen import metric_samples
from servekit.config import read_model_config
from tsctl import TorchServe, derive_config, random_endpoints

logger = logging.getLogger("demo")
MODELS = (
    *("digits", "resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes", "shapes_seg"),
    *("timm_convnext", "hf_vit", "hf_rtdetr"),
)
ZOO = {"timm_convnext": "timm convnext_atto", "hf_vit": "Hugging Face ViTForImageClassification"}
SHAPE_SCENES = 4


def show(title: str, reply: Reply, top: int = 3) -> None:
    """Log one reply compactly: status and its first ``top`` items."""
    body = reply.body[:top] if isinstance(reply.body, list) else reply.body
    logger.info("  %-28s %d %s", title, reply.status, json.dumps(body))


def batch_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """Servekit* counters per model from the Prometheus endpoint."""
    found: dict[str, dict[str, float]] = {}
    for name, labels, value in metric_samples(requests.get(f"{metrics_url}/metrics", timeout=10).text):
        if name.startswith("Servekit") and "ModelName" in labels:
            found.setdefault(labels["ModelName"], {})[name.removeprefix("Servekit")] = value
    return found


def detect_shapes(rest: RestClient, workdir: Path) -> None:
    """The detector trained here, on held-out generated scenes of mixed sizes; the boxes drawn to a PNG."""
    logger.info("Shapes (a detector trained here by `make models`; held-out scenes of mixed sizes, one batch)")
    scenes = shapes.held_out(SHAPE_SCENES)
    replies = predict_many(rest, "shapes", [shapes.encode_jpeg(s.image) for s in scenes], concurrency=SHAPE_SCENES)
    drawn = []
    for scene, reply in zip(scenes, replies):
        height, width = scene.image.shape[:2]
        truth = ", ".join(sorted(shapes.CLASSES[k] for k in scene.classes.tolist()))
        show(f"shapes REST {width}x{height} ({truth})", reply, top=2)
        drawn.append(shapes_eval.draw_answer(scene.image, reply.body if reply.status == 200 else []))
    target = workdir / "detections.png"
    target.write_bytes(demo_models.encode(shapes_eval.mosaic(drawn), "PNG"))
    logger.info("  boxes drawn on the %d scenes: %s", len(scenes), target.resolve())


def segment_shapes(rest: RestClient, workdir: Path) -> None:
    """The segmenter trained here, on held-out scenes of mixed sizes; the masks drawn over them to a PNG."""
    logger.info("Segmentation (trained here by `make models`; a class per pixel, answered per class as COCO RLE)")
    scenes = shapes.held_out(SHAPE_SCENES)
    jpegs = [shapes.encode_jpeg(s.image) for s in scenes]
    replies = predict_many(rest, "shapes_seg", jpegs, concurrency=SHAPE_SCENES)
    drawn = []
    for scene, reply in zip(scenes, replies):
        height, width = scene.image.shape[:2]
        if reply.status != 200:
            show(f"shapes_seg REST {width}x{height}", reply)
            continue
        classes = ", ".join(f"{c['label']} {c['area'] * 100:.1f} %" for c in reply.body["classes"])
        size = len(json.dumps(reply.body))
        logger.info("  %-28s %d %s (%d bytes)", f"shapes_seg REST {width}x{height}", reply.status, classes, size)
        drawn.append(shapes_seg.draw_answer(scene.image, reply.body))
    target = workdir / "segmentation.png"
    target.write_bytes(demo_models.encode(shapes_eval.mosaic(drawn), "PNG"))
    logger.info("  masks drawn over the %d scenes: %s", len(drawn), target.resolve())


def draw_explanation(image: np.ndarray, explanation: dict[str, Any]) -> Any:
    """The image (a [3, H, W] uint8 tensor, as the mosaic takes) with the explanation's grid as a red heat
    overlay over the box it covers."""
    import torch
    import torch.nn.functional as F

    x0, y0, x1, y1 = explanation["box"]
    grid = torch.tensor(explanation["grid"], dtype=torch.float32)[None, None]
    heat = F.interpolate(grid, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = image.astype(np.float32).copy()
    region = out[y0:y1, x0:x1]
    alpha = 0.6 * heat[..., None]
    red = np.array([255.0, 40.0, 0.0])
    out[y0:y1, x0:x1] = region * (1 - alpha) + red * alpha
    return torch.from_numpy(out.clip(0, 255).astype(np.uint8)).permute(2, 0, 1)


def explain_shapes(rest: RestClient, grpc_client: GrpcClient, workdir: Path) -> None:
    """Explanations of the trained segmenter (occlusion) and digits CNN (Grad-CAM): the grid, drawn to a PNG."""
    logger.info("Explanations (a 14x14 grid per image: where the evidence for one class lies)")
    scenes = shapes.held_out(SHAPE_SCENES)
    drawn = []
    for scene in scenes:
        label = shapes.CLASSES[int(scene.classes[0])]
        reply = rest.explain("shapes_seg", shapes.encode_jpeg(scene.image), target=label)
        if reply.status != 200:
            show("shapes_seg /explanations", reply)
            continue
        body = reply.body["explanation"]
        size = len(json.dumps(reply.body))
        logger.info(
            "  %-28s %d %s for %s (score %.3f), %dx%d grid, %d bytes",
            "shapes_seg /explanations",
            reply.status,
            body["method"],
            label,
            body["target"]["score"],
            len(body["grid"]),
            len(body["grid"][0]),
            size,
        )
        drawn.append(draw_explanation(scene.image, body))
    images, labels = demo_models.digit_images("test")
    for image, label in list(zip(images, labels))[:2]:
        reply = grpc_client.explain("digits", demo_models.encode(image, "PNG"))
        body = reply.body.get("explanation", reply.body) if isinstance(reply.body, dict) else reply.body
        logger.info(
            "  %-28s %d %s, target %s (true %d)",
            "digits gRPC explain",
            reply.status,
            body.get("method"),
            body.get("target"),
            label,
        )
    target = workdir / "explanations.png"
    target.write_bytes(demo_models.encode(shapes_eval.mosaic(drawn), "PNG"))
    logger.info("  explanations drawn over the %d scenes: %s", len(drawn), target.resolve())


def quality_summary(metrics_url: str, workdir: Path) -> None:
    """The model-quality series of each model (TorchServe's Prometheus endpoint), as the dashboard shows them,
    logged and drawn to a PNG."""
    series: dict[str, dict[str, float]] = {}
    for name, found, value in metric_samples(requests.get(f"{metrics_url}/metrics", timeout=10).text):
        if not name.startswith("Servekit"):
            continue
        extra = next((f"{k}={found[k]}" for k in ("Class", "ErrorClass", "Aspect", "Scale") if k in found), "")
        key = f"{name}[{extra}]" if extra else name
        if "le" in found:
            continue
        model = series.setdefault(found.get("ModelName", "?"), {})
        model[key] = model.get(key, 0.0) + value
    logger.info("Model-quality metrics of these requests (Prometheus endpoint; deploy/monitoring has the dashboard)")
    for model, values in sorted(series.items()):

        def mean(name: str, values: dict[str, float] = values) -> str:
            count = values.get(f"{name}_count", 0.0)
            return f"{values.get(f'{name}_sum', 0.0) / count:.3f}" if count else "-"

        def top(prefix: str, values: dict[str, float] = values) -> str:
            found = sorted(((v, k) for k, v in values.items() if k.startswith(prefix)), reverse=True)[:3]
            return ", ".join(f"{k[len(prefix) + 1 : -1].split('=', 1)[1]} {v:.0f}" for v, k in found) or "-"

        logger.info(
            "  %-18s images %4.0f, mean top-1 %s, brightness %s, MP %s; classes: %s; errors: %s; decode 1/%s",
            model,
            values.get("ServekitImageBrightness_count", 0.0),
            mean("ServekitTop1Confidence"),
            mean("ServekitImageBrightness"),
            mean("ServekitImageMegapixels"),
            top("ServekitAnswers"),
            top("ServekitBadInputs"),
            top("ServekitDecodeScale"),
        )
    target = workdir / "quality.png"
    draw_quality(series, target)
    logger.info("  the dashboard's panels for these requests, drawn from the scrape: %s", target.resolve())


def draw_quality(series: dict[str, dict[str, float]], path: Path) -> None:
    """Six of the Grafana dashboard's panels (deploy/monitoring/grafana-dashboard.json) as bars, from one scrape:
    Grafana draws them over time from Prometheus; here they are the totals of the demo's requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, v in sorted(series.items()) if v.get("ServekitImageBrightness_count")]

    def mean(model: str, name: str) -> float:
        values = series[model]
        return values.get(f"{name}_sum", 0.0) / max(values.get(f"{name}_count", 0.0), 1.0)

    def labelled(model: str, prefix: str) -> dict[str, float]:
        return {k[len(prefix) + 1 : -1].split("=", 1)[1]: v for k, v in series[model].items() if k.startswith(prefix)}

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = [
        ("Mean top-1 confidence", [mean(m, "ServekitTop1Confidence") for m in models]),
        ("Mean image brightness", [mean(m, "ServekitImageBrightness") for m in models]),
        ("Mean input megapixels", [mean(m, "ServekitImageMegapixels") for m in models]),
        ("Images", [series[m].get("ServekitImageBrightness_count", 0.0) for m in models]),
    ]

    def bars(ax: Any, names: list[str], values: list[float], color: str, title: str) -> None:
        ax.barh(range(len(names)), values, color=color)
        ax.set_yticks(range(len(names)), names)  # positions: labels such as "4" stay names, not numbers
        ax.set_title(title, fontsize=10)

    for ax, (title, values) in zip(axes.flat, panels):
        bars(ax, models, values, "#3b7dd8", title)
    for ax, (title, prefix) in zip(
        list(axes.flat)[4:],
        (("Bad inputs by error class", "ServekitBadInputs"), ("Answers per class (digits)", "ServekitAnswers")),
    ):
        counts: dict[str, float] = {}
        for model in models if prefix == "ServekitBadInputs" else ["digits"]:
            for key, value in labelled(model, prefix).items():
                counts[key] = counts.get(key, 0.0) + value
        bars(ax, list(counts), list(counts.values()), "#d8733b", title)
    fig.suptitle("servekit model quality: the dashboard's panels for the make demo requests (one scrape)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def kserve_bodies(base: str, keys: KeyRing, images: list[bytes]) -> None:
    """KServe v1 and Open Inference Protocol v2 bodies, three images in one request each."""
    logger.info("KServe bodies on TorchServe's own KServe paths (three digits in one request each)")
    encoded = [base64.b64encode(image).decode() for image in images]
    headers = {"Authorization": f"Bearer {keys.inference}", "Content-Type": "application/json"}
    v1 = {"instances": [{"data": e} for e in encoded]}
    reply = requests.post(f"{base}/v1/models/digits:predict", json=v1, headers=headers, timeout=60)
    top = [answer[0]["label"] for answer in reply.json().get("predictions", [])]
    logger.info("  %-28s %d predictions, top-1 %s", "v1 /v1/models/digits:predict", reply.status_code, top)
    tensor = {"name": "images", "shape": [len(encoded)], "datatype": "BYTES", "data": encoded}
    reply = requests.post(
        f"{base}/v2/models/digits/infer", json={"id": "demo-1", "inputs": [tensor]}, headers=headers, timeout=60
    )
    body = reply.json()
    outputs = body.get("outputs", [{}])[0]
    top = [json.loads(answer)[0]["label"] for answer in outputs.get("data", [])]
    logger.info(
        "  %-28s %d id %s, %s %s, top-1 %s",
        "v2 /v2/models/digits/infer",
        reply.status_code,
        body.get("id"),
        outputs.get("datatype"),
        outputs.get("shape"),
        top,
    )
    v1["instances"].append({"data": "bm90IGFuIGltYWdl"})
    reply = requests.post(f"{base}/predictions/digits", json=v1, headers=headers, timeout=60)
    logger.info("  %-28s %d %s", "v1 with a bad 4th instance", reply.status_code, json.dumps(reply.json()))


def zoo_classifiers(rest: RestClient, jpegs: dict[str, bytes]) -> None:
    """The timm and Hugging Face demo classifiers, each with the preprocessing its own recipe set."""
    logger.info("Zoo classifiers (seeded weights; each preprocessed by its own recipe, read at scaffold time)")
    for model, what in ZOO.items():
        section = read_model_config(Path("models") / model)
        resize = section.resize
        logger.info(
            "  %s: %s, resize %s %s, crop %s, mean %s std %s",
            model,
            what,
            f"short side {resize}" if isinstance(resize, int) else f"to {resize[0]}x{resize[1]}",
            section.interpolation,
            section.crop or "none",
            list(section.mean),
            list(section.std),
        )
        show(f"{model} REST chelsea.jpg", rest.predict(model, jpegs["chelsea"]))


def run(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    config = derive_config(Path("config.properties"), workdir / "config.properties", random_endpoints().properties())
    server = TorchServe(workdir, config, Path("model_store"), [f"{m}={m}.mar" for m in MODELS])
    server.start()
    try:
        server.wait_ready(MODELS)
        ep = server.endpoints
        logger.info(
            "TorchServe ready: REST %s, gRPC %s, keys in %s",
            ep.url("inference"),
            ep.grpc("inference"),
            workdir / "key_file.json",
        )
        keys = KeyRing(workdir / "key_file.json")
        rest, grpc_client = RestClient(ep, keys), GrpcClient(ep, keys)
        photos = demo_models.sample_photos()
        jpegs = {name: demo_models.encode(img, "JPEG", quality=90) for name, img in photos.items()}

        logger.info("Classification (seeded weights: labels are real ImageNet names, not real predictions)")
        for name in ("chelsea", "coffee", "rocket"):
            show(f"resnet18 REST {name}.jpg", rest.predict("resnet18", jpegs[name]))
            show(f"mobilenet gRPC {name}.jpg", grpc_client.predict("mobilenet_v3_small", jpegs[name]))

        zoo_classifiers(rest, jpegs)

        logger.info("Digits (a CNN trained here on scikit-learn's digits; held-out images)")
        images, labels = demo_models.digit_images("test")
        pngs = [demo_models.encode(img, "PNG") for img in images]
        replies = predict_many(rest, "digits", pngs, concurrency=8)
        for reply, label in list(zip(replies, labels))[:5]:
            show(f"digits REST (true {label})", reply, top=1)
        correct = sum(r.status == 200 and r.body[0]["index"] == y for r, y in zip(replies, labels))
        logger.info("  held-out accuracy served: %d/%d = %.1f %%", correct, len(labels), 100 * correct / len(labels))

        logger.info("Detection (seeded weights, COCO names; boxes in the pixels of the image sent)")
        for name in ("astronaut", "rocket"):
            show(f"fasterrcnn gRPC {name}.jpg", grpc_client.predict("fasterrcnn", jpegs[name]))

        logger.info("DETR family (a seeded Hugging Face RT-DETR: 300 queries, sigmoid scoring, no NMS)")
        show("hf_rtdetr REST astronaut.jpg", rest.predict("hf_rtdetr", jpegs["astronaut"]))

        detect_shapes(rest, workdir)
        segment_shapes(rest, workdir)
        explain_shapes(rest, grpc_client, workdir)

        kserve_bodies(ep.url("inference"), keys, pngs[:3])

        logger.info("One corrupt image among 7 good ones, sent concurrently")
        batch = [*pngs[:3], pngs[3][:200], *pngs[4:8]]
        for i, reply in enumerate(predict_many(rest, "digits", batch, concurrency=8)):
            show(f"digits request {i}", reply, top=1)

        for model, values in sorted(batch_counters(ep.url("metrics")).items()):
            logger.info(
                "  %-20s %4.0f requests in %4.0f batches (mean %.2f), %3.0f rejected",
                model,
                values.get("Requests", 0),
                values.get("Batches", 0),
                values.get("Requests", 0) / max(values.get("Batches", 1), 1),
                values.get("RejectedRequests", 0),
            )
        quality_summary(ep.url("metrics"), workdir)
        grpc_client.close()
    finally:
        server.stop()
        logger.info("TorchServe stopped; no process left: %s", not server.processes())


VARIANTS_DEMO = ("shapes", "build/data/shapes/val")  # the smallest table with a real trade-off (int8 2x, AP lost)


def variants_table(report: Path = Path("build/variants") / VARIANTS_DEMO[0] / "report.md") -> None:
    """The last ``make variants`` table of the demo detector, or the command that makes it."""
    name, data = VARIANTS_DEMO
    command = f"make variants MODEL={name} DATA={data}"
    if not report.is_file():
        logger.info("Accuracy against speed of every variant (ONNX Runtime, int8, OpenVINO, bf16): `%s`", command)
        return
    logger.info("Every variant of %s by its task metric and speed (%s, from `%s`):", name, report, command)
    for line in report.read_text(encoding="utf-8").splitlines():
        if line.startswith(("|", "**Choice")):
            logger.info("  %s", line)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    np.set_printoptions(precision=3)
    run(Path("build/demo"))
    variants_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
