"""The container images `make image` builds, run for real with Docker on the host's network (127.0.0.1 ports
only): the TorchServe image answers as the local TorchServe does over REST and gRPC, runs as a non-root user,
reports healthy, and finishes 16 in-flight requests on `docker stop`; the Triton image answers as the local
Triton does. Every container a test starts, it removes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

import demo_models
from checks import assert_same_answer, assert_same_detections
from client import GrpcClient, KeyRing, RestClient, TritonClient
from images import TORCHSERVE_IMAGE, TRITON_IMAGE, docker, run_torchserve, run_triton
from kit import TRITON_SERVED, Server
from profiles import Machine, record_choice, this_machine
from tritonctl import Triton
from tsctl import Endpoints, Keys, free_ports

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def images_built() -> None:
    """Docker must answer and `make image` must have built both images (`make test` builds them)."""
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    assert info.returncode == 0, f"no Docker engine: {info.stderr.strip()[:300]} (.ci/run starts dockerd)"
    for tag in (TORCHSERVE_IMAGE, TRITON_IMAGE):
        assert docker("image", "inspect", tag, check=False, capture=True).returncode == 0, f"{tag}: run make image"


@contextlib.contextmanager
def container(name: str) -> Iterator[str]:
    """Remove any leftover of ``name`` before, and the container after, whatever happens."""
    docker("rm", "-f", name, check=False, capture=True)
    try:
        yield name
    finally:
        logs = docker("logs", "--tail", "30", name, check=False, capture=True)
        docker("rm", "-f", name, check=False, capture=True)
        if logs.returncode == 0:
            print(logs.stdout[-2000:], logs.stderr[-2000:])


def wait_torchserve(name: str, ep: Endpoints, tmp: Path, models: list[str], timeout: float = 300) -> KeyRing:
    """Wait for the key file and every model's /ping-ready worker; return the container's keys (copied out)."""
    keys = tmp / f"{name}-keys.json"
    deadline = time.monotonic() + timeout
    while True:
        copied = docker("cp", f"{name}:/tmp/servekit/key_file.json", str(keys), check=False, capture=True)
        if copied.returncode == 0:
            ring = KeyRing(keys)
            with contextlib.suppress(requests.RequestException):
                ping = requests.get(f"{ep.url('inference')}/ping", headers=auth(ring), timeout=5)
                if ping.status_code == 200 and all(answers(ep, ring, m) for m in models):
                    return ring
        state = docker("inspect", "--format", "{{.State.Running}}", name, capture=True).stdout.strip()
        assert state == "true", docker("logs", "--tail", "80", name, capture=True).stdout
        assert time.monotonic() < deadline, f"{name} not ready in {timeout:.0f} s"
        time.sleep(2)


def auth(ring: KeyRing) -> dict[str, str]:
    return {"Authorization": f"Bearer {ring.inference}"}


def answers(ep: Endpoints, ring: KeyRing, model: str) -> bool:
    """Whether ``model`` answers a small gray image (its worker is up)."""
    image = demo_models.encode(np.full((32, 32, 3), 128, np.uint8))
    with contextlib.suppress(requests.RequestException):
        url = f"{ep.url('inference')}/predictions/{model}"
        return requests.post(url, data=image, headers=auth(ring), timeout=60).status_code == 200
    return False


MODELS = ["digits", "resnet18", "fasterrcnn", "shapes"]


def test_torchserve_image_answers_as_local_torchserve(server: Server, jpegs: dict[str, bytes], tmp_path: Path) -> None:
    ep = Endpoints(*free_ports(5))
    profiles = tmp_path / "profiles"  # mounted over the image's: this machine's profile, and another CPU's
    record_choice("digits", {"batchSize": 3, "maxBatchDelay": 7}, this_machine(), profiles)
    record_choice("resnet18", {"batchSize": 5}, Machine("Intel(R) Xeon(R) Platinum 8480+", ("amx_tile",), 8), profiles)
    profiles.chmod(0o755)
    for path in profiles.iterdir():
        path.chmod(0o644)
    with container("servekit-test-answers") as name:
        run_torchserve(TORCHSERVE_IMAGE, name, ep, ["-v", f"{profiles}:/home/model-server/profiles:ro"])
        ring = wait_torchserve(name, ep, tmp_path, MODELS)
        batching = {m: described(ep, ring, m) for m in ("digits", "resnet18")}
        assert batching == {"digits": (3, 7), "resnet18": (8, 20)}, batching  # resnet18: its shipped keys
        assert "servekit: applied tuned profile" in docker("logs", name, capture=True).stderr
        assert docker("exec", name, "id", "-u", capture=True).stdout.strip() == "1000"
        users = docker("exec", name, "ps", "-e", "-o", "uid=", capture=True).stdout.split()
        assert users and set(users) == {"1000"}, users  # every process of the container, workers included
        local_keys = KeyRing(server.key_file)
        pairs = [
            (RestClient(ep, ring), RestClient(server.endpoints, local_keys)),
            (GrpcClient(ep, ring), GrpcClient(server.endpoints, local_keys)),
        ]
        for theirs, ours in pairs:
            for model in MODELS:
                for photo in ("astronaut", "coffee", "chelsea"):
                    got, want = theirs.predict(model, jpegs[photo]), ours.predict(model, jpegs[photo])
                    assert got.status == want.status == 200, (model, got, want)
                    assert_same_answer(got.body, want.body, tol=1e-5)
        bad = RestClient(ep, ring).predict("resnet18", b"not an image")
        assert bad.status == 400 and "not an image" in bad.body["error"]
        deadline = time.monotonic() + 60
        while (health := health_of(name)) != "healthy":
            assert health == "starting" and time.monotonic() < deadline, health
            time.sleep(2)


def described(ep: Endpoints, ring: KeyRing, model: str) -> tuple[int, int]:
    """The model's batch size and delay as TorchServe's management API reports them."""
    headers = {"Authorization": f"Bearer {Keys.read(ring.path).management}"}
    (model_info,) = requests.get(f"{ep.url('management')}/models/{model}", headers=headers, timeout=10).json()
    return model_info["batchSize"], model_info["maxBatchDelay"]


def health_of(name: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", name, capture=True).stdout.strip()


def test_docker_stop_answers_the_requests_in_flight(jpegs: dict[str, bytes], tmp_path: Path) -> None:
    """16 requests in flight when `docker stop` comes: every one answered 200, the container exits 0."""
    ep = Endpoints(*free_ports(5))
    phone = demo_models.user_image("phone_4032x3024.jpg")  # 12 MP: requests take a while, really in flight
    with container("servekit-test-stop") as name:
        run_torchserve(TORCHSERVE_IMAGE, name, ep, ["--stop-timeout", "90"])
        ring = wait_torchserve(name, ep, tmp_path, ["fasterrcnn"])
        client = RestClient(ep, ring)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client.predict, "fasterrcnn", phone) for _ in range(16)]
            time.sleep(1.0)
            assert sum(f.done() for f in futures) < 16, "the requests finished before the stop: make them slower"
            started = time.monotonic()
            stopped = subprocess.run(["docker", "stop", "-t", "90", name], capture_output=True, text=True, timeout=120)
            stop_s = time.monotonic() - started
            replies = [f.result(timeout=120) for f in futures]
        assert stopped.returncode == 0, stopped.stderr
        assert [r.status for r in replies] == [200] * 16, [(r.status, str(r.body)[:100]) for r in replies]
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name, capture=True).stdout)
        logs = docker("logs", name, capture=True)
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, logs.stderr[-1500:])
        assert "answering the requests in flight" in logs.stderr
        print(f"\ndocker stop with 16 in flight: all answered, exit 0, stop took {stop_s:.1f} s")


def test_triton_image_answers_as_local_triton(triton: Triton, jpegs: dict[str, bytes]) -> None:
    ports = free_ports(3)
    with container("servekit-test-triton") as name:
        run_triton(TRITON_IMAGE, name, ports, TRITON_SERVED)
        url = f"127.0.0.1:{ports[0]}"
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            running = docker("inspect", "--format", "{{.State.Running}}", name, capture=True).stdout.strip()
            assert running == "true" and time.monotonic() < deadline, docker("logs", name, capture=True).stderr[-3000:]
            time.sleep(2)
        assert docker("exec", name, "id", "-u", capture=True).stdout.strip() == "1000"
        deadline = time.monotonic() + 60  # the HEALTHCHECK follows the moved port
        while (health := health_of(name)) != "healthy":
            assert health == "starting" and time.monotonic() < deadline, health
            time.sleep(2)
        for protocol, local_url, their_url in (
            ("http", triton.endpoints.http_url, url),
            ("grpc", triton.endpoints.grpc_url, f"127.0.0.1:{ports[1]}"),
        ):
            theirs, ours = TritonClient(their_url, protocol), TritonClient(local_url, protocol)
            for model in TRITON_SERVED:
                for photo in ("astronaut", "coffee"):
                    got, want = theirs.predict(model, jpegs[photo]), ours.predict(model, jpegs[photo])
                    assert got.status == want.status == 200, (model, got, want)
                    if model in ("fasterrcnn", "shapes"):
                        assert_same_detections(got.body, want.body)
                    else:
                        assert_same_answer(got.body, want.body, tol=1e-5)
