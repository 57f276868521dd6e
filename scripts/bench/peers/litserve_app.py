"""A torchvision image classifier served by LitServe, written as LitServe's docs write one.

The bench's peer (``make bench-peers``): no servekit code. It follows LitServe's image-classification guide
("Speed up serving by 200x"): PIL decode and ``weights.transforms()`` in ``decode_request``, the model under
``torch.inference_mode()`` in ``predict``, batching on the ``LitAPI`` (``max_batch_size``, ``batch_timeout``),
``workers_per_device`` processes on the CPU, top-5 answers. The image arrives as a multipart upload (field
``content``), LitServe's file-upload form, so the JPEG's bytes travel without base64.

Settings come from the environment the bench sets: PEER_WEIGHTS (a torchvision state_dict), PEER_ARCH,
PEER_PORT, PEER_WORKERS, PEER_THREADS (intra-op threads per worker), PEER_BATCH, PEER_BATCH_TIMEOUT.
"""

import io
import os

import litserve as ls
import torch
import torchvision
from PIL import Image


class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(int(os.environ["PEER_THREADS"]))
        arch = os.environ["PEER_ARCH"]
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        self.categories = weights.meta["categories"]
        self.image_processing = weights.transforms()
        self.model = torchvision.models.get_model(arch, weights=None)
        self.model.load_state_dict(torch.load(os.environ["PEER_WEIGHTS"], map_location=device, weights_only=True))
        self.model.eval().to(device)
        self.device = device

    def decode_request(self, request):
        upload = request["content"]
        image = Image.open(io.BytesIO(upload.file.read())).convert("RGB")
        return self.image_processing(image)

    def predict(self, x):
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(x.to(self.device)), dim=1)
            scores, indices = torch.topk(probabilities, 5, dim=1)
        return [list(zip(s.tolist(), i.tolist())) for s, i in zip(scores, indices)]

    def encode_response(self, output):
        return [{"label": self.categories[i], "index": i, "score": s} for s, i in output]


if __name__ == "__main__":
    api = ImageClassifierAPI(
        max_batch_size=int(os.environ["PEER_BATCH"]), batch_timeout=float(os.environ["PEER_BATCH_TIMEOUT"])
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=int(os.environ["PEER_WORKERS"]))
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), generate_client_file=False)
