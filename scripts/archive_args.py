"""Validate a model folder and write the torch-model-archiver arguments that package it.

Used by the Makefile's ``model_store/%.mar`` rule. Fails with a message naming the bad key or the
missing file, so a broken folder never becomes an archive. The handlers package is staged under
``build/stage/<name>/`` (no caches) and shipped with ``--extra-files``, which copies a directory's
contents to the archive root: the .mar then imports ``servekit`` without this repo on the path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from servekit.config import ClassifierConfig, parse_handler_config
from servekit.errors import ConfigError

HANDLER_FILES = {"classification": "servekit_classifier.py", "detection": "servekit_detector.py"}


def archiver_args(name: str, models: Path, handlers: Path, stage_root: Path, export: Path) -> list[str]:
    """Return torch-model-archiver's arguments for ``models/<name>``, staging the handler package."""
    model_dir = models / name
    config_file = model_dir / "model-config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} is missing (scaffold one with `make scaffold`)")
    document = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    config = parse_handler_config(document.get("handler"))
    needed = [config.model.file, config.labels]
    if config.model.model_file:
        needed.append(config.model.model_file)
    missing = [f for f in needed if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{model_dir}: missing {', '.join(missing)}")
    stage = stage_root / name
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(handlers / "servekit", stage / "servekit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    extra = [str(stage), *(str(model_dir / f) for f in needed[1:])]
    task = "classification" if isinstance(config, ClassifierConfig) else "detection"
    return [
        "--model-name",
        name,
        "--version",
        str(document.get("version", "1.0")),
        "--serialized-file",
        str(model_dir / config.model.file),
        "--handler",
        str(handlers / HANDLER_FILES[task]),
        "--extra-files",
        ",".join(extra),
        "--config-file",
        str(config_file),
        "--export-path",
        str(export),
        "--force",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--handlers", type=Path, default=Path("handlers"))
    parser.add_argument("--stage", type=Path, default=Path("build/stage"))
    parser.add_argument("--export", type=Path, default=Path("model_store"))
    args = parser.parse_args(argv)
    try:
        words = archiver_args(args.name, args.models, args.handlers, args.stage, args.export)
    except ConfigError as exc:
        sys.stderr.write(f"error: {args.name}: {exc}\n")
        return 2
    sys.stdout.write("\n".join(words) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
