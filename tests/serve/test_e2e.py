"""End to end against a real `torchserve` (shipped config.properties, free loopback ports, token auth on)."""

from __future__ import annotations

import base64
import io
import ipaddress
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import requests
from PIL import Image

import demo_models
import reference
import shapes
import shapes_eval
import shapes_seg
from checks import assert_same_answer
from client import GrpcClient, KeyRing, RestClient, predict_many
from eval_metrics import answer_label_map
from kit import REPO, Server
from loadgen import servekit_counters

pytestmark = pytest.mark.e2e
CORRUPT = demo_models.encode(np.zeros((64, 64, 3), np.uint8), "JPEG")[:300]


@pytest.fixture(scope="module")
def rest(server: Server) -> RestClient:
    return RestClient(server.endpoints, KeyRing(server.key_file))


@pytest.fixture(scope="module")
def grpc_client(server: Server) -> GrpcClient:
    client = GrpcClient(server.endpoints, KeyRing(server.key_file))
    yield client
    client.close()


def counters(server: Server, model: str) -> dict[str, float]:
    """The handler's Servekit* counters of one model, read from the Prometheus endpoint."""
    return servekit_counters(requests.get(f"{server.endpoints.url('metrics')}/metrics", timeout=10).text, model)


@pytest.mark.parametrize(
    ("model", "photo"), [("resnet18", "chelsea"), ("mobilenet_v3_small", "coffee"), ("fasterrcnn", "astronaut")]
)
def test_rest_and_grpc_give_the_same_answers(
    model: str, photo: str, rest: RestClient, grpc_client: GrpcClient, jpegs: dict[str, bytes]
) -> None:
    over_rest = rest.predict(model, jpegs[photo])
    over_grpc = grpc_client.predict(model, jpegs[photo])
    assert over_rest.status == over_grpc.status == 200
    assert over_rest.body, "empty answer"
    assert_same_answer(over_rest.body, over_grpc.body)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small", "digits"])
def test_served_classifications_equal_the_raw_model(
    model: str, rest: RestClient, photos: dict[str, np.ndarray]
) -> None:
    for name in ("chelsea", "rocket"):
        image = photos[name]
        reply = rest.predict(model, demo_models.encode(image, "PNG"))
        assert reply.status == 200
        assert [set(item) for item in reply.body] == [{"label", "index", "score"}] * len(reply.body)
        reference.assert_classification_matches(reply.body, reference.class_probabilities(model, image))


def test_served_detections_equal_the_raw_model(
    rest: RestClient, grpc_client: GrpcClient, photos: dict[str, np.ndarray]
) -> None:
    for name in ("astronaut", "rocket", "coffee"):
        data = demo_models.encode(photos[name], "PNG")
        expected = reference.detections("fasterrcnn", photos[name])
        for reply in (rest.predict("fasterrcnn", data), grpc_client.predict("fasterrcnn", data)):
            assert reply.status == 200
            reference.assert_detections_match(reply.body, expected)


def test_digits_served_accuracy(rest: RestClient, digits_test: tuple[list[bytes], list[int]]) -> None:
    images, labels = digits_test
    replies = predict_many(rest, "digits", images, concurrency=8)
    assert all(r.status == 200 for r in replies)
    accuracy = np.mean([r.body[0]["index"] == label for r, label in zip(replies, labels)])
    assert accuracy >= 0.95, f"served digits accuracy {accuracy:.3f}"


def test_concurrent_requests_form_batches_and_answers_stay_with_their_image(
    server: Server, rest: RestClient, digits_test: tuple[list[bytes], list[int]]
) -> None:
    images = digits_test[0][:16]
    expected = [reference.class_probabilities("digits", np.asarray(_decode(b))) for b in images]
    before = counters(server, "digits")
    replies = predict_many(rest, "digits", images, concurrency=16)
    after = counters(server, "digits")
    requests_seen = after["Requests"] - before.get("Requests", 0)
    batches = after["Batches"] - before.get("Batches", 0)
    assert requests_seen == 16
    assert batches < 16, f"16 concurrent requests ran in {batches:.0f} batches: no batch larger than 1 formed"
    for reply, probs in zip(replies, expected):
        assert reply.status == 200
        reference.assert_classification_matches(reply.body, probs)


def test_detection_batch_of_three_sizes(server: Server, rest: RestClient, photos: dict[str, np.ndarray]) -> None:
    sized = {  # three different sizes (and aspect ratios) of real photos
        "astronaut": photos["astronaut"],
        "rocket": photos["rocket"][:400, :300],
        "coffee": photos["coffee"][50:350, :],
    }
    blocker = demo_models.encode(photos["hubble_deep_field"], "PNG")
    datas = [demo_models.encode(img, "PNG") for img in sized.values()]
    for _attempt in range(5):
        before = counters(server, "fasterrcnn")
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(rest.predict, "fasterrcnn", blocker)  # keeps the worker busy while three queue up
            time.sleep(0.15)
            replies = list(pool.map(lambda d: rest.predict("fasterrcnn", d), datas))
            assert first.result().status == 200
        after = counters(server, "fasterrcnn")
        if after["Requests"] - before["Requests"] == 4 and after["Batches"] - before["Batches"] == 2:
            break
    else:
        pytest.fail("the three images never shared one batch in 5 attempts")
    for reply, image in zip(replies, sized.values()):
        assert reply.status == 200
        reference.assert_detections_match(reply.body, reference.detections("fasterrcnn", image))


