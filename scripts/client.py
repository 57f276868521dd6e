"""The kit's client: send images to TorchServe over REST or gRPC, one or many, concurrently if asked.

Reads the inference key from ``key_file.json`` (re-reading it once when the server refuses a key, so
rotated keys are picked up) and prints one JSON line per image: ``{"image", "status", "answer"}``.
Over gRPC TorchServe 0.12 drops a request's own HTTP status, so the client takes it from the kit's
error body (``{"error": ..., "code": N}``); both transports therefore report the same statuses.

    python scripts/client.py --model resnet18 cat.jpg dog.png
    python scripts/client.py --backend grpc --model fasterrcnn --concurrency 8 photos/*.jpg
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

import requests

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


class RestClient:
    """``POST /predictions/<model>`` with the image as the body."""

    def __init__(self, endpoints: Endpoints, keys: KeyRing, timeout: float = 120.0) -> None:
        self.base = endpoints.url("inference")
        self.keys = keys
        self.timeout = timeout
        self._local = threading.local()

    def predict(self, model: str, data: bytes) -> Reply:
        reply = self._post(model, data)
        if _key_refused(reply) and self.keys.refresh():
            reply = self._post(model, data)
        return reply

    def _post(self, model: str, data: bytes) -> Reply:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        response = session.post(
            f"{self.base}/predictions/{model}",
            data=data,
            timeout=self.timeout,
            headers={"Authorization": f"Bearer {self.keys.inference}", "Content-Type": "application/octet-stream"},
        )
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text, "code": response.status_code}
        return Reply(response.status_code, body)


class GrpcClient:
    """``InferenceAPIsService.Predictions`` with the image under input ``data``."""

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

    def predict(self, model: str, data: bytes) -> Reply:
        reply = self._call(model, data)
        if _key_refused(reply) and self.keys.refresh():
            reply = self._call(model, data)
        return reply

    def _call(self, model: str, data: bytes) -> Reply:
        request = self._pb2.PredictionsRequest(model_name=model, input={"data": data})
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
    parser.add_argument("--backend", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--config", type=Path, default=Path("config.properties"), help="where the ports are read")
    parser.add_argument("--keys", type=Path, default=Path("key_file.json"))
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    client = make_client(args.backend, endpoints_of(args.config), KeyRing(args.keys))
    replies = predict_many(client, args.model, [p.read_bytes() for p in args.images], args.concurrency)
    for path, reply in zip(args.images, replies):
        sys.stdout.write(json.dumps({"image": str(path), "status": reply.status, "answer": reply.body}) + "\n")
    return 0 if all(r.ok for r in replies) else 1


if __name__ == "__main__":
    sys.exit(main())
