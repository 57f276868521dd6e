"""Kubernetes and KServe manifests for the kit's archives (``make k8s`` -> ``build/k8s/``, ``make kserve`` ->
``build/kserve/``), from the model folders and the measured worker memory.

**The deployment model (what protects the service).** TorchServe 0.12 makes new random token keys in every
process, so replicas behind one Service cannot share a token. Inside a pod the kit therefore turns
TorchServe's token authorization off (``--disable-token-auth``) and protects the pods instead:

- clients authenticate at the gateway or service mesh in front of the Service (Istio/Envoy, an API
  gateway, KServe's ingress): nothing reaches a pod without passing it;
- a NetworkPolicy admits traffic to the inference ports (HTTP 8080, gRPC 7070) only from namespaces
  labelled ``servekit.io/gateway: "true"``, and to the metrics port (8082) only from those labelled
  ``servekit.io/monitoring: "true"``; everything else is dropped;
- the management API (8081, 7071) listens on 127.0.0.1 inside the container: nothing outside the pod can
  reach it, and ``enable_model_api=false`` keeps the model set fixed to the image's archives;
- the Service exposes the inference ports only; pods run as a non-root user with a read-only root
  filesystem, no privilege escalation and every capability dropped.

Without a gateway that authenticates, anyone who can reach the Service can call the models: that is the
trade this model makes, stated here and in docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from profiles import PROFILE_DIR

logger = logging.getLogger("deploy")

K8S_VERSION = "1.34.0"  # the Kubernetes version manifests are validated against (kubernetes-validate, strict)
KSERVE_VERSION = "v0.20.0"
IMAGE = "servekit-torchserve:0.1.0"
TRITON_IMAGE = "servekit-triton:0.1.0"
STOCK_TORCHSERVE_KFS = "0.12.0"  # pytorch/torchserve-kfs tag: the kit's handlers need TorchServe 0.12
HTTP, GRPC, MANAGEMENT, METRICS, GRPC_MANAGEMENT = 8080, 7070, 8081, 8082, 7071
STOCK_INFERENCE = 8085  # TorchServe behind the torchserve-kfs wrapper (which listens on 8080)
FRONTEND_MIB = 512  # the Java frontend's resident memory with the kit's netty and queue settings
DEFAULT_WORKER_MIB = {"classification": 700, "detection": 1400, "segmentation": 900}  # when no bench measured it
MODEL_STORE = "/home/model-server/model-store"
CONTAINER_CONFIG = "/home/model-server/config.properties"
IMAGE_PROFILES = "/home/model-server/profiles"  # make tune's profiles baked into the image
PROFILE_OVERRIDE = "/etc/servekit/profiles"  # the profiles ConfigMap, searched first
GATEWAY_LABEL = {"servekit.io/gateway": "true"}
MONITORING_LABEL = {"servekit.io/monitoring": "true"}


@dataclass(frozen=True)
class ModelSpec:
    """What the manifests of one model need: frontend keys, threads, measured worker memory."""

    name: str
    task: str
    workers: int
    threads: int
    batch: int
    delay_ms: int
    timeout_s: int
    worker_mib: float  # peak RSS of one worker, measured by `make bench` (or the task's default)
    measured: bool

    @property
    def cpu(self) -> int:
        """Cores one replica needs: each worker's intra-op threads."""
        return self.workers * self.threads

    @property
    def memory_mib(self) -> int:
        """Memory request of one replica: the frontend, every worker at its peak, and a quarter on top."""
        return replica_memory_mib([self])


def replica_memory_mib(specs: Sequence[ModelSpec]) -> int:
    """One TorchServe serving ``specs``: the frontend once, each worker at its measured peak, plus 25 %."""
    return int(math.ceil((FRONTEND_MIB + sum(s.workers * s.worker_mib for s in specs)) * 1.25 / 64) * 64)


