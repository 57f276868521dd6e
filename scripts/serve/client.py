"""The kit's client: send images to TorchServe over REST or gRPC, one or many, concurrently if asked.

Reads the inference key from ``key_file.json`` (re-reading it once when the server refuses a key, so
rotated keys are picked up) and prints one JSON line per image: ``{"image", "status", "answer"}``.
Over gRPC TorchServe 0.12 drops a request's own HTTP status, so the client takes it from the kit's
error body (``{"error": ..., "code": N}``); both transports therefore report the same statuses.

    python scripts/serve/client.py --model resnet18 cat.jpg dog.png
    python scripts/serve/client.py --backend grpc --model fasterrcnn --concurrency 8 photos/*.jpg
    python scripts/serve/client.py --backend triton --protocol grpc --model resnet18 cat.jpg   # the same JSON, Triton
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import requests

from cli import error_line
from tsctl import Endpoints, Keys, endpoints_of

GRPC_TO_HTTP = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "CANCELLED": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "DEADLINE_EXCEEDED": 408,
    "RESOURCE_EXHAUSTED": 507,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "UNIMPLEMENTED": 501,
}


@dataclass(frozen=True)
class Reply:
    """A request's outcome: HTTP-style status and the JSON answer (or error body)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Predictor(Protocol):
    def predict(self, model: str, data: bytes) -> Reply: ...


class KeyRing:
    """The inference key from ``key_file.json``, re-read on demand after a refusal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.inference = Keys.read(path).inference

    def refresh(self) -> bool:
        """Re-read the key file; True when the key changed."""
        with self._lock:
            new = Keys.read(self.path).inference
            changed, self.inference = new != self.inference, new
            return changed


class KeyedClient:
    """A TorchServe client that retries once with a re-read key when the server refuses its key."""

    keys: KeyRing

    def predict(self, model: str, data: bytes, **fields: str) -> Reply:
        """The model's answer for one image; ``fields`` go beside it (a form field, a gRPC input)."""
        return self._keyed(model, data, fields, False)

    def explain(self, model: str, data: bytes, **fields: str) -> Reply:
        """The model's explanation of one image (``target`` a class index or label name; else its top-1)."""
        return self._keyed(model, data, fields, True)

    def _keyed(self, model: str, data: bytes, fields: dict[str, str], explain: bool) -> Reply:
        reply = self._send(model, data, fields, explain)
        if _key_refused(reply) and self.keys.refresh():
            reply = self._send(model, data, fields, explain)
        return reply

    def _send(self, model: str, data: bytes, fields: dict[str, str], explain: bool) -> Reply:  # pragma: no cover
        raise NotImplementedError


class RestClient(KeyedClient):
    """``POST /predictions/<model>`` (``/explanations/<model>``) with the image as the body, or as the
    multipart field ``data`` beside the other fields."""

    def __init__(self, endpoints: Endpoints, keys: KeyRing, timeout: float = 120.0) -> None:
        self.base = endpoints.url("inference")
        self.keys = keys
        self.timeout = timeout
        self._local = threading.local()

    def _send(self, model: str, data: bytes, fields: dict[str, str], explain: bool) -> Reply:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        url = f"{self.base}/{'explanations' if explain else 'predictions'}/{model}"
        headers = {"Authorization": f"Bearer {self.keys.inference}"}
        if fields:
            response = session.post(url, files={"data": data}, data=fields, timeout=self.timeout, headers=headers)
        else:
            headers["Content-Type"] = "application/octet-stream"
            response = session.post(url, data=data, timeout=self.timeout, headers=headers)
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text, "code": response.status_code}
        return Reply(response.status_code, body)


