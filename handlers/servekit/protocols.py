"""KServe's request bodies on TorchServe's predictions path, with every instance in one model batch.

A request row is one of:

- **plain**: the image as the body, a multipart field or JSON ``{"data": "<base64>"}``; one answer.
- **KServe v1**: ``{"instances": [{"data": "<base64>"} | "<base64>", ...]}`` -> ``{"predictions": [...]}``.
- **Open Inference Protocol v2**: ``{"id", "inputs": [{"name", "shape", "datatype": "BYTES", "data":
  ["<base64>", ...]}]}`` -> ``{"id", "model_name", "outputs": [{"name", "shape", "datatype": "BYTES",
  "data": ["<JSON answer>", ...]}]}``: each answer is a JSON document carried as a BYTES element.
- **an input TorchServe's own ``kservev2`` envelope already unwrapped** (``{"name", "datatype", "data"}``;
  TorchServe 0.12 keeps only the first element of a BYTES input): answered with the list of JSON answers,
  which that envelope turns into a BYTES output.

:func:`unwrap` turns each row into its instances (rows :func:`servekit.decode.decode_request` reads); the
service runs the instances of all rows as one batch; :func:`answer_requests` folds the per-instance
answers back into one answer per row. A bad instance fails its own request with a 4xx naming it; the
other requests of the batch are untouched. Pure functions: no TorchServe here.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from servekit.errors import BadInput, KitError, PayloadTooLarge

MAX_INSTANCES = 64  # instances one request may carry (a batch is bounded by the frontend's batchSize)
V2_OUTPUT = "output-0"
PLAIN, V1, V2, V2_INPUT = "plain", "v1", "v2", "v2-input"


@dataclass(frozen=True)
class Request:
    """One request row as the protocol it speaks, its instances, and the error that its body itself holds."""

    protocol: str
    instances: tuple[Any, ...] = ()
    request_id: str = ""
    error: KitError | None = None


def unwrap(row: Any) -> Request:
    """The protocol and instances of one request row (never raises: a malformed body is the request's error)."""
    try:
        return _unwrap(row)
    except KitError as exc:
        return Request(PLAIN, error=exc)


def _unwrap(row: Any) -> Request:
    if isinstance(row, (str, bytes, bytearray)):  # a bare instance, as TorchServe's kserve envelope passes it
        return Request(PLAIN, ({"data": row},))
    if isinstance(row, Mapping) and "datatype" in row:  # an input tensor TorchServe's kservev2 envelope unwrapped
        return Request(V2_INPUT, v2_instances(row))
    key, body = _body(row) if isinstance(row, Mapping) else ("", None)
    if not isinstance(body, Mapping):
        return Request(PLAIN, (row,))
    if "instances" in body:
        return Request(V1, v1_instances(body["instances"]))
    if "inputs" in body:
        return Request(V2, v2_request_instances(body), _request_id(body))
    return Request(PLAIN, ({key: body},))  # parsed once: decode reads the JSON image from it


def _body(row: Mapping[str, Any]) -> tuple[str, Any]:
    """The row's body field, parsed when it is JSON (bytes starting with ``{``), else as it is."""
    for key in ("body", "data"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray)) and bytes(value[:64]).lstrip()[:1] == b"{":
            return key, _json(bytes(value))
        return key, value
    return "", None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"body is not valid JSON: {exc}") from None


def _request_id(body: Mapping[str, Any]) -> str:
    given = body.get("id")
    if given is None:
        return str(uuid.uuid4())
    if not isinstance(given, str):
        raise BadInput(f"v2 request 'id' must be a string, got {type(given).__name__}")
    return given


def _bounded(items: Any, what: str) -> list[Any]:
    if not isinstance(items, list) or not items:
        raise BadInput(f"{what} must be a non-empty list")
    if len(items) > MAX_INSTANCES:
        raise PayloadTooLarge(f"{what} holds {len(items)} instances; at most {MAX_INSTANCES} per request")
    return items


def v1_instances(instances: Any) -> tuple[Any, ...]:
    """KServe v1 ``instances``: each a base64 string or an object with the image under ``data``/``b64``."""
    return tuple({"data": item} for item in _bounded(instances, "'instances'"))


