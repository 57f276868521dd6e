"""The Triton path: generated configs, repository layout, and a real tritonserver answering like TorchServe."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from google.protobuf import text_format

import demo_models
import reference
import shapes
import shapes_eval
import shapes_seg
from checks import assert_same_answer, assert_same_detections
from client import KeyRing, Reply, RestClient, TritonClient
from corpus import CORRUPT
from eval_metrics import answer_label_map
from kit import REPO, TRITON_MODELS, TRITON_SERVED, Server, triton_repository
from loadgen import metric_samples, metric_total
from servekit.config import read_model_config
from triton_repo import RawGraph, model_configs, parse_config, write_model
from tritonctl import ADMIN_HEADER, Triton, ensembles

DETECTORS = ("fasterrcnn", "shapes")
HANDLERS = REPO / "handlers"
TRITON_LOADS = [*TRITON_SERVED, "hf_rtdetr"]  # the DETR here only: the images' tests leave it out (memory)
SHAPES_RAW = RawGraph("images", "output0", (7, 1600))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
@pytest.mark.parametrize("name", TRITON_MODELS)
def test_generated_configs_parse(kind: str, name: str) -> None:
    config = read_model_config(REPO / "models" / name)
    raw = SHAPES_RAW if name == "shapes" else None
    configs = {model: parse_config(text) for model, text in model_configs(name, config, 91, kind, raw=raw).items()}
    ensemble = configs[name]
    assert ensemble.platform == "ensemble"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        f"{name}_preprocess",
        f"{name}_model",
        f"{name}_postprocess",
    ]
    assert ensemble.input[0].name == "IMAGE" and ensemble.output[0].name == "ANSWER"
    model = configs[f"{name}_model"]
    detector = name == "fasterrcnn"  # the torchvision detector; shapes (raw output) batches like a classifier
    assert model.max_batch_size == (0 if detector else 16)
    assert detector or model.dynamic_batching.max_queue_delay_microseconds > 0
    if kind == "gpu":
        assert model.platform == "onnxruntime_onnx"
        assert model.instance_group[0].kind == model.instance_group[0].KIND_GPU
        if not detector:
            (trt,) = model.optimization.execution_accelerators.gpu_execution_accelerator
            assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
            assert trt.parameters["trt_engine_cache_enable"] == "1"
            assert model.model_warmup[0].batch_size == 8
    else:
        assert model.backend == "python"
        assert model.instance_group[0].kind == model.instance_group[0].KIND_CPU
    if name == "shapes":
        pre = configs["shapes_preprocess"]
        assert [(t.name, list(t.dims)) for t in pre.output] == [("images", [3, 320, 320]), ("geometry", [6])]
        assert [(t.name, list(t.dims)) for t in model.output] == [("output0", [7, 1600])]
        assert [t.name for t in configs["shapes_postprocess"].input] == ["output0", "geometry"]
    if name == "hf_rtdetr":  # the recipe's 640 x 640 batches; each image's size goes around the model
        pre = configs["hf_rtdetr_preprocess"]
        assert [(t.name, list(t.dims)) for t in pre.output] == [("pixel_values", [3, 640, 640]), ("size", [2])]
        assert [(t.name, list(t.dims)) for t in model.output] == [("logits", [-1, -1]), ("pred_boxes", [-1, 4])]
        assert [t.name for t in configs["hf_rtdetr_postprocess"].input] == ["logits", "pred_boxes", "size"]


def test_a_detector_with_masks_is_refused_not_served_without_them(tmp_path: Path) -> None:
    """A Mask R-CNN's graph gives masks beside boxes, labels and scores: its ensemble would drop them, so
    `make triton-repo` says so in one line instead of writing it."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "models" / "masked"
    folder.mkdir(parents=True)
    for file in ("model-config.yaml", "labels.json"):
        shutil.copy(REPO / "models" / "fasterrcnn" / file, folder / file)
    outputs = ["boxes", "labels", "scores", "masks"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], [name]) for name in outputs],
        "masked",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, None, None])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3, None, None]) for name in outputs],
    )
    (tmp_path / "onnx" / "masked").mkdir(parents=True)
    onnx.save(helper.make_model(graph), str(tmp_path / "onnx" / "masked" / "model.onnx"))
    with pytest.raises(SystemExit) as refused:
        write_model("masked", tmp_path / "models", tmp_path / "onnx", tmp_path / "repo", kind="cpu", handlers=HANDLERS)
    assert "masks (masks or keypoints), which only TorchServe answers" in str(refused.value)
    assert not (tmp_path / "repo").exists()


