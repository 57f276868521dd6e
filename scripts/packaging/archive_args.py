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
from typing import Any

import yaml

from servekit.config import parse_handler_config, read_model_document
from servekit.errors import ConfigError
from servekit.program_backend import AOTI_MAX_BATCH
from variant_kinds import Choice, kind_document, kind_of, read_choice

# A built variant of a model folder: its file name -> (archive suffix, handler.model.format).
VARIANTS = {
    "model.onnx": ("onnx", "onnx"),
    "model.int8.onnx": ("int8", "onnx"),
    "model.pt2": ("aoti", "aoti"),
    "program.pt2": ("exported", "exported"),
    "model.pte": ("pte", "executorch"),
    "model.int8.pte": ("pte_int8", "executorch"),
}
HANDLER_FILES = {
    "classification": "servekit_classifier.py",
    "detection": "servekit_detector.py",
    "segmentation": "servekit_segmenter.py",
}


def stage_servekit(handlers: Path, dest: Path) -> None:
    """Copy the ``servekit`` package (no caches) into ``dest``, for an archive or a Triton python step."""
    shutil.copytree(handlers / "servekit", dest / "servekit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def compile_document(document: dict[str, Any], mode: str) -> dict[str, Any]:
    """The model-config of a ``<name>_compile`` archive: the same model, ``torch.compile``d at load.

    Compiling and warming up every batch size takes minutes on a small CPU, so the worker gets a
    ``startupTimeout`` of at least 10 minutes (TorchServe's default is 120 s).
    """
    handler = {**document["handler"], "compile": {"mode": mode, "dynamic": False}}
    return {**document, "startupTimeout": max(600, int(document.get("startupTimeout", 0))), "handler": handler}


def variant_document(document: dict[str, Any], variant_file: Path, fmt: str) -> dict[str, Any]:
    """The model-config of a variant archive: the same settings, the model from ``variant_file`` in ``fmt``.

    An AOTInductor package is compiled for batches of 1 to the folder's ``batchSize`` (at most
    ``AOTI_MAX_BATCH``; larger batches run in chunks).
    """
    model: dict[str, Any] = {"file": variant_file.name, "format": fmt}
    if fmt == "aoti":
        model["max_batch"] = min(int(document.get("batchSize", 1)), AOTI_MAX_BATCH)
    handler = {**document["handler"], "model": model}
    handler.pop("compile", None)
    return {**document, "handler": handler}


def needed_files(model_dir: Path, config: Any) -> list[str]:
    """The files of a folder its archive needs (the model first); a missing one is an error."""
    needed = [config.model.file, config.labels]
    if config.model.model_file:
        needed.append(config.model.model_file)
    if config.model.format == "transformers":
        needed.append("config.json")  # the Hugging Face folder's model config, beside its weights
    missing = [f for f in needed if not (model_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{model_dir}: missing {', '.join(missing)}")
    return needed


def archiver_args(
    name: str,
    models: Path,
    handlers: Path,
    stage_root: Path,
    export: Path,
    *,
    variant: Path | None = None,
    backend: str | None = None,
    compile_mode: str | None = None,
    kind: str | None = None,
    built: Path = Path("build/variants"),
    say: Any = None,
    archive_name: str | None = None,
) -> list[str]:
    """Return torch-model-archiver's arguments for ``models/<name>``, staging the handler package.

    With ``variant`` (from ``make onnx``, ``make int8``, ``make aoti`` or ``make pte``), the archive serves that
    file and is named ``<name>_<variant>`` (``resnet18_onnx``, ``resnet18_int8``, ``resnet18_aoti``,
    ``resnet18_exported``, ``resnet18_pte``, ``resnet18_pte_int8``); ``backend`` serves it with another backend
    (``openvino``: ``resnet18_openvino`` from ``model.onnx``). With ``compile_mode``, ``<name>_compile`` serves
    the folder's model with ``handler.compile``.

    Otherwise the archive is ``<name>`` and serves the folder's choice (``variant.yaml``, written by
    ``make variants``), or the variant ``kind`` (``VARIANT=<kind>``; its file as ``make variants`` built it
    under ``built/<name>/``), or the folder's own model; ``say`` gets the one line naming a chosen variant.
    ``archive_name`` renames the archive (``make variants`` builds ``<name>_<kind>``).
    """
    model_dir = models / name
    config_file = model_dir / "model-config.yaml"
    document = original = read_model_document(model_dir)
    config = parse_handler_config(document.get("handler"))
    needed = needed_files(model_dir, config)
    serialized = model_dir / config.model.file
    if variant is not None:
        if variant.name not in VARIANTS or not variant.is_file():
            raise ConfigError(f"{variant} is missing or not a variant (make onnx / int8 / aoti / pte builds them)")
        suffix, fmt = (backend, backend) if backend else VARIANTS[variant.name]
        name = f"{name}_{suffix}"
        document = variant_document(document, variant, fmt)
        parse_handler_config(document["handler"])
        serialized, needed = variant, [variant.name, config.labels]
    elif compile_mode is not None:
        name = f"{name}_compile"
        document = compile_document(document, compile_mode)
        parse_handler_config(document["handler"])
    else:
        chosen = chosen_variant(model_dir, name, kind, built)
        if chosen is not None:
            document = kind_document(document, chosen.kind, chosen.file)
            parse_handler_config(document["handler"])
            if chosen.file is not None:
                serialized, needed = chosen.file, [chosen.file.name, config.labels]
            if say is not None:
                say(chosen.line(name))
    name = archive_name or name
    if document is not original:
        config_file = stage_root / f"{name}.config" / "model-config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    stage = stage_root / name
    shutil.rmtree(stage, ignore_errors=True)
    stage_servekit(handlers, stage)
    extra = [str(stage), *(str(model_dir / f) for f in needed[1:])]
    task = config.task
    return [
        "--model-name",
        name,
        "--version",
        str(document.get("version", "1.0")),
        "--serialized-file",
        str(serialized),
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


def chosen_variant(model_dir: Path, name: str, kind: str | None, built: Path) -> Choice | None:
    """The variant ``<name>.mar`` serves: ``kind`` if given (``eager``: none), else the folder's recorded choice."""
    if kind:
        wanted = kind_of(kind)
        if wanted.name == "eager":
            return None
        file = built / name / wanted.name / wanted.file if wanted.file else None
        if file is not None and not file.is_file():
            recorded = read_choice(model_dir)
            if recorded is not None and recorded.kind == wanted:
                return recorded
            raise ConfigError(f"VARIANT={kind}: {file} is missing; `make variants MODEL={name} DATA=...` builds it")
        return Choice(wanted, file, {"metric": "-", "report": "chosen by VARIANT=, not measured"})
    return read_choice(model_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--handlers", type=Path, default=Path("handlers"))
    parser.add_argument("--stage", type=Path, default=Path("build/stage"))
    parser.add_argument("--export", type=Path, default=Path("model_store"))
    parser.add_argument("--variant", type=Path, help="serve this built file (model.onnx, model.int8.onnx, *.pt2)")
    parser.add_argument("--backend", choices=["openvino"], help="serve the ONNX --variant with this backend")
    parser.add_argument("--compile", dest="compile_mode", help="serve the folder's model with handler.compile MODE")
    parser.add_argument("--kind", default=None, help="the variant to archive as <name>.mar (default: variant.yaml's)")
    parser.add_argument("--built", type=Path, default=Path("build/variants"), help="where make variants builds")
    args = parser.parse_args(argv)
    try:
        words = archiver_args(
            args.name,
            args.models,
            args.handlers,
            args.stage,
            args.export,
            variant=args.variant,
            backend=args.backend,
            compile_mode=args.compile_mode,
            kind=args.kind,
            built=args.built,
            say=lambda line: sys.stderr.write(line + "\n"),
        )
    except ConfigError as exc:
        sys.stderr.write(f"error: {args.name}: {exc}\n")
        return 2
    sys.stdout.write("\n".join(words) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