def v2_request_instances(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """The images of an Open Inference Protocol v2 request: its one BYTES input's elements."""
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        count = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise BadInput(f"v2 'inputs' must be a list of one input tensor (BYTES, the images), got {count}")
    return v2_instances(inputs[0])


def v2_instances(tensor: Mapping[str, Any]) -> tuple[Any, ...]:
    """The base64 images of one v2 BYTES input tensor, its ``shape`` checked against its data."""
    name = tensor.get("name", "")
    if tensor.get("datatype") != "BYTES":
        raise BadInput(f"v2 input {name!r} has datatype {tensor.get('datatype')!r}; send images as BYTES (base64)")
    data = tensor.get("data")
    if isinstance(data, str):  # TorchServe 0.12's kservev2 envelope keeps only the first element of BYTES
        return ({"data": data},)
    if isinstance(data, list):  # JSON may nest the elements by the shape ([[b64], [b64]] for [2, 1])
        data = [x for item in data for x in (item if isinstance(item, list) else [item])]
    items = _bounded(data, f"v2 input {name!r} 'data'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadInput(f"v2 input {name!r} needs a 'shape' of non-negative integers, got {shape!r}")
    if math.prod(shape) != len(items):
        raise BadInput(f"v2 input {name!r} has shape {shape} but {len(items)} elements")
    return tuple({"data": item} for item in items)


def request_field(row: Any, name: str) -> Any:
    """A field sent beside the image: a form field or gRPC input ``name`` (``-F target=281``), or a key beside
    the base64 image of a JSON body (``{"data": "<base64>", "target": 281}``); None when absent."""
    if not isinstance(row, Mapping):
        return None
    value = row.get(name)
    for body in (row.get("body"), row.get("data")):
        if value is None and isinstance(body, Mapping):
            value = body.get(name)
    return value


def field_text(value: Any) -> str:
    """A field's value as text (form fields and gRPC inputs arrive as bytes)."""
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def field_flag(row: Any, name: str) -> bool:
    """Whether a request row sets the flag ``name`` (true, 1 or yes): how a gRPC client, which has no
    explanations RPC, asks for an explanation (``explain``)."""
    value = request_field(row, name)
    return value is True or (value is not None and field_text(value).strip().lower() in ("true", "1", "yes"))


def answer_requests(
    requests: Sequence[Request], answers: Sequence[Any], model_name: str, explained: Sequence[bool] = ()
) -> list[Any]:
    """One answer per request from the answers of all their instances, in order; ``explained`` marks the
    requests that asked for explanations (a KServe v1 one is answered under ``explanations``)."""
    out: list[Any] = []
    start = 0
    for i, request in enumerate(requests):
        mine = answers[start : start + len(request.instances)]
        start += len(request.instances)
        explain = i < len(explained) and explained[i]
        out.append(request.error if request.error is not None else answer(request, mine, model_name, explain))
    return out


def answer(request: Request, answers: Sequence[Any], model_name: str, explain: bool = False) -> Any:
    """The answer of one request in its protocol, or the error of its first failed instance."""
    if request.protocol == PLAIN:
        return answers[0]
    failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, BaseException)]
    if failed:
        return instance_error(*failed[0], failed=len(failed), total=len(answers))
    if request.protocol == V1:
        return {"explanations" if explain else "predictions": list(answers)}
    documents = [json.dumps(a) for a in answers]
    if request.protocol == V2_INPUT:
        return documents
    return {
        "id": request.request_id,
        "model_name": model_name,
        "outputs": [{"name": V2_OUTPUT, "shape": [len(documents)], "datatype": "BYTES", "data": documents}],
    }


def instance_error(index: int, error: BaseException, failed: int, total: int) -> BaseException:
    """The request's error: the first failed instance's, its message naming the instance."""
    if not isinstance(error, KitError):
        return error  # a model failure: answered as an internal error, its text only in the log
    others = f" ({failed - 1} more of {total} instances failed)" if failed > 1 else ""
    named = type(error)(f"instance {index}: {error.message}{others}")
    named.__cause__ = error
    return named
