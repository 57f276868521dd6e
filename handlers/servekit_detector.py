"""TorchServe entry point of the kit's object detector (``--handler servekit_detector.py``)."""

from servekit.ts_adapter import TorchServeAdapter


class ServekitDetector(TorchServeAdapter):
    """Object detection over batches of images of any sizes; a bad image fails alone with a JSON 4xx."""

    task = "detection"