def resources(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS): the cores the workers' threads use, the memory they peak at."""
    amounts = {"cpu": str(sum(s.cpu for s in specs)), "memory": f"{replica_memory_mib(specs)}Mi"}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def model_spec(name: str, models: Path, bench: Mapping[str, float]) -> ModelSpec:
    """The spec of ``models/<name>`` with the worker memory ``bench`` measured (model name -> MiB)."""
    document = yaml.safe_load((models / name / "model-config.yaml").read_text(encoding="utf-8")) or {}
    handler = document.get("handler") or {}
    workers = int(document.get("maxWorkers", document.get("minWorkers", 1)))
    task = str(handler.get("task", "classification"))
    measured = name in bench
    return ModelSpec(
        name=name,
        task=task,
        workers=workers,
        threads=int(handler.get("threads", 0)) or 2,
        batch=int(document.get("batchSize", 1)),
        delay_ms=int(document.get("maxBatchDelay", 100)),
        timeout_s=int(document.get("responseTimeout", 120)),
        worker_mib=bench[name] if measured else DEFAULT_WORKER_MIB.get(task, 1400),
        measured=measured,
    )


def measured_worker_mib(results: Path) -> dict[str, float]:
    """Largest peak worker RSS per model in a bench ``results.json`` (the kit's own rows)."""
    if not results.is_file():
        return {}
    rows = json.loads(results.read_text(encoding="utf-8")).get("rows", [])
    peaks: dict[str, float] = {}
    for row in rows:
        peak = row.get("peak_worker_mib")
        if row.get("where") == "kit" and isinstance(peak, (int, float)) and peak > 0:
            peaks[row["model"]] = max(peaks.get(row["model"], 0.0), float(peak))
    return peaks


def replicas_for(rate: float, target_rps: float, *, utilization: float = 0.7, peak: float = 2.0) -> tuple[int, int]:
    """(replicas, HPA maximum) that carry ``target_rps`` with each replica at ``utilization`` of the ``rate`` it
    sustained; never fewer than 2 (a PodDisruptionBudget of 1 and a rolling update need a second), and
    ``peak`` times that as the HPA's maximum."""
    replicas = max(2, math.ceil(target_rps / (rate * utilization)))
    return replicas, max(replicas + 1, math.ceil(replicas * peak))


def best_served(results: Path, concurrency: int = 16) -> dict[str, tuple[str, float, float]]:
    """Per model, the kit's fastest archive at ``concurrency`` on the one-image rows: (backend, req/s, p99 ms)."""
    rows = json.loads(results.read_text(encoding="utf-8")).get("rows", []) if results.is_file() else []
    best: dict[str, tuple[str, float, float]] = {}
    for row in rows:
        if row.get("where") != "kit" or row.get("concurrency") != concurrency or row.get("images") != "same":
            continue
        if row.get("errors") or row["rate"] <= best.get(row["model"], ("", 0.0, 0.0))[1]:
            continue
        best[row["model"]] = (row["backend"], float(row["rate"]), float(row["p99_ms"]))
    return best


# ---------------------------------------------------------------- Kubernetes


def labels(spec: ModelSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "servekit", "app.kubernetes.io/instance": spec.name.replace("_", "-")}


def resource_name(spec: ModelSpec) -> str:
    return f"servekit-{spec.name.replace('_', '-')}"


def torchserve_args(config: str, store: str, *extra: str) -> list[str]:
    """TorchServe in the foreground with token auth off (the deployment model above), as pods start it."""
    return [
        "torchserve",
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        f"--ts-config={config}",
        f"--model-store={store}",
        *extra,
    ]


def profiles_name(spec: ModelSpec) -> str:
    return f"{resource_name(spec)}-profiles"