class GrpcClient(KeyedClient):
    """``InferenceAPIsService.Predictions`` with the image under input ``data`` and the fields beside it
    (TorchServe's gRPC API has no explanations call: an ``explain`` input asks for one)."""

    def __init__(self, endpoints: Endpoints, keys: KeyRing, timeout: float = 120.0) -> None:
        import grpc
        from ts_grpc import inference_pb2, inference_pb2_grpc

        self._grpc = grpc
        self._pb2 = inference_pb2
        self.channel = grpc.insecure_channel(
            endpoints.grpc("inference"),
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.keys = keys
        self.timeout = timeout

    def _send(self, model: str, data: bytes, fields: dict[str, str], explain: bool) -> Reply:
        inputs = {"data": data, **{k: str(v).encode() for k, v in fields.items()}}
        if explain:
            inputs["explain"] = b"true"
        request = self._pb2.PredictionsRequest(model_name=model, input=inputs)
        try:
            response = self.stub.Predictions(
                request, timeout=self.timeout, metadata=(("authorization", f"Bearer {self.keys.inference}"),)
            )
        except self._grpc.RpcError as exc:
            code = exc.code().name
            return Reply(
                GRPC_TO_HTTP.get(code, 500), {"error": exc.details(), "code": GRPC_TO_HTTP.get(code, 500), "grpc": code}
            )
        body = json.loads(response.prediction)
        status = body["code"] if isinstance(body, dict) and "error" in body and "code" in body else 200
        return Reply(int(status), body)

    def close(self) -> None:
        self.channel.close()


class TritonClient:
    """A servekit ensemble on Triton: the same image bytes in (``IMAGE``), the same JSON out (``ANSWER``).

    ``protocol`` is ``http`` or ``grpc`` (tritonclient). A failed request's Triton error message carries
    the kit's JSON error body, which becomes the reply's status and body as with TorchServe.
    """

    def __init__(self, url: str, protocol: str = "http", timeout: float = 120.0) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton  # type: ignore[no-redef]
        self._triton = triton
        self.protocol = protocol
        self.timeout = timeout
        self.url = url
        self._local = threading.local()
        self._batching: dict[str, bool] = {}

    @property
    def client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._triton.InferenceServerClient(self.url)
        return client

    def batches(self, model: str) -> bool:
        """Whether the ensemble has a batch dimension (classifiers) or not (the detector)."""
        if model not in self._batching:
            if self.protocol == "grpc":
                config = self.client.get_model_config(model, as_json=True)["config"]
            else:
                config = self.client.get_model_config(model)
            self._batching[model] = int(config.get("max_batch_size", 0)) > 0
        return self._batching[model]

    def predict(self, model: str, data: bytes) -> Reply:
        from tritonclient.utils import InferenceServerException

        shape = [1, 1] if self.batches(model) else [1]
        image = self._triton.InferInput("IMAGE", shape, "BYTES")
        image.set_data_from_numpy(np.array([data], dtype=np.object_).reshape(shape))
        wanted = [self._triton.InferRequestedOutput("ANSWER")]
        try:
            if self.protocol == "grpc":
                result = self.client.infer(model, [image], outputs=wanted, client_timeout=self.timeout)
            else:
                result = self.client.infer(model, [image], outputs=wanted, timeout=int(self.timeout * 1e6))
        except InferenceServerException as exc:
            return triton_error_reply(exc.message() or str(exc), exc.status())
        return Reply(200, json.loads(result.as_numpy("ANSWER").reshape(-1)[0]))


def triton_error_reply(message: str, status: str | None) -> Reply:
    """The kit's JSON error inside a Triton error message, as a reply; other errors keep Triton's text."""
    start = message.find('{"error"')
    if start >= 0:
        try:
            body = json.loads(message[start:])
            return Reply(int(body["code"]), body)
        except (ValueError, KeyError):
            pass
    code = 500
    if status and str(status).isdigit():
        code = int(status)
    elif status and "UNAVAILABLE" in str(status):
        code = 503
    return Reply(code, {"error": message, "code": code})


def _key_refused(reply: Reply) -> bool:
    text = json.dumps(reply.body) if not isinstance(reply.body, str) else reply.body
    return reply.status in (400, 401, 403) and ("InvalidKeyException" in text or "Token Authorization failed" in text)


def predict_many(client: Predictor, model: str, images: Sequence[bytes], concurrency: int = 1) -> list[Reply]:
    """Send every image, ``concurrency`` at a time; replies come back in the order of ``images``."""
    if concurrency <= 1:
        return [client.predict(model, data) for data in images]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda data: client.predict(model, data), images))


def make_client(backend: str, endpoints: Endpoints, keys: KeyRing) -> RestClient | GrpcClient:
    """A REST or gRPC client for one TorchServe instance."""
    if backend == "grpc":
        return GrpcClient(endpoints, keys)
    return RestClient(endpoints, keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", choices=("rest", "grpc", "triton"), default="rest")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="with --backend triton")
    parser.add_argument("--triton-url", default=None, help="with --backend triton (default 127.0.0.1:8000/8001)")
    parser.add_argument("--config", type=Path, default=Path("config.properties"), help="where the ports are read")
    parser.add_argument("--keys", type=Path, default=Path("key_file.json"))
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    unreadable = [str(path) for path in args.images if not path.is_file()]
    if unreadable:  # one line, not a traceback from read_bytes
        parser.error(f"no such image file: {', '.join(unreadable)}")
    client: Predictor
    if args.backend == "triton":
        url = args.triton_url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
        client = TritonClient(url, args.protocol)
    else:
        client = make_client(args.backend, endpoints_of(args.config), KeyRing(args.keys))
    try:
        replies = predict_many(client, args.model, [p.read_bytes() for p in args.images], args.concurrency)
    except Exception as exc:  # no server there, a refused connection: one line, not a traceback
        sys.stderr.write(error_line(exc, f"send to {args.model} over {args.backend}") + "\n")
        return 2
    for path, reply in zip(args.images, replies):
        sys.stdout.write(json.dumps({"image": str(path), "status": reply.status, "answer": reply.body}) + "\n")
    return 0 if all(r.ok for r in replies) else 1


if __name__ == "__main__":
    sys.exit(main())