def test_one_corrupt_image_fails_alone_in_its_batch(
    server: Server, rest: RestClient, digits_test: tuple[list[bytes], list[int]]
) -> None:
    images = digits_test[0][16:23]
    expected = [reference.class_probabilities("digits", np.asarray(_decode(b))) for b in images]
    before = counters(server, "digits")
    for _round in range(5):
        payloads = [*images[:3], CORRUPT, *images[3:]]
        replies = predict_many(rest, "digits", payloads, concurrency=8)
        bad = replies.pop(3)
        assert bad.status == 400 and bad.body["code"] == 400
        assert "corrupt or truncated" in bad.body["error"]
        for reply, probs in zip(replies, expected):
            assert reply.status == 200
            reference.assert_classification_matches(reply.body, probs)
    after = counters(server, "digits")
    assert after["RejectedRequests"] - before.get("RejectedRequests", 0) == 5
    assert after["Batches"] - before["Batches"] < 40, "no mixed batch formed"


def test_requests_without_or_with_a_wrong_token_are_refused(server: Server, jpegs: dict[str, bytes]) -> None:
    inference, management = server.endpoints.url("inference"), server.endpoints.url("management")
    calls = [
        ("POST", f"{inference}/predictions/resnet18"),
        ("GET", f"{inference}/ping"),
        ("GET", f"{management}/models"),
    ]
    for method, url in calls:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": server.keys.inference}):
            reply = requests.request(method, url, data=jpegs["chelsea"], headers=headers, timeout=10)
            assert reply.status_code == 400, (url, headers, reply.text)
            assert reply.json()["type"] == "InvalidKeyException"
    # the inference key does not open management
    reply = requests.get(
        f"{management}/models", headers={"Authorization": f"Bearer {server.keys.inference}"}, timeout=10
    )
    assert reply.status_code == 400
    ok = requests.get(f"{inference}/ping", headers={"Authorization": f"Bearer {server.keys.inference}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "Healthy"
    from ts_grpc import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(server.endpoints.grpc("inference")) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name="resnet18", input={"data": jpegs["chelsea"]})
        for metadata in ((), (("authorization", "Bearer wrong-key"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predictions(request, metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "Token Authorization failed" in info.value.details()


def test_every_listener_is_on_loopback_and_model_api_is_off(server: Server) -> None:
    pids = server.process.processes()
    listening = [
        c.laddr
        for pid in pids
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    ports = {a.port for a in listening}
    ep = server.endpoints
    assert {ep.inference, ep.management, ep.metrics, ep.grpc_inference, ep.grpc_management} <= ports
    assert all(_is_loopback(a.ip) for a in listening), listening
    headers = {"Authorization": f"Bearer {server.keys.management}"}
    reply = requests.post(
        f"{ep.url('management')}/models", params={"url": "https://example.com/x.mar"}, headers=headers, timeout=10
    )
    assert reply.status_code == 405 and reply.json()["type"] == "MethodNotAllowedException"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # Java listens on IPv6 sockets: ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _decode(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_shapes_detector_served_map(rest: RestClient, shape_scenes: tuple[list[shapes.Scene], list[bytes]]) -> None:
    scenes, images = shape_scenes
    replies = predict_many(rest, "shapes", images, concurrency=8)
    assert all(r.status == 200 for r in replies), next(r for r in replies if r.status != 200)
    score = shapes_eval.map50(scenes, [r.body for r in replies])
    sys.stderr.write(f"\n[shapes] mAP@0.5 through TorchServe on {len(scenes)} held-out scenes: {score:.3f}\n")
    assert score >= shapes.MIN_MAP50
    in_process = shapes_eval.answers_in_process(REPO / "models" / "shapes", images[:16])
    for served, mine in zip(replies[:16], in_process):
        reference.assert_detections_close(served.body, mine)


def test_shapes_segmenter_served_miou(
    rest: RestClient, grpc_client: GrpcClient, shape_scenes: tuple[list[shapes.Scene], list[bytes]]
) -> None:
    """The trained segmenter through TorchServe: its mean IoU on the held-out scenes, and answers equal to the
    kit's service in process (REST) and over gRPC, at each scene's own size."""
    scenes, images = shape_scenes
    replies = predict_many(rest, "shapes_seg", images, concurrency=8)
    assert all(r.status == 200 for r in replies), next(r for r in replies if r.status != 200)
    miou, ious = shapes_seg.mean_iou(scenes, [r.body for r in replies])
    each = ", ".join(f"{c} {v:.3f}" for c, v in zip(shapes_seg.SEG_CLASSES, ious))
    where = f"through TorchServe on {len(scenes)} held-out scenes"
    sys.stderr.write(f"\n[shapes_seg] mean IoU {where}: {miou:.3f} ({each})\n")
    assert miou >= shapes_seg.MIN_MIOU
    assert all(r.body["size"] == list(s.mask.shape) for r, s in zip(replies, scenes))
    in_process = shapes_seg.answers_in_process(REPO / "models" / "shapes_seg", images[:8])
    assert [r.body for r in replies[:8]] == in_process
    assert [grpc_client.predict("shapes_seg", d).body for d in images[:4]] == in_process[:4]
    # a request may ask for the label map as one PNG: as a form field, or beside the image in a JSON body
    url, auth = f"{rest.base}/predictions/shapes_seg", {"Authorization": f"Bearer {rest.keys.inference}"}
    form = requests.post(url, files={"data": images[0]}, data={"format": "png"}, headers=auth, timeout=60)
    encoded = base64.b64encode(images[0]).decode()
    body = requests.post(url, json={"data": encoded, "format": "png"}, headers=auth, timeout=60)
    assert form.status_code == body.status_code == 200 and form.json() == body.json()
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(form.json()["png"]))))
    assert np.array_equal(png, answer_label_map(in_process[0]))
    bad = requests.post(url, files={"data": images[0]}, data={"format": "gif"}, headers=auth, timeout=60)
    assert bad.status_code == 400 and "format must be one of rle, png" in bad.json()["error"]