def profiles_config_map(spec: ModelSpec, profiles: Path) -> dict[str, Any] | None:
    """``make tune``'s per-machine profiles as the ConfigMap the pods mount over the image's (None if none).

    Each node's pod applies only the profile of its own CPU model, flags and CPU limit (``deploy/serve.py``),
    so one ConfigMap can hold the profiles of every node pool.
    """
    files = sorted(profiles.glob("*.json")) if profiles.is_dir() else []
    if not files:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": profiles_name(spec), "labels": labels(spec)},
        "data": {p.name: p.read_text(encoding="utf-8") for p in files},
    }


def container(spec: ModelSpec, image: str) -> dict[str, Any]:
    """The TorchServe container: the image's archives, token auth off (see the module's deployment model)."""
    probe_http = {"path": "/ping", "port": "http"}
    return {
        "name": "torchserve",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": torchserve_args(CONTAINER_CONFIG, MODEL_STORE, "--models", f"{spec.name}={spec.name}.mar"),
        "ports": [
            {"name": "http", "containerPort": HTTP, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS, "protocol": "TCP"},
        ],
        "env": [
            {"name": "LOG_LOCATION", "value": "/tmp/logs"},
            {"name": "METRICS_LOCATION", "value": "/tmp/logs"},
            # a node's tuned profile: the ConfigMap's first, then the image's; another CPU's never applies
            {"name": "SERVEKIT_PROFILES", "value": f"{PROFILE_OVERRIDE}:{IMAGE_PROFILES}"},
        ],
        "resources": resources([spec]),
        # /ping answers 200 once every model has a worker; startup covers model loading.
        "startupProbe": {"httpGet": probe_http, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {"httpGet": probe_http, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": probe_http, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "profiles", "mountPath": PROFILE_OVERRIDE, "readOnly": True},
        ],
    }


def deployment(spec: ModelSpec, image: str, replicas: int = 2) -> dict[str, Any]:
    """Replicas of one model; SIGTERM lets TorchServe finish in-flight requests within the grace period."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": resource_name(spec), "labels": labels(spec)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(spec),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": spec.timeout_s + 30,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container(spec, image)],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                        # optional: without the ConfigMap the pod starts with the image's profiles or none
                        {"name": "profiles", "configMap": {"name": profiles_name(spec), "optional": True}},
                    ],
                },
            },
        },
    }


def service(spec: ModelSpec) -> dict[str, Any]:
    """Inference ports only: management never leaves the pod, metrics are scraped from the pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": resource_name(spec), "labels": labels(spec)},
        "spec": {
            "selector": labels(spec),
            "ports": [
                {"name": "http", "port": HTTP, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
            ],
        },
    }


def hpa(spec: ModelSpec, min_replicas: int = 2, max_replicas: int = 10, cpu_percent: int = 70) -> dict[str, Any]:
    """Scale on CPU: the workers run the cores they were given, so CPU tracks load until the queue grows."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": resource_name(spec), "labels": labels(spec)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": resource_name(spec)},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu_percent}},
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def hpa_queue_latency(spec: ModelSpec, target_ms: int = 100, max_replicas: int = 10) -> dict[str, Any]:
    """The variant: scale on TorchServe's queue latency per request, served by Prometheus Adapter as the
    pods metric ``ts_queue_latency_ms_per_request`` (docs/deployment.md "Kubernetes" has the adapter rule)."""
    document = hpa(spec, max_replicas=max_replicas)
    document["metadata"]["name"] = f"{resource_name(spec)}-queue-latency"
    document["spec"]["metrics"] = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "ts_queue_latency_ms_per_request"},
                "target": {"type": "AverageValue", "averageValue": str(target_ms)},
            },
        }
    ]
    return document


def pdb(spec: ModelSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": resource_name(spec), "labels": labels(spec)},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels(spec)}},
    }


def network_policy(spec: ModelSpec) -> dict[str, Any]:
    """Inference ports from the gateway's namespaces, metrics from monitoring's; nothing else in."""

    def port(number: int) -> dict[str, Any]:
        return {"protocol": "TCP", "port": number}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": resource_name(spec), "labels": labels(spec)},
        "spec": {
            "podSelector": {"matchLabels": labels(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": GATEWAY_LABEL}}], "ports": [port(HTTP), port(GRPC)]},
                {"from": [{"namespaceSelector": {"matchLabels": MONITORING_LABEL}}], "ports": [port(METRICS)]},
            ],
        },
    }


def k8s_manifests(spec: ModelSpec, image: str, profiles: Path = PROFILE_DIR) -> dict[str, dict[str, Any]]:
    """File name -> manifest for one model (``kustomization.yaml`` lists all but the HPA variant)."""
    files = {
        "deployment.yaml": deployment(spec, image),
        "service.yaml": service(spec),
        "hpa.yaml": hpa(spec),
        "pdb.yaml": pdb(spec),
        "networkpolicy.yaml": network_policy(spec),
    }
    config_map = profiles_config_map(spec, profiles)
    if config_map is not None:
        files["profiles.yaml"] = config_map
    files["kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files),
    }
    files["hpa-queue-latency.yaml"] = hpa_queue_latency(spec)
    return files


# ---------------------------------------------------------------- KServe


def model_snapshot(specs: Sequence[ModelSpec], batch: int | None) -> str:
    """TorchServe's ``model_snapshot`` for the archives (``batch`` forces a batch size)."""
    models = {
        s.name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{s.name}.mar",
                "minWorkers": s.workers,
                "maxWorkers": s.workers,
                "batchSize": s.batch if batch is None else batch,
                "maxBatchDelay": s.delay_ms,
                "responseTimeout": s.timeout_s,
            }
        }
        for s in specs
    }
    return json.dumps({"name": "startup.cfg", "modelCount": len(models), "models": models}, separators=(",", ":"))


