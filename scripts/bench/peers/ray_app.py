"""A torchvision image classifier served by Ray Serve, written as Ray Serve's docs write one.

The bench's peer (``make bench-peers``): no servekit code. It follows Ray Serve's model-serving guides: a
``@serve.deployment`` class that loads the model once, reads the request's body in ``__call__`` (PIL decode,
``weights.transforms()``), and a ``@serve.batch`` method (``max_batch_size``, ``batch_wait_timeout_s``) that
runs the batch under ``torch.inference_mode()``; ``max_ongoing_requests`` raised to the batch size times two,
as Ray's warning asks when it is below the batch size; ``num_replicas`` replicas of ``num_cpus`` each. The
JPEG is the raw request body. Ray runs on this machine alone: a local cluster on 127.0.0.1, no dashboard, no
usage report.

Settings come from the environment the bench sets: PEER_WEIGHTS, PEER_ARCH, PEER_PORT, PEER_WORKERS (replicas),
PEER_THREADS (intra-op threads and CPUs per replica), PEER_BATCH, PEER_BATCH_TIMEOUT.
"""

import io
import os
import signal
import threading

import ray
import torch
import torchvision
from PIL import Image
from ray import serve
from starlette.requests import Request

THREADS = int(os.environ["PEER_THREADS"])
BATCH = int(os.environ["PEER_BATCH"])


@serve.deployment(
    num_replicas=int(os.environ["PEER_WORKERS"]),
    ray_actor_options={"num_cpus": THREADS},
    max_ongoing_requests=2 * BATCH,
)
class ImageClassifier:
    def __init__(self, arch: str, weights_path: str):
        torch.set_num_threads(THREADS)
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        self.categories = weights.meta["categories"]
        self.preprocess = weights.transforms()
        self.model = torchvision.models.get_model(arch, weights=None)
        self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.model.eval()

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=float(os.environ["PEER_BATCH_TIMEOUT"]))
    async def classify(self, images: list[torch.Tensor]) -> list[list[dict]]:
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(torch.stack(images)), dim=1)
            scores, indices = torch.topk(probabilities, 5, dim=1)
        return [
            [{"label": self.categories[i], "index": i, "score": s} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, indices)
        ]

    async def __call__(self, request: Request) -> list[dict]:
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        return await self.classify(self.preprocess(image))


app = ImageClassifier.bind(os.environ["PEER_ARCH"], os.environ["PEER_WEIGHTS"])

if __name__ == "__main__":
    workers, threads = int(os.environ["PEER_WORKERS"]), THREADS
    ray.init(
        num_cpus=workers * threads,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    serve.run(app, name="classifier", route_prefix="/predict")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
