"""Archives of the demo models served by TorchServe's *stock* handlers, for the side-by-side benchmark.

The same weights and the same frontend settings (workers, ``batchSize``, ``maxBatchDelay``) as the kit's
archives; only the handler differs: ``image_classifier``, ``object_detector`` or ``image_segmenter``.
State_dicts need a model file with exactly one class that builds the network with no arguments (TorchServe's eager-mode
contract), written here from the model folder's ``architecture`` and ``kwargs``; TorchScript files load
as they are. The stock vision handlers import ``captum`` (installed by requirements.txt for this).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from servekit.config import parse_handler_config, read_model_document
from servekit.loading import load_labels

STOCK_HANDLERS = {
    "classification": "image_classifier",
    "detection": "object_detector",
    "segmentation": "image_segmenter",
}
MODEL_FILE = '''"""Built by scripts/packaging/stock_archives.py: {architecture} with the kit's demo arguments."""
import torchvision


class {class_name}(torchvision.models.{base}):
    def __new__(cls):
        return torchvision.models.get_model({architecture!r}, weights=None, **{kwargs!r})
'''
BASES = {
    "resnet": "ResNet",
    "mobilenet_v3": "MobileNetV3",
    "fasterrcnn": "detection.FasterRCNN",
    "lraspp": "segmentation.LRASPP",
    "deeplabv3": "segmentation.DeepLabV3",
    "fcn": "segmentation.FCN",
}
BACKBONE_BUILDERS = ("fasterrcnn", "lraspp", "deeplabv3", "fcn")  # never download a backbone: weights_backbone=None


def model_file_source(architecture: str, kwargs: dict) -> str:
    """A module with one class whose no-argument constructor returns the torchvision network."""
    base = next((b for prefix, b in BASES.items() if architecture.startswith(prefix)), None)
    if base is None:
        raise SystemExit(f"no stock model file template for {architecture!r}")
    args = dict(kwargs)
    if architecture.startswith(BACKBONE_BUILDERS):
        args.setdefault("weights_backbone", None)
    class_name = "".join(part.title() for part in architecture.split("_"))
    return MODEL_FILE.format(architecture=architecture, class_name=class_name, base=base, kwargs=args)


def stock_archive(name: str, models: Path, work: Path, export: Path, archiver: str) -> Path:
    """Build ``export/<name>_stock.mar``; return its path."""
    model_dir = models / name
    document = read_model_document(model_dir)
    config = parse_handler_config(document.get("handler"))
    task = config.task
    folder = work / f"{name}_stock"
    folder.mkdir(parents=True, exist_ok=True)
    labels = load_labels(model_dir / config.labels)
    (folder / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}), encoding="utf-8")
    frontend = {k: v for k, v in document.items() if k != "handler"}
    (folder / "model-config.yaml").write_text(yaml.safe_dump(frontend), encoding="utf-8")
    args = [
        archiver,
        "--model-name",
        f"{name}_stock",
        "--version",
        "1.0",
        "--serialized-file",
        str(model_dir / config.model.file),
        "--handler",
        STOCK_HANDLERS[task],
        "--extra-files",
        str(folder / "index_to_name.json"),
        "--config-file",
        str(folder / "model-config.yaml"),
        "--export-path",
        str(export),
        "--force",
    ]
    if config.model.format == "state_dict":
        assert config.model.architecture, "stock archives are built for torchvision architectures"
        model_py = folder / "model.py"
        model_py.write_text(model_file_source(config.model.architecture, config.model.kwargs), encoding="utf-8")
        args += ["--model-file", str(model_py)]
    export.mkdir(parents=True, exist_ok=True)
    subprocess.run(args, check=True)
    return export / f"{name}_stock.mar"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--work", type=Path, default=Path("build/stock"))
    parser.add_argument("--export", type=Path, default=Path("model_store"))
    parser.add_argument("--archiver", default=str(Path(sys.executable).parent / "torch-model-archiver"))
    args = parser.parse_args(argv)
    for name in args.names:
        stock_archive(name, args.models, args.work, args.export, args.archiver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
