"""Explanations and model-quality metrics on a real TorchServe: `/explanations`, KServe v1 `:explain` and gRPC;
the Servekit* series on the Prometheus endpoint with bounded labels after the bad-input corpus; the Grafana
dashboard's expressions against what the server exports; the PrometheusRule against the prometheus-operator
CRD schema; and its drift alert checked with `promtool test rules` over series recorded from the server."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests
import yaml

import demo_models
from checks import strict
from client import GrpcClient, KeyRing, RestClient, predict_many
from corpus import build_cases
from kit import REPO, Server
from loadgen import MetricSample, metric_samples, metric_total

pytestmark = pytest.mark.e2e
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
EXPLANATION_BOUND = 20 * 1024


@pytest.fixture(scope="module")
def rest(server: Server) -> RestClient:
    return RestClient(server.endpoints, KeyRing(server.key_file))


@pytest.fixture(scope="module")
def digit_pngs() -> list[bytes]:
    images, _ = demo_models.digit_images("test")
    return [demo_models.encode(img, "PNG") for img in images[:48]]


def scrape(server: Server) -> list[MetricSample]:
    return metric_samples(requests.get(f"{server.endpoints.url('metrics')}/metrics", timeout=10).text)


def total(samples: list[MetricSample], name: str, model: str, **match: str) -> float:
    return metric_total(samples, name, ModelName=model, **match)


def test_explanations_over_rest_kserve_and_grpc(server: Server, rest: RestClient, jpegs: dict[str, bytes]) -> None:
    photo = jpegs["chelsea"]
    predicted = rest.predict("resnet18", photo)
    explained = rest.explain("resnet18", photo)
    assert predicted.status == explained.status == 200
    body = explained.body["explanation"]
    assert body["method"] == "gradcam" and body["target"]["index"] == predicted.body[0]["index"]
    assert np.array(body["grid"]).shape == (14, 14) and len(json.dumps(explained.body)) < EXPLANATION_BOUND
    width, height = 451, 300  # the crop of the image as sent: 224/256 of the short side, centred
    x0, y0, x1, y1 = body["box"]
    assert abs((y1 - y0) - height * 224 / 256) <= 1 and abs((x0 + x1) / 2 - width / 2) <= 1
    named = rest.explain("resnet18", photo, target="tiger cat")
    assert named.status == 200 and named.body["explanation"]["target"]["label"] == "tiger cat"
    refused = rest.explain("resnet18", photo, target="unicorn")
    assert refused.status == 400 and "not a label" in refused.body["error"]

    # KServe v1 :explain on TorchServe's inference port, two instances in one request
    keys = KeyRing(server.key_file)
    b64 = base64.b64encode(photo).decode()
    reply = requests.post(
        f"{server.endpoints.url('inference')}/v1/models/resnet18:explain",
        data=json.dumps({"instances": [{"data": b64}, {"data": b64, "target": 281}]}),
        headers={"Authorization": f"Bearer {keys.inference}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    explanations = reply.json()["explanations"]
    assert [e["explanation"]["target"]["index"] for e in explanations] == [body["target"]["index"], 281]

    # gRPC has no explanations call: an explain input asks for one; the segmenter explains its largest class
    client = GrpcClient(server.endpoints, keys)
    try:
        over_grpc = client.explain("resnet18", photo, target="281")
        assert over_grpc.status == 200 and over_grpc.body["explanation"]["target"]["index"] == 281
        assert over_grpc.body["explanation"]["grid"] == explanations[1]["explanation"]["grid"]
        seg = client.explain("shapes_seg", jpegs["chelsea"])
        assert seg.status == 200 and seg.body["explanation"]["method"] == "occlusion"
        assert seg.body["explanation"]["target"]["label"] != "background"
    finally:
        client.close()


def test_explanations_and_predictions_share_batches_and_a_corrupt_image_fails_alone(
    rest: RestClient, digit_pngs: list[bytes]
) -> None:
    corrupt = digit_pngs[0][:60]
    jobs = (
        [("predict", p) for p in digit_pngs[:8]] + [("explain", p) for p in digit_pngs[8:16]] + [("explain", corrupt)]
    )

    def send(job: tuple[str, bytes]) -> Any:
        kind, data = job
        return rest.predict("digits", data) if kind == "predict" else rest.explain("digits", data)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(send, jobs))
    assert all(r.status == 200 for r in replies[:-1]), [r.body for r in replies if r.status != 200]
    assert all(isinstance(r.body, list) for r in replies[:8])
    assert all("explanation" in r.body for r in replies[8:16])
    assert replies[-1].status == 400


def test_quality_metrics_are_exported_with_bounded_labels(
    server: Server, rest: RestClient, jpegs: dict[str, bytes]
) -> None:
    """After the bad-input corpus (test_e2e_faults ran it through this server) and this module's requests."""
    predict_many(rest, "digits", [case.body for case in build_cases()], concurrency=4)
    predict_many(rest, "resnet18", [jpegs["chelsea"], jpegs["astronaut"], jpegs["coffee"]] * 3, concurrency=3)
    assert rest.predict("fasterrcnn", jpegs["astronaut"]).status == rest.predict("shapes_seg", jpegs["coffee"]).status
    samples = scrape(server)
    names = {n for n, _, _ in samples}
    for name in (
        "ServekitTop1Confidence_bucket",
        "ServekitImageBrightness_sum",
        "ServekitImageMegapixels_count",
        "ServekitRequestSeconds_bucket",
        "ServekitAnswers",
        "ServekitImageAspect",
        "ServekitDecodeScale",
        "ServekitBadInputs",
        "ServekitExplanations",
        "ServekitDetectionsPerImage_count",
        "ServekitSegmentedArea_count",
    ):
        assert name in names, name
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, labels, _ in samples:
        for key in ("Class", "ErrorClass", "Aspect", "Scale"):
            if name.startswith("Servekit") and key in labels:
                values[(labels.get("ModelName", ""), key)].add(labels[key])
    assert values[("digits", "ErrorClass")] >= {"BadInput", "UnsupportedMediaType"}
    for (model, key), seen in values.items():
        bound = {"Class": 21, "ErrorClass": 5, "Aspect": 5, "Scale": 4}[key]
        assert len(seen) <= bound, (model, key, sorted(seen))
    assert values[("resnet18", "Scale")] <= {"1", "2", "4", "8"}
    assert (
        0
        < total(samples, "ServekitImageBrightness_sum", "resnet18")
        < total(samples, "ServekitImageBrightness_count", "resnet18")
    )