HARDENED = [
    "enable_model_api=false",
    "install_py_dep_per_model=false",
    "job_queue_size=100",
    "number_of_netty_threads=2",
    "netty_client_threads=2",
    "default_response_timeout=120",
    "max_request_size=26214400",
    "max_response_size=26214400",
    "metrics_mode=prometheus",
    "model_metrics_auto_detect=true",
]


def servekit_properties(specs: Sequence[ModelSpec]) -> str:
    """``config/config.properties`` for the kit's ServingRuntime: TorchServe alone, batching as shipped."""
    lines = [
        "# The kit's KServe ServingRuntime (servekit-torchserve): TorchServe answers KServe v1 and v2 bodies itself.",
        "# Listeners on 0.0.0.0 inside the pod (KServe routes to 8080); management on loopback only.",
        "# Token auth is off in the pod (--disable-token-auth in the runtime's args): see docs/deployment.md",
        "# model; environment variables may override keys (TS_*), as KServe's own TorchServe runtime needs.",
        f"inference_address=http://0.0.0.0:{HTTP}",
        f"management_address=http://127.0.0.1:{MANAGEMENT}",
        f"metrics_address=http://0.0.0.0:{METRICS}",
        "grpc_inference_address=0.0.0.0",
        f"grpc_inference_port={GRPC}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={GRPC_MANAGEMENT}",
        "enable_envvars_config=true",
        *HARDENED,
        "load_models=all",
        f"model_snapshot={model_snapshot(specs, None)}",
    ]
    return "\n".join(lines) + "\n"


def stock_properties(specs: Sequence[ModelSpec]) -> str:
    """``config/config.properties`` for KServe's stock TorchServe runtime (torchserve-kfs wrapper + envelope).

    Its envelopes read only the first request of a batch, so every model runs at ``batchSize`` 1.
    """
    lines = [
        "# KServe's stock TorchServe runtime (kserve-torchserve, pytorch/torchserve-kfs): its wrapper listens",
        f"# on 8080 and forwards to TorchServe on 127.0.0.1:{STOCK_INFERENCE}; TS_SERVICE_ENVELOPE picks the",
        "# kserve/kservev2 envelope, which answers only the first request of a batch: batchSize 1 here.",
        f"inference_address=http://127.0.0.1:{STOCK_INFERENCE}",
        f"management_address=http://127.0.0.1:{MANAGEMENT}",
        f"metrics_address=http://0.0.0.0:{METRICS}",
        f"grpc_inference_port={GRPC}",
        f"grpc_management_port={GRPC_MANAGEMENT}",
        "disable_token_authorization=true",
        "enable_envvars_config=true",
        "enable_metrics_api=true",
        *HARDENED,
        "model_store=/mnt/models/model-store",
        f"model_snapshot={model_snapshot(specs, 1)}",
    ]
    return "\n".join(lines) + "\n"


