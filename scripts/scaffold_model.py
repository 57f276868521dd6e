"""Scaffold ``models/<name>/`` from a ``.pt`` a user already has (``make scaffold``).

Three kinds of ``.pt`` are accepted: a state_dict plus a torchvision architecture name, a state_dict
plus a Python file defining the network class, or a TorchScript file. The folder gets the weights,
a ``model-config.yaml`` (frontend keys on top, the kit's keys under ``handler:``) and ``labels.json``;
the model is then loaded once, exactly as a worker will, so a bad folder fails here and not in
TorchServe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from servekit.config import parse_handler_config
from servekit.errors import ConfigError
from servekit.loading import load_labels, load_model

FRONTEND_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 20, "responseTimeout": 60}


def handler_section(args: argparse.Namespace) -> dict[str, Any]:
    """The ``handler:`` mapping for the given command-line choices."""
    model: dict[str, Any] = {"file": "model.pt", "format": "torchscript" if args.torchscript else "state_dict"}
    if args.architecture:
        model["architecture"] = args.architecture
    if args.model_file:
        model.update(model_file=Path(args.model_file).name, model_class=args.model_class)
    if args.num_classes:
        model["kwargs"] = {"num_classes": args.num_classes}
    section: dict[str, Any] = {"task": args.task, "model": model, "labels": "labels.json"}
    if args.task == "detection":
        section.update(score_threshold=0.5, max_detections=100)
    else:
        section.update(resize=256, crop=224, topk=5)
    return section


def scaffold(args: argparse.Namespace) -> Path:
    """Write the folder and check that the model loads; return the folder."""
    folder = args.root / args.name
    if folder.exists() and not args.force:
        raise ConfigError(f"{folder} exists (use --force to overwrite)")
    section = handler_section(args)
    config = parse_handler_config(section)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.pt, folder / "model.pt")
    if args.model_file:
        shutil.copyfile(args.model_file, folder / Path(args.model_file).name)
    labels = json.loads(Path(args.labels).read_text()) if args.labels else []
    (folder / "labels.json").write_text(json.dumps(labels, indent=0) + "\n")
    document = {**FRONTEND_DEFAULTS, "handler": section}
    (folder / "model-config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    load_labels(folder / "labels.json")
    load_model(folder, config.model, torch.device("cpu"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--task", choices=("classification", "detection"), required=True)
    parser.add_argument("--pt", type=Path, required=True, help="the .pt file (state_dict or TorchScript)")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--architecture", help="torchvision architecture name of a state_dict")
    kind.add_argument("--model-file", help="Python file defining the network of a state_dict")
    kind.add_argument("--torchscript", action="store_true", help="the .pt is TorchScript")
    parser.add_argument("--model-class", help="class name in --model-file")
    parser.add_argument("--num-classes", type=int, default=0)
    parser.add_argument("--labels", help="JSON list of class names (or an index->name mapping)")
    parser.add_argument("--root", type=Path, default=Path("models"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        folder = scaffold(args)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {folder}; build it with: make archive MODEL={args.name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