def test_a_bad_config_is_reported_with_line_and_column() -> None:
    with pytest.raises(text_format.ParseError) as err:
        parse_config('name: "x"\nmax_batch_size: "sixteen"\n')
    assert str(err.value).startswith("2:")


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_repository_layout(kind: str) -> None:
    root = triton_repository(kind)
    assert set(ensembles(root)) == set(TRITON_MODELS)
    for name in TRITON_MODELS:
        for step in ("preprocess", "postprocess"):
            version = root / f"{name}_{step}" / "1"
            assert (version / "model.py").is_file() and (version / "servekit" / "triton_steps.py").is_file()
            assert (version / "model-config.yaml").is_file() and (version / "labels.json").is_file()
        assert (root / f"{name}_model" / "1" / "model.onnx").is_file()
        for config in root.glob(f"{name}*/config.pbtxt"):
            parse_config(config.read_text())


# ---------------------------------------------------------------- a real tritonserver


@pytest.fixture(scope="module", params=["http", "grpc"])
def triton_client(request: pytest.FixtureRequest, triton: Triton) -> TritonClient:
    url = triton.endpoints.http_url if request.param == "http" else triton.endpoints.grpc_url
    return TritonClient(url, request.param)


@pytest.mark.e2e
def test_ready_and_metadata(triton: Triton) -> None:
    from tritonclient import http

    client = http.InferenceServerClient(triton.endpoints.http_url)
    assert client.is_server_ready()
    for name in TRITON_LOADS:
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("IMAGE", "BYTES")]
        assert [o["name"] for o in meta["outputs"]] == ["ANSWER"]


@pytest.mark.e2e
def test_listens_on_loopback_only_and_guards_the_repository_api(triton: Triton) -> None:
    assert triton.process is not None
    process = psutil.Process(triton.process.pid)
    listening = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    url = f"http://{triton.endpoints.http_url}/v2/repository/models/resnet18/unload"
    assert requests.post(url, timeout=10).status_code in (400, 401, 403)
    index = f"http://{triton.endpoints.http_url}/v2/repository/index"
    key = (triton.workdir / "triton_admin_key").read_text().strip()
    assert requests.post(index, headers={ADMIN_HEADER: key}, timeout=10).status_code == 200


@pytest.mark.e2e
def test_answers_equal_torchserve(
    triton_client: TritonClient, server: Server, photos: dict[str, np.ndarray], jpegs: dict[str, bytes]
) -> None:
    # Both servers run the same network; the detectors are compared on the same backend (their ONNX graphs,
    # which TorchServe serves as <name>_onnx): scores of eager and ONNX Runtime differ by ~1.5e-4.
    torchserve = RestClient(server.endpoints, KeyRing(server.key_file))
    for name in TRITON_SERVED:  # the DETR: test_detr_answers_as_the_handler
        detector = name in DETECTORS
        served_as = f"{name}_onnx" if detector else name
        for photo in ("astronaut", "coffee", "chelsea"):
            ours, theirs = triton_client.predict(name, jpegs[photo]), torchserve.predict(served_as, jpegs[photo])
            assert ours.status == theirs.status == 200, (ours, theirs)
            if detector:
                assert_same_detections(ours.body, theirs.body)
            else:
                assert_same_answer(ours.body, theirs.body, tol=1e-4)


@pytest.mark.e2e
def test_detector_answers_match_the_raw_model(triton_client: TritonClient, photos: dict[str, np.ndarray]) -> None:
    for name in reference.ORT_DETECTOR_PHOTOS:
        answer = triton_client.predict("fasterrcnn", demo_models.encode(photos[name], "PNG"))
        assert answer.status == 200 and answer.body, answer
        reference.assert_detections_close(answer.body, reference.detections("fasterrcnn", photos[name]))


def _stats(triton: Triton, model: str) -> tuple[int, int]:
    from tritonclient import http

    stats = http.InferenceServerClient(triton.endpoints.http_url).get_inference_statistics(model)
    entry = stats["model_stats"][0]
    return int(entry["inference_count"]), int(entry["execution_count"])


