"""KServe v1 and Open Inference Protocol v2 bodies: parsing, folding answers back, and the handlers in process
(TorchServe's own loader, with and without TorchServe's ``kserve``/``kservev2`` envelopes)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from servekit.errors import BadInput, PayloadTooLarge
from servekit.protocols import MAX_INSTANCES, PLAIN, V1, V2, V2_INPUT, Request, answer_requests, unwrap

B64 = base64.b64encode(b"\xff\xd8\xff fake jpeg").decode()


def v1(*items: Any) -> bytes:
    return json.dumps({"instances": list(items)}).encode()


def v2(*items: str, shape: list[int] | None = None, datatype: str = "BYTES", request_id: str | None = "r-1") -> bytes:
    tensor = {"name": "images", "shape": shape or [len(items)], "datatype": datatype, "data": list(items)}
    body: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        body["id"] = request_id
    return json.dumps(body).encode()


def test_unwrap_each_protocol() -> None:
    plain = unwrap({"body": bytearray(b"\xff\xd8\xff...")})
    assert plain.protocol == PLAIN and plain.instances == ({"body": bytearray(b"\xff\xd8\xff...")},)
    parsed = unwrap({"body": json.dumps({"data": B64}).encode()})
    assert parsed.protocol == PLAIN and parsed.instances == ({"body": {"data": B64}},)
    assert unwrap({"body": {"instances": [{"data": B64}, B64]}}) == Request(
        V1, ({"data": {"data": B64}}, {"data": B64})
    )
    assert unwrap({"body": v1({"b64": B64})}).instances == ({"data": {"b64": B64}},)
    found = unwrap({"body": v2(B64, B64, shape=[2, 1])})
    assert found.protocol == V2 and found.request_id == "r-1" and len(found.instances) == 2
    assert unwrap({"body": v2(B64, request_id=None)}).request_id  # a fresh id when none was sent
    nested = unwrap({"body": {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "BYTES", "data": [[B64], [B64]]}]}})
    assert len(nested.instances) == 2
    # what TorchServe's envelopes hand the handler: a v1 instance, a bare string, a v2 input tensor
    assert unwrap({"data": B64}).instances == ({"data": B64},)
    assert unwrap(B64).instances == ({"data": B64},)
    tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [B64]}
    assert unwrap(tensor) == Request(V2_INPUT, ({"data": B64},))
    assert unwrap({**tensor, "shape": [2], "data": B64}) == Request(V2_INPUT, ({"data": B64},))


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b'{"instances": []}', BadInput, "'instances' must be a non-empty list"),
        (b'{"instances": "x"}', BadInput, "'instances' must be a non-empty list"),
        (v1(*[B64] * (MAX_INSTANCES + 1)), PayloadTooLarge, f"at most {MAX_INSTANCES} per request"),
        (v2(B64, datatype="FP32"), BadInput, "datatype 'FP32'"),
        (v2(B64, B64, shape=[3]), BadInput, "shape [3] but 2 elements"),
        (v2(B64, shape=[-1]), BadInput, "non-negative integers"),
        (b'{"inputs": []}', BadInput, "a list of one input tensor"),
        (b'{"inputs": [{"datatype": "BYTES", "data": []}]}', BadInput, "must be a non-empty list"),
        (b'{"id": 7, "inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}', BadInput, "'id'"),
        (b'{"instances": [', BadInput, "not valid JSON"),
    ],
)
def test_malformed_bodies_are_the_requests_own_error(body: bytes, error: type, words: str) -> None:
    request = unwrap({"body": body})
    assert request.instances == () and isinstance(request.error, error) and words in str(request.error)


def test_answers_fold_back_per_request() -> None:
    requests = [
        unwrap({"body": b"\xff\xd8"}),
        unwrap({"body": v1(B64, B64)}),
        unwrap({"body": b'{"instances": []}'}),
        unwrap({"body": v2(B64, B64, B64)}),
        unwrap({"name": "in", "shape": [1], "datatype": "BYTES", "data": [B64]}),
        unwrap({"body": v1(B64, B64, B64)}),
    ]
    bad = BadInput("not an image: corrupt")
    answers = [{"a": 0}, {"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}, {"a": 5}, {"a": 6}, bad, {"a": 8}, bad]
    out = answer_requests(requests, answers, "digits")
    assert out[0] == {"a": 0}
    assert out[1] == {"predictions": [{"a": 1}, {"a": 2}]}
    assert isinstance(out[2], BadInput)
    assert out[3] == {
        "id": "r-1",
        "model_name": "digits",
        "outputs": [
            {"name": "output-0", "shape": [3], "datatype": "BYTES", "data": ['{"a": 3}', '{"a": 4}', '{"a": 5}']}
        ],
    }
    assert out[4] == ['{"a": 6}']
    assert isinstance(out[5], BadInput)
    assert str(out[5]) == "instance 0: not an image: corrupt (1 more of 3 instances failed)"


# ------------------------------------------------------------------ in process, TorchServe's own loader


def load(folder: Path, envelope: str | None, batch: int) -> Any:
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    handler = manifest["model"]["handler"]
    return TsModelLoader().load("digits", str(folder), handler, None, batch, envelope=envelope, metrics_cache=metrics)


def run(service: Any, rows: list[Any]) -> list[tuple[int, Any]]:
    """One batch through the loaded entry point (envelope included) as TorchServe's worker runs it."""
    from ts.context import RequestProcessor

    context = service.context
    context.request_processor = [RequestProcessor({}) for _ in rows]
    context.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    context.metrics.request_ids = context.request_ids
    bodies = service._entry_point(rows, context)
    assert len(bodies) == len(rows)
    statuses = [context.get_response_status(i)[0] or 200 for i in range(len(rows))]
    return [(s, json.loads(b) if isinstance(b, bytes) else b) for s, b in zip(statuses, bodies)]


