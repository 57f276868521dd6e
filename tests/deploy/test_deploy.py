"""Kubernetes and KServe: the manifests `make k8s` / `make kserve` write, checked against real schemas, and a real
TorchServe started exactly as the kit's KServe ServingRuntime starts it, answering v1, v2 and plain bodies in
shared batches."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

import deploy
from checks import strict
from kit import MODEL_STORE, MODELS, REPO, archive
from loadgen import closed_loop, servekit_counters
from profiles import Machine, record_choice, this_machine
from tsctl import TorchServe, random_endpoints

SCHEMAS = REPO / "tests" / "data" / "kserve"  # openAPIV3Schema of KServe v0.20.0's CRDs (source inside each file)


def generate(what: str, out: Path, names: list[str], *extra: str) -> Path:
    """Run the generator exactly as `make k8s` / `make kserve` do, into ``out``."""
    args = [what, "--names", *names, "--out", str(out), "--store", str(MODEL_STORE), *extra]
    assert deploy.main(args) == 0
    return out


def documents(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))}


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    profiles = tmp_path_factory.mktemp("profiles")
    record_choice("resnet18", {"batchSize": 4, "maxBatchDelay": 5}, this_machine(), profiles)
    record_choice("resnet18", {"batchSize": 16}, Machine("Intel(R) Xeon(R) Platinum 8480+", ("amx_tile",), 8), profiles)
    return generate("k8s", tmp_path_factory.mktemp("k8s"), list(MODELS), "--profiles", str(profiles))


def test_k8s_manifests_pass_strict_validation(k8s: Path) -> None:
    for name in MODELS:
        files = documents(k8s / name)
        assert set(files) >= {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "networkpolicy.yaml"}
        for file, document in files.items():
            if document["kind"] == "Kustomization":
                assert sorted(document["resources"]) == sorted(set(files) - {file, "hpa-queue-latency.yaml"})
                continue
            kubernetes_validate.validate(document, deploy.K8S_VERSION, strict=True)
        # an unknown field fails strict validation: the check is real
        broken = files["deployment.yaml"]
        broken["spec"]["template"]["spec"]["containers"][0]["probe"] = {}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, deploy.K8S_VERSION, strict=True)


def test_k8s_exposes_inference_only_and_runs_unprivileged(k8s: Path) -> None:
    files = documents(k8s / "resnet18")
    assert [p["port"] for p in files["service.yaml"]["spec"]["ports"]] == [deploy.HTTP, deploy.GRPC]
    pod = files["deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--disable-token-auth" in container["args"] and "--models" in container["args"]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] > 60  # responseTimeout + margin: in-flight requests finish
    rules = files["networkpolicy.yaml"]["spec"]["ingress"]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in rules] == [
        sorted([deploy.HTTP, deploy.GRPC]),
        [deploy.METRICS],
    ]
    assert deploy.MANAGEMENT not in {p["port"] for rule in rules for p in rule["ports"]}
    # make tune's profiles ride in a ConfigMap mounted over the image's; each node applies its own only
    assert len(files["profiles.yaml"]["data"]) == 2
    (volume,) = [v for v in pod["volumes"] if v["name"] == "profiles"]
    assert volume["configMap"] == {"name": files["profiles.yaml"]["metadata"]["name"], "optional": True}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "profiles"]
    search = {e["name"]: e["value"] for e in container["env"]}["SERVEKIT_PROFILES"].split(":")
    assert search[0] == mount["mountPath"] and mount["readOnly"]
    variant = files["hpa-queue-latency.yaml"]["spec"]["metrics"][0]
    assert variant["pods"]["metric"]["name"] == "ts_queue_latency_ms_per_request"


def test_memory_is_sized_from_measured_worker_memory(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    rows = [
        {"model": "resnet18", "where": "kit", "peak_worker_mib": 1052.0},
        {"model": "resnet18", "where": "stock", "peak_worker_mib": 3000.0},
        {"model": "resnet18", "where": "kit", "peak_worker_mib": float("nan")},
    ]
    results.write_text(json.dumps({"rows": rows}))
    measured = deploy.measured_worker_mib(results)
    assert measured == {"resnet18": 1052.0}
    spec = deploy.model_spec("resnet18", REPO / "models", measured)
    assert spec.measured and spec.memory_mib == 1984  # (512 + 1052) x 1.25, rounded up to 64 MiB
    assert not deploy.model_spec("digits", REPO / "models", measured).measured


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    for path in SCHEMAS.glob("*.json"):
        stored = json.loads(path.read_text())
        if stored["kind"] == kind:
            assert "github.com/kserve/kserve/blob/v0.20.0/config/crd/full/" in stored["source"]
            return jsonschema.Draft7Validator(strict(stored["openAPIV3Schema"]))
    raise AssertionError(f"no stored schema for {kind}")


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in MODELS:
        archive(name)
    return generate("kserve", tmp_path_factory.mktemp("kserve"), list(MODELS), "--triton-repo", "/nonexistent")


def test_kserve_manifests_match_the_crd_schemas(kserve: Path) -> None:
    files = documents(kserve)
    kinds = Counter(d["kind"] for d in files.values())
    assert kinds == {"InferenceService": 4, "ServingRuntime": 2}
    for file, document in files.items():
        validator = crd_validator(document["kind"])
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, (file, errors)
    broken = files["inferenceservice-servekit.yaml"]
    broken["spec"]["predictor"]["model"]["storageURI"] = "typo"
    assert list(crd_validator("InferenceService").iter_errors(broken))
    stock = files["inferenceservice-torchserve-v1.yaml"]
    assert stock["metadata"]["labels"] == {"serviceEnvelope": "kserve"}
    assert stock["spec"]["predictor"]["model"]["runtimeVersion"] == deploy.STOCK_TORCHSERVE_KFS


def test_kserve_storage_layout(kserve: Path) -> None:
    for layout in ("servekit", "torchserve-stock"):
        root = kserve / "storage" / layout
        assert sorted(p.name for p in (root / "model-store").iterdir()) == sorted(f"{m}.mar" for m in MODELS)
        properties = (root / "config" / "config.properties").read_text()
        snapshot = json.loads(properties.split("model_snapshot=", 1)[1].splitlines()[0])
        assert sorted(snapshot["models"]) == sorted(MODELS)
        batches = {m["1.0"]["batchSize"] for m in snapshot["models"].values()}
        assert batches == {1} if layout == "torchserve-stock" else min(batches) > 1
        assert "enable_envvars_config=true" in properties and "management_address=http://127.0.0.1" in properties


# ------------------------------------------------------------------ a real TorchServe, as the runtime starts it


def v1_body(images: list[bytes]) -> bytes:
    return json.dumps({"instances": [{"data": base64.b64encode(i).decode()} for i in images]}).encode()


def v2_body(images: list[bytes], request_id: str) -> bytes:
    data = [base64.b64encode(i).decode() for i in images]
    tensor = {"name": "images", "shape": [len(data)], "datatype": "BYTES", "data": data}
    return json.dumps({"id": request_id, "inputs": [tensor]}).encode()


def top1(answer: Any) -> int:
    return int(answer[0]["index"])


def runtime_server(out: Path, workdir: Path) -> TorchServe:
    """TorchServe from `make kserve`'s servekit tree with the kit ServingRuntime's own args.

    KServe mounts the tree at /mnt/models; here it stays where the generator wrote it, and the listeners move
    to free loopback ports through the TS_* variables the runtime's config admits.
    """
    storage = out / "storage" / "servekit"
    runtime = yaml.safe_load((out / "servingruntime-servekit-torchserve.yaml").read_text())
    args = runtime["spec"]["containers"][0]["args"]
    assert args[:2] == ["torchserve", "--start"]
    assert {"--model-store=/mnt/models/model-store", "--ts-config=/mnt/models/config/config.properties"} <= set(args)
    flags = [a for a in args[2:] if not a.startswith(("--model-store=", "--ts-config=", "--foreground", "--ncs"))]
    assert flags == ["--disable-token-auth"]
    ep = random_endpoints()
    env = {f"TS_{k.upper()}": v for k, v in ep.properties().items()}
    env.update(TS_GRPC_INFERENCE_ADDRESS="127.0.0.1")
    config = storage / "config" / "config.properties"
    server = TorchServe(workdir, config, storage / "model-store", [], extra_args=flags, env=env)
    server.endpoints = ep
    return server


class MixedClient:
    """Plain, v1 and v2 bodies (some with 3 instances, one kind with a bad last instance), checked per instance
    against what each image gets alone."""

    KINDS = ("plain", "v1", "v2", "v1-many", "v2-many", "v1-bad")

    def __init__(self, base: str, model: str, images: list[bytes], expected: list[int]) -> None:
        self.base, self.model, self.images, self.expected = base, model, images, expected
        self.mistakes: list[str] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def send(self, number: int) -> int:
        kind = self.KINDS[number % len(self.KINDS)]
        start = (number * 3) % (len(self.images) - 3)
        picked = list(range(start, start + (3 if kind.endswith("many") else 1)))
        chosen = [self.images[i] for i in picked]
        predictions = f"{self.base}/predictions/{self.model}"
        if kind == "plain":
            reply = requests.post(predictions, data=chosen[0], timeout=60)
        elif kind.startswith("v1"):
            body = v1_body([*chosen, b"not an image"] if kind == "v1-bad" else chosen)
            path = predictions if (number // len(self.KINDS)) % 2 else f"{self.base}/v1/models/{self.model}:predict"
            reply = requests.post(path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        else:
            path = predictions if (number // len(self.KINDS)) % 2 else f"{self.base}/v2/models/{self.model}/infer"
            reply = requests.post(path, data=v2_body(chosen, f"r{number}"), timeout=60)
        ok = self.check(kind, number, reply, [self.expected[i] for i in picked])
        with self.lock:
            self.counts[kind] += 1
            if not ok:
                self.mistakes.append(f"{kind} #{number}: {reply.status_code} {reply.text[:300]}")
        return reply.status_code

    @staticmethod
    def check(kind: str, number: int, reply: requests.Response, want: list[int]) -> bool:
        body = reply.json()
        if kind == "v1-bad":
            return reply.status_code == 400 and body["error"].startswith(f"instance {len(want)}: not an image")
        if reply.status_code != 200:
            return False
        if kind == "plain":
            return [top1(body)] == want
        if kind.startswith("v1"):
            return [top1(a) for a in body["predictions"]] == want
        (output,) = body["outputs"]
        return body["id"] == f"r{number}" and [top1(json.loads(d)) for d in output["data"]] == want


@pytest.mark.e2e  # a real TorchServe
def test_kserve_runtime_batches_v1_v2_and_plain_bodies(
    tmp_path: Path, digits_test: tuple[list[bytes], list[int]]
) -> None:
    """batchSize 8 from the generated config; 16 clients mixing v1, v2 and plain bodies, some with several
    instances: every instance gets its own answer, a bad instance fails its request alone, batches form."""
    archive("digits")
    out = generate("kserve", tmp_path / "kserve", ["digits"], "--triton-repo", "/nonexistent")
    snapshot = (out / "storage" / "servekit" / "config" / "config.properties").read_text().split("model_snapshot=")[1]
    assert json.loads(snapshot.splitlines()[0])["models"]["digits"]["1.0"]["batchSize"] == 8
    server = runtime_server(out, tmp_path / "ts")
    ep = server.endpoints
    images, labels = digits_test[0][:48], digits_test[1][:48]
    server.start()
    try:
        server.wait_ready(["digits"], timeout=180)
        base = ep.url("inference")
        # the probes `make k8s` writes: /ping answers a plain httpGet (no key) with the runtime's args
        assert requests.get(f"{base}/ping", timeout=10).status_code == 200
        expected = [top1(requests.post(f"{base}/predictions/digits", data=i, timeout=60).json()) for i in images]
        assert sum(p == t for p, t in zip(expected, labels)) >= 0.9 * len(labels)
        before = servekit_counters(requests.get(f"{ep.url('metrics')}/metrics", timeout=10).text, "digits")
        client = MixedClient(base, "digits", images, expected)
        result = closed_loop(client.send, concurrency=16, seconds=12, warmup=0)
        after = servekit_counters(requests.get(f"{ep.url('metrics')}/metrics", timeout=10).text, "digits")
    finally:
        server.stop()
    assert server.processes() == [], "torchserve left processes behind"
    assert not client.mistakes, client.mistakes[:5]
    assert min(client.counts.values()) >= 3 and result.count >= 60, (client.counts, result.count)
    batches = after["Batches"] - before["Batches"]
    seen = after["Requests"] - before["Requests"]
    print(f"\nKServe runtime: {result.count} requests {dict(client.counts)}, {seen / batches:.2f} requests per batch")
    assert seen / batches > 1.5, (seen, batches)  # batches larger than 1 formed


def test_capacity_plan_from_measured_throughput(tmp_path: Path) -> None:
    assert deploy.replicas_for(50.0, 200.0) == (6, 12)  # 200 / (50 x 0.7) = 5.7
    assert deploy.replicas_for(500.0, 10.0) == (2, 4)  # never fewer than two
    results = tmp_path / "results.json"
    rows = [
        {
            "model": "resnet18",
            "where": "kit",
            "backend": "torch",
            "images": "same",
            "concurrency": 16,
            "rate": 30.0,
            "p99_ms": 600.0,
            "errors": 0,
        },
        {
            "model": "resnet18",
            "where": "kit",
            "backend": "int8",
            "images": "same",
            "concurrency": 16,
            "rate": 60.0,
            "p99_ms": 300.0,
            "errors": 0,
        },
        {
            "model": "resnet18",
            "where": "kit",
            "backend": "onnx",
            "images": "same",
            "concurrency": 16,
            "rate": 90.0,
            "p99_ms": 200.0,
            "errors": 3,
        },
        {
            "model": "resnet18",
            "where": "stock",
            "backend": "torch",
            "images": "same",
            "concurrency": 16,
            "rate": 99.0,
            "p99_ms": 100.0,
            "errors": 0,
        },
    ]
    results.write_text(json.dumps({"rows": rows}))
    assert deploy.best_served(results) == {"resnet18": ("int8", 60.0, 300.0)}
    table = deploy.capacity_table(results, ["resnet18"], 120.0)
    assert table[-1] == "| resnet18 | int8 | 60.0 | 300 | 3 | 3 / 6 |"


def test_drain_counts_requests_received_but_not_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", REPO / "deploy" / "serve.py")
    assert spec is not None and spec.loader is not None
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    metrics = "\n".join(
        [
            "# TYPE ts_inference_requests_total counter",
            'ts_inference_requests_total{model_name="digits",model_version="default",hostname="h",} 12.0',
            'ts_inference_requests_total{model_name="resnet18",model_version="default",hostname="h",} 5.0',
            'ServekitRequests{ModelName="digits",Level="Model",Hostname="h",} 12.0',
            'ServekitRequests{ModelName="resnet18",Level="Model",Hostname="h",} 2.0',
            'Requests2XX{Level="Host",Hostname="h",} 40.0',
        ]
    )
    assert serve.in_flight(metrics) == 3
    assert serve.in_flight(metrics.replace("} 2.0", "} 5.0")) == 0
    config = tmp_path / "config.properties"
    config.write_text("# c\nmetrics_address=http://0.0.0.0:8082\ninference_address=http://0.0.0.0:8080\n")
    command = ["torchserve", f"--ts-config={config}"]
    monkeypatch.delenv("TS_METRICS_ADDRESS", raising=False)
    assert serve.address(command, "metrics_address", "x") == "http://127.0.0.1:8082"
    monkeypatch.setenv("TS_METRICS_ADDRESS", "http://127.0.0.1:9999")
    assert serve.address(command, "metrics_address", "x") == "http://127.0.0.1:9999"
    assert serve.address(["torchserve"], "inference_address", "http://127.0.0.1:8080") == "http://127.0.0.1:8080"