@pytest.mark.e2e
def test_concurrent_requests_are_batched_and_a_corrupt_one_fails_alone(
    triton: Triton, triton_client: TritonClient, jpegs: dict[str, bytes]
) -> None:
    good = [jpegs[n] for n in ("astronaut", "coffee", "chelsea")]
    payloads = [good[i % 3] for i in range(15)]
    expected = {data: triton_client.predict("resnet18", data).body for data in good}
    for data, reply in zip(payloads, send_batched_with_a_corrupt_one(triton, triton_client, "resnet18", payloads)):
        assert_same_answer(reply.body, expected[data], tol=1e-5)


def send_batched_with_a_corrupt_one(triton: Triton, client: TritonClient, model: str, good: list[bytes]) -> list[Reply]:
    """Send 15 good images with a corrupt one sixth, all at once: the corrupt one fails alone with the kit's
    error, the 15 share fewer model executions than requests. Returns the good ones' replies, in order."""
    assert len(good) == 15
    payloads = [*good[:5], CORRUPT, *good[5:]]
    inferences, executions = _stats(triton, f"{model}_model")
    with ThreadPoolExecutor(16) as pool:
        replies: list[Reply] = list(pool.map(lambda d: client.predict(model, d), payloads))
    after_inferences, after_executions = _stats(triton, f"{model}_model")
    assert [r.status for r in replies] == [400 if d is CORRUPT else 200 for d in payloads]
    assert "corrupt or truncated" in replies[5].body["error"], replies[5]
    assert after_inferences - inferences == 15
    assert after_executions - executions < 15, (after_executions - executions, "no batch formed")
    return [*replies[:5], *replies[6:]]


@pytest.mark.e2e
def test_detr_answers_as_the_handler(
    triton: Triton, triton_client: TritonClient, load_handler: Any, jpegs: dict[str, bytes]
) -> None:
    """The RT-DETR ensemble (``pixel_values`` -> ``logits``, ``pred_boxes``) answers photos of mixed sizes, sent
    at once with a corrupt one, as its archive does when TorchServe's own loader runs it (the network in torch)."""
    photos = [jpegs[name] for name in sorted(jpegs)]
    good = [photos[i % len(photos)] for i in range(15)]
    answers = load_handler("hf_rtdetr").handle([{"body": data} for data in photos])
    assert all(status == 200 for status, _ in answers), answers
    expected = {data: body for data, (_, body) in zip(photos, answers)}
    replies = send_batched_with_a_corrupt_one(triton, triton_client, "hf_rtdetr", good)
    assert any(expected[data] for data in good), "no detection passed score_threshold: nothing compared"
    for data, reply in zip(good, replies):
        assert_same_detections(reply.body, expected[data])


@pytest.mark.e2e
def test_bad_inputs_get_the_kits_errors(triton_client: TritonClient) -> None:
    text = triton_client.predict("resnet18", b"hello, not an image")
    assert text.status == 400 and "not an image" in text.body["error"], text
    bomb = triton_client.predict("fasterrcnn", json.dumps({"data": "@@@"}).encode())
    assert bomb.status == 400 and "base64" in bomb.body["error"], bomb


@pytest.mark.e2e
def test_the_python_steps_export_the_quality_metrics(triton: Triton) -> None:
    """After the requests above: the steps' custom metrics on Triton's metrics port, named as TorchServe's
    (a histogram as its _sum and _count), so deploy/monitoring's rules read both servers."""
    samples = metric_samples(requests.get(f"http://127.0.0.1:{triton.endpoints.metrics}/metrics", timeout=10).text)

    def value(name: str, **labels: str) -> float:
        return metric_total(samples, name, **labels)

    assert value("ServekitTop1Confidence_count", ModelName="resnet18") > 0
    confidence = value("ServekitTop1Confidence_sum", ModelName="resnet18")
    assert 0 < confidence <= value("ServekitTop1Confidence_count", ModelName="resnet18")
    assert value("ServekitImageBrightness_count", ModelName="resnet18") > 0
    assert value("ServekitBadInputs", ModelName="resnet18", ErrorClass="BadInput") >= 1
    assert value("ServekitAnswers", ModelName="fasterrcnn") > 0


def answered(client: TritonClient, model: str, images: list[bytes]) -> list[Reply]:
    """Every image sent to ``model`` through Triton, 8 at a time; each must be answered 200."""
    with ThreadPoolExecutor(8) as pool:
        replies: list[Reply] = list(pool.map(lambda data: client.predict(model, data), images))
    assert all(r.status == 200 for r in replies), next(r for r in replies if r.status != 200)
    return replies