def test_dashboard_and_rules_read_series_the_server_exports(server: Server) -> None:
    exported = {n for n, _, _ in scrape(server)}
    document = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in document["spec"]["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [r["expr"] for g in document["spec"]["groups"] for r in g["rules"]]
    for expr in expressions:
        for name in re.findall(r"\b(Servekit\w+|servekit:\w+:\w+)", expr):
            assert name in exported or name in recorded, (name, expr)
    assert len(dashboard["panels"]) >= 8 and dashboard["uid"] == "servekit-model-quality"

    schema = json.loads((REPO / "tests" / "data" / "prometheus-operator" / "prometheusrules.v0.82.2.json").read_text())
    validator = jsonschema.Draft7Validator(strict(schema["openAPIV3Schema"]))
    assert not [e.message for e in validator.iter_errors(document)]
    broken = json.loads(json.dumps(document))
    alert = next(r for g in broken["spec"]["groups"] for r in g["rules"] if "alert" in r)
    alert["for"] = "half an hour"
    assert list(validator.iter_errors(broken))


# ------------------------------------------------------------------ the drift alert on recorded series

STEP_MINUTES = 15  # the recorded traffic is replayed as one phase per 15 minutes
BASELINE_STEPS = 7 * 24 * 4  # seven days of daylight photos
SHIFT_STEPS = 2 * 4  # then two hours of dark ones


def settled(server: Server, images: float | None = None) -> list[tuple[str, dict[str, str], float]]:
    """A scrape once the frontend has taken in every metric the worker logged (it reads them from the worker's
    log asynchronously): the digits model's image count equals ``images``, or two scrapes agree."""
    last: float | None = None
    for _ in range(100):
        samples = scrape(server)
        count = total(samples, "ServekitImageBrightness_count", "digits")
        if count == (images if images is not None else last):
            return samples
        last = count
        time.sleep(0.1)
    raise AssertionError(f"the digits model's image count stayed at {last}, expected {images}")


def phase(server: Server, rest: RestClient, images: list[bytes]) -> dict[str, Any]:
    """What one phase of traffic adds to the digits model's quality series."""
    before = settled(server)
    replies = predict_many(rest, "digits", images, concurrency=4)
    assert all(r.status == 200 for r in replies)
    after = settled(server, total(before, "ServekitImageBrightness_count", "digits") + len(images))

    def delta(name: str, **match: str) -> float:
        return total(after, name, "digits", **match) - total(before, name, "digits", **match)

    classes = {
        labels["Class"] for n, labels, _ in after if n == "ServekitAnswers" and labels.get("ModelName") == "digits"
    }
    return {
        "confidence": (delta("ServekitTop1Confidence_sum"), delta("ServekitTop1Confidence_count")),
        "brightness": (delta("ServekitImageBrightness_sum"), delta("ServekitImageBrightness_count")),
        "classes": {c: delta("ServekitAnswers", Class=c) for c in classes},
        "requests": delta("ServekitRequests"),
    }


def series(values: list[float]) -> str:
    """A counter's values, one per step, in promtool's notation (runs of equal increments compressed)."""
    return " ".join(f"{v:.6f}" for v in values)


def replay(base: dict[str, Any], shifted: dict[str, Any], steps: tuple[int, int]) -> list[dict[str, str]]:
    """promtool input series: ``steps[0]`` steps of the base phase, then ``steps[1]`` of the shifted one."""
    out = []

    def counter(name: str, labels: str, per_base: float, per_shift: float) -> None:
        values, value = [0.0], 0.0
        for i in range(steps[0] + steps[1]):
            value += per_base if i < steps[0] else per_shift
            values.append(value)
        out.append({"series": f'{name}{{ModelName="digits",Level="Model"{labels}}}', "values": series(values)})

    for metric, key in (("ServekitTop1Confidence", "confidence"), ("ServekitImageBrightness", "brightness")):
        counter(f"{metric}_sum", "", base[key][0], shifted[key][0])
        counter(f"{metric}_count", "", base[key][1], shifted[key][1])
    for cls in sorted(set(base["classes"]) | set(shifted["classes"])):
        counter("ServekitAnswers", f',Class="{cls}"', base["classes"].get(cls, 0.0), shifted["classes"].get(cls, 0.0))
    counter("ServekitRequests", "", base["requests"], shifted["requests"])
    return out


def test_drift_alert_fires_on_dark_photos_and_stays_quiet_without(
    server: Server, rest: RestClient, digit_pngs: list[bytes], tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs Debian's prometheus package"
    images, _ = demo_models.digit_images("test")
    dark = [demo_models.encode((img * 0.35).astype(np.uint8), "PNG") for img in images[:48]]
    daylight = phase(server, rest, digit_pngs)
    night = phase(server, rest, dark)
    mean = {k: (p[k][0] / p[k][1]) for p in (daylight,) for k in ("confidence", "brightness")}
    mean_dark = {k: (night[k][0] / night[k][1]) for k in ("confidence", "brightness")}
    print(
        f"recorded: daylight brightness {mean['brightness']:.3f}, confidence {mean['confidence']:.3f}; "
        f"dark brightness {mean_dark['brightness']:.3f}, confidence {mean_dark['confidence']:.3f}"
    )
    # the rules' thresholds, decided here from the recorded means (they must be clearly on one side)
    assert abs(mean["brightness"] - mean_dark["brightness"]) > 0.15 + 0.02
    confidence_fires = mean_dark["confidence"] < 0.85 * mean["confidence"]
    assert abs(mean_dark["confidence"] / mean["confidence"] - 0.85) > 0.03

    document = yaml.safe_load(RULES.read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(document["spec"]))
    at = f"{(BASELINE_STEPS + SHIFT_STEPS) * STEP_MINUTES}m"
    labels = {"ModelName": "digits", "severity": "warning"}

    def expected(alert: str, fires: bool) -> dict[str, Any]:
        alerts = [{"exp_labels": labels, "exp_annotations": annotations(document, alert)}] if fires else []
        return {"eval_time": at, "alertname": alert, "exp_alerts": alerts}

    tests = [
        {
            "name": "dark photos after a week of daylight",
            "interval": f"{STEP_MINUTES}m",
            "input_series": replay(daylight, night, (BASELINE_STEPS, SHIFT_STEPS)),
            "alert_rule_test": [
                expected("ServekitInputBrightnessDrift", True),
                expected("ServekitConfidenceDrift", confidence_fires),
                expected("ServekitBadInputRate", False),
            ],
        },
        {
            "name": "daylight all along",
            "interval": f"{STEP_MINUTES}m",
            "input_series": replay(daylight, daylight, (BASELINE_STEPS, SHIFT_STEPS)),
            "alert_rule_test": [
                expected("ServekitInputBrightnessDrift", False),
                expected("ServekitConfidenceDrift", False),
                expected("ServekitClassMixDrift", False),
            ],
        },
    ]
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": f"{STEP_MINUTES}m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run = subprocess.run(
        [promtool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr


def annotations(document: dict[str, Any], alert: str) -> dict[str, str]:
    """An alert's annotations as Prometheus renders them for the digits model (no value templates in them)."""
    rule = next(r for g in document["spec"]["groups"] for r in g["rules"] if r.get("alert") == alert)
    return {k: v.replace("{{ $labels.ModelName }}", "digits") for k, v in rule.get("annotations", {}).items()}