@pytest.fixture(scope="module")
def digits(extracted: Any, digits_test: tuple[list[bytes], list[int]]) -> tuple[Path, list[bytes], list[Any]]:
    """The digits archive, 6 test images and each one's plain answer."""
    folder = extracted("digits")
    images = digits_test[0][:6]
    plain = run(load(folder, None, 8), [{"body": bytearray(image)} for image in images])
    assert all(status == 200 for status, _ in plain)
    return folder, images, [answer for _, answer in plain]


def same(got: list[Any], want: list[Any]) -> bool:
    """Top-k answers equal up to float noise (a batch of another size may differ in the last bits)."""
    flat = [(c["index"], c["label"], c["score"]) for answer in got for c in answer]
    expected = [(c["index"], c["label"], c["score"]) for answer in want for c in answer]
    return [f[:2] for f in flat] == [e[:2] for e in expected] and all(
        abs(f[2] - e[2]) < 1e-4 for f, e in zip(flat, expected)
    )


def encoded(image: bytes) -> str:
    return base64.b64encode(image).decode()


def test_kserve_bodies_in_one_model_batch(digits: tuple[Path, list[bytes], list[Any]]) -> None:
    folder, images, plain = digits
    service = load(folder, None, 8)
    calls: list[int] = []
    kit = service._entry_point.__self__.service
    infer = kit.infer
    kit.infer = lambda items: calls.append(len(items)) or infer(items)
    b64 = [encoded(image) for image in images]
    rows = [
        {"body": bytearray(images[0])},
        {"body": v1({"data": b64[1]}, b64[2])},
        {"body": json.loads(v2(b64[3], b64[4], request_id="abc"))},  # parsed by TorchServe (JSON content type)
        {"body": v1(b64[5], "bm90IGFuIGltYWdl")},  # a bad second instance fails this request alone
        {"body": v2(b64[0], shape=[2])},
    ]
    results = run(service, rows)
    assert calls == [6]  # 1 + 2 + 2 + 1 good instances as one batch; the malformed v2 body never reached the model
    assert results[0][0] == 200 and same([results[0][1]], plain[:1])
    assert results[1][0] == 200 and same(results[1][1]["predictions"], plain[1:3])
    status, body = results[2]
    assert status == 200 and body["id"] == "abc" and body["model_name"] == "digits"
    (output,) = body["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2]
    assert same([json.loads(x) for x in output["data"]], plain[3:5])
    assert results[3][0] == 400 and results[3][1]["error"].startswith("instance 1: not an image")
    assert results[4][0] == 400 and "shape [2] but 1 elements" in results[4][1]["error"]


def test_kserve_envelopes_at_batch_size_one(digits: tuple[Path, list[bytes], list[Any]]) -> None:
    """KServe's stock TorchServe runtime: TorchServe's own envelopes parse the body before the handler."""
    folder, images, plain = digits
    b64 = [encoded(image) for image in images]
    v1_service = load(folder, "kserve", 1)
    ((status, body),) = run(v1_service, [{"body": v1({"data": b64[0]}, {"data": b64[1]}, b64[2])}])
    assert status == 200 and same(body["predictions"], plain[:3])
    ((status, body),) = run(v1_service, [{"body": v1({"data": b64[3]})}])
    assert status == 200 and same(body["predictions"], plain[3:4])
    ((status, body),) = run(v1_service, [{"body": v1({"data": b64[0]}, {"data": "bm90IGFuIGltYWdl"})}])
    assert status == 400 and same(body["predictions"][:1], plain[:1]) and body["predictions"][1]["code"] == 400

    v2_service = load(folder, "kservev2", 1)
    ((status, body),) = run(v2_service, [{"body": v2(b64[4], b64[5], request_id="x-1")}])
    assert status == 200 and body["id"] == "x-1"
    (output,) = body["outputs"]  # TorchServe 0.12's envelope passes on only the first element of a BYTES input
    assert list(output["shape"]) == [1] and output["datatype"] == "BYTES"
    assert same([json.loads(x) for x in output["data"]], plain[4:5])