@pytest.mark.e2e
def test_shapes_detector_map_through_triton_equals_torchserve(
    triton_client: TritonClient, server: Server, shape_scenes: tuple[list[shapes.Scene], list[bytes]]
) -> None:
    # Triton runs the ONNX graph, so its answers are compared with TorchServe's shapes_onnx archive.
    scenes, images = shape_scenes
    replies = answered(triton_client, "shapes", images)
    score = shapes_eval.map50(scenes, [r.body for r in replies])
    sys.stderr.write(
        f"\n[shapes] mAP@0.5 through Triton ({triton_client.protocol}) on {len(scenes)} scenes: {score:.3f}\n"
    )
    assert score >= shapes.MIN_MAP50
    torchserve = RestClient(server.endpoints, KeyRing(server.key_file))
    for image, ours in zip(images[:24], replies[:24]):
        theirs = torchserve.predict("shapes_onnx", image)
        assert theirs.status == 200
        assert_same_detections(ours.body, theirs.body)


@pytest.mark.e2e
def test_shapes_segmenter_miou_through_triton_equals_torchserve(
    triton_client: TritonClient, server: Server, shape_scenes: tuple[list[shapes.Scene], list[bytes]]
) -> None:
    # Triton runs the ONNX graph and TorchServe the TorchScript one: the same mean IoU, nearly every pixel alike.
    scenes, images = shape_scenes
    replies = answered(triton_client, "shapes_seg", images)
    miou, _ = shapes_seg.mean_iou(scenes, [r.body for r in replies])
    torchserve = RestClient(server.endpoints, KeyRing(server.key_file))
    theirs = [torchserve.predict("shapes_seg", d).body for d in images]
    served_miou, _ = shapes_seg.mean_iou(scenes, theirs)
    sys.stderr.write(
        f"\n[shapes_seg] mean IoU through Triton ({triton_client.protocol}): {miou:.4f}, "
        f"TorchServe: {served_miou:.4f}\n"
    )
    assert miou >= shapes_seg.MIN_MIOU and abs(miou - served_miou) <= 0.002
    for ours, their in zip(replies[:16], theirs[:16]):
        same = (answer_label_map(ours.body) == answer_label_map(their)).mean()
        assert same >= 0.999, same


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["shapes", "shapes_seg"])
def test_images_of_mixed_sizes_batch_and_a_corrupt_one_fails_alone(
    triton: Triton, triton_client: TritonClient, shape_scenes: tuple[list[shapes.Scene], list[bytes]], model: str
) -> None:
    images = shape_scenes[1][:15]
    expected = [triton_client.predict(model, d).body for d in images]
    for reply, want in zip(send_batched_with_a_corrupt_one(triton, triton_client, model, images), expected):
        if model == "shapes":
            assert_same_detections(reply.body, want)
        else:  # the same ONNX graph alone or in a batch: the same label map
            assert reply.body == want


def test_yolo_steps_answer_as_the_torchserve_service(shape_scenes: tuple[list[shapes.Scene], list[bytes]]) -> None:
    # The ensemble's steps, run in process around the same network, give the handler's exact answers.
    import torch

    from servekit.config import read_model_config as read
    from servekit.loading import load_model
    from servekit.service import build_service
    from servekit.triton_steps import YoloSteps, load_steps

    folder = REPO / "models" / "shapes"
    images = [*shape_scenes[1][:3], CORRUPT]
    steps = load_steps(folder)
    assert isinstance(steps, YoloSteps) and steps.batched
    outcomes = steps.preprocess(images).answers
    assert isinstance(outcomes[3], Exception) and "corrupt" in str(outcomes[3])
    good = outcomes[:3]
    model = load_model(folder, read(folder).model, torch.device("cpu"))
    with torch.inference_mode():
        raw = model(torch.from_numpy(np.stack([o["images"] for o in good]))).numpy()
    geometry = np.stack([o["geometry"] for o in good])
    answers = [json.loads(a) for a in steps.postprocess({"output0": raw, "geometry": geometry})]
    service = build_service(read(folder), folder, torch.device("cpu"), max_batch=4)
    expected = service.handle([{"body": data} for data in images]).answers
    assert answers == expected[:3] and isinstance(expected[3], Exception)
