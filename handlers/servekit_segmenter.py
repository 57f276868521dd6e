"""TorchServe entry point of the kit's semantic segmenter (``--handler servekit_segmenter.py``)."""

from servekit.ts_adapter import TorchServeAdapter


class ServekitSegmenter(TorchServeAdapter):
    """A class for every pixel, answered per class with RLE masks; a bad image fails alone with a JSON 4xx."""

    task = "segmentation"
