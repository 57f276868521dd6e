"""TorchServe entry point of the kit's image classifier (``--handler servekit_classifier.py``)."""

from servekit.ts_adapter import TorchServeAdapter


class ServekitClassifier(TorchServeAdapter):
    """Top-k image classification over batches; a bad image fails alone with a JSON 4xx."""

    task = "classification"