def serving_runtime(image: str) -> dict[str, Any]:
    """A ServingRuntime for the kit's TorchServe image: no wrapper, no envelope, batching on."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": "servekit-torchserve", "annotations": {"serving.kserve.io/server-type": "torchserve"}},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(METRICS), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "servekit", "version": "1", "autoSelect": True, "priority": 1}],
            "protocolVersions": ["v1", "v2"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": image,
                    "args": torchserve_args("/mnt/models/config/config.properties", "/mnt/models/model-store"),
                    "ports": [{"containerPort": HTTP, "protocol": "TCP"}],
                    "securityContext": {
                        "runAsUser": 1000,
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "privileged": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                }
            ],
        },
    }


def triton_runtime(image: str) -> dict[str, Any]:
    """A ServingRuntime for the kit's Triton image (its python steps need the kit's packages)."""
    runtime = serving_runtime(image)
    runtime["metadata"] = {"name": "servekit-triton", "annotations": {"serving.kserve.io/server-type": "tritonserver"}}
    spec = runtime["spec"]
    spec["annotations"]["prometheus.kserve.io/port"] = "8002"
    spec["supportedModelFormats"] = [{"name": "triton", "version": "2", "autoSelect": False, "priority": 1}]
    spec["protocolVersions"] = ["v2", "grpc-v2"]
    spec["containers"][0]["args"] = [
        "tritonserver",
        "--model-repository=/mnt/models",
        f"--http-port={HTTP}",
        "--grpc-port=9000",
        "--allow-grpc=true",
        "--allow-http=true",
    ]
    return runtime


def inference_service(
    name: str, storage: str, model_format: str, specs: Sequence[ModelSpec], *, runtime: str = "", protocol: str = ""
) -> dict[str, Any]:
    """An InferenceService over one storage tree, its predictor sized for every model it serves."""
    model: dict[str, Any] = {"modelFormat": {"name": model_format}, "storageUri": storage}
    if runtime:
        model["runtime"] = runtime
    if protocol:
        model["protocolVersion"] = protocol
    model["resources"] = resources(specs)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"}},
        "spec": {"predictor": {"minReplicas": 2, "maxReplicas": 10, "model": model}},
    }


def kserve_manifests(
    specs: Sequence[ModelSpec], storage: str, image: str, triton_image: str
) -> dict[str, dict[str, Any]]:
    """File name -> manifest: the stock runtime (v1, v2), the kit's runtime, the kit's Triton runtime."""
    stock = {}
    for protocol, envelope in (("v1", "kserve"), ("v2", "kservev2")):
        document = inference_service(
            f"servekit-ts-{protocol}", f"{storage}/torchserve-stock", "pytorch", specs, protocol=protocol
        )
        document["metadata"]["labels"] = {"serviceEnvelope": envelope}  # KServe's runtime sets TS_SERVICE_ENVELOPE
        document["spec"]["predictor"]["model"]["runtimeVersion"] = STOCK_TORCHSERVE_KFS
        stock[f"inferenceservice-torchserve-{protocol}.yaml"] = document
    return {
        "servingruntime-servekit-torchserve.yaml": serving_runtime(image),
        "servingruntime-servekit-triton.yaml": triton_runtime(triton_image),
        "inferenceservice-servekit.yaml": inference_service(
            "servekit", f"{storage}/servekit", "servekit", specs, runtime="servekit-torchserve"
        ),
        **stock,
        "inferenceservice-triton.yaml": inference_service(
            "servekit-triton", f"{storage}/triton", "triton", specs, runtime="servekit-triton", protocol="v2"
        ),
    }


def storage_layout(out: Path, specs: Sequence[ModelSpec], store: Path, triton_repo: Path | None) -> None:
    """The ``storageUri`` trees: ``<layout>/config/config.properties`` and ``<layout>/model-store/*.mar``."""
    for layout, properties in (("servekit", servekit_properties(specs)), ("torchserve-stock", stock_properties(specs))):
        root = out / "storage" / layout
        (root / "config").mkdir(parents=True, exist_ok=True)
        (root / "config" / "config.properties").write_text(properties, encoding="utf-8")
        (root / "model-store").mkdir(exist_ok=True)
        for spec in specs:
            _link(store / f"{spec.name}.mar", root / "model-store" / f"{spec.name}.mar")
    if triton_repo is not None and triton_repo.is_dir():
        target = out / "storage" / "triton"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(triton_repo, target, symlinks=False)


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def capacity_table(results: Path, names: Sequence[str], target_rps: float) -> list[str]:
    """The capacity plan (docs/deployment.md): replicas and HPA bounds per model for ``target_rps``."""
    lines = [
        f"Capacity for {target_rps:.0f} req/s per model, from {results} (one replica = the bench machine's cores):",
        "",
        "| model | fastest archive | req/s per replica | p99 ms | replicas at 70 % | HPA min / max |",
        "|---|---|---|---|---|---|",
    ]
    for model, (backend, rate, p99) in sorted(best_served(results).items()):
        if model not in names:
            continue
        replicas, most = replicas_for(rate, target_rps)
        lines.append(f"| {model} | {backend} | {rate:.1f} | {p99:.0f} | {replicas} | {replicas} / {most} |")
    return lines


# ---------------------------------------------------------------- files


def write_documents(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in files.items():
        path = folder / name
        path.write_text(yaml.safe_dump(dict(document), sort_keys=False, width=120), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("k8s", "kserve", "capacity"))
    parser.add_argument("--target-rps", type=float, default=200.0, help="capacity: the load to plan for")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--names", nargs="+", required=True, help="model folders to deploy")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--bench", type=Path, default=Path("scripts/bench_results/results.json"))
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--triton-image", default=TRITON_IMAGE)
    parser.add_argument("--triton-repo", type=Path, default=Path("model_repository/cpu"))
    parser.add_argument("--storage-uri", default="pvc://servekit-models", help="where the storage trees are uploaded")
    parser.add_argument("--out", type=Path, default=Path("build/k8s"))
    parser.add_argument("--profiles", type=Path, default=PROFILE_DIR, help="k8s: make tune's profiles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "capacity":
        for line in capacity_table(args.bench, args.names, args.target_rps):
            logger.info("%s", line)
        return 0
    bench = measured_worker_mib(args.bench)
    specs = [model_spec(name, args.models, bench) for name in args.names]
    for spec in specs:
        source = f"peak {spec.worker_mib:.0f} MiB measured by make bench" if spec.measured else "no bench figure"
        logger.info("%s: %d CPU, %d MiB per replica (%s)", spec.name, spec.cpu, spec.memory_mib, source)
    if args.what == "k8s":
        for spec in specs:
            write_documents(args.out / spec.name, k8s_manifests(spec, args.image, args.profiles))
        logger.info("Kubernetes manifests in %s/<model>/ (kubectl apply -k %s/<model>)", args.out, args.out)
        return 0
    storage_layout(args.out, specs, args.store, args.triton_repo)
    write_documents(args.out, kserve_manifests(specs, args.storage_uri, args.image, args.triton_image))
    logger.info("KServe storage trees in %s/storage/ (upload to --storage-uri), manifests in %s/", args.out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
