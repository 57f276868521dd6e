"""The variant kinds an archive can serve, and the choice ``make variants`` writes into a model folder.

A kind is how the folder's network is served: ``eager`` (the folder as it is), a built file in a format
(``onnx``, ``onnx_int8``, ``openvino``, ``openvino_int8``, ``aoti``, ``torch_int8``: a pt2e int8 program
compiled at load, ``executorch``, ``executorch_int8``: an XNNPACK program), or a setting of the same model
(``bf16``, ``compile``). :func:`kind_document` turns the folder's model-config into the variant's.

The choice lives in ``<folder>/variant.yaml`` (with its file under ``<folder>/variant/``): the kind, the file's
sha256 and the evidence (metric, budget, machine, date, report). ``make archive MODEL=<name>`` then builds that
variant as ``<name>.mar`` and says so in one line; ``VARIANT=<kind>`` overrides it (``VARIANT=eager``: the
folder's own model); a folder without a choice builds what it always built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from servekit.errors import ConfigError
from servekit.program_backend import AOTI_MAX_BATCH
from torch_int8 import INT8_COMPILE

CHOICE_FILE = "variant.yaml"
CHOICE_DIR = "variant"


@dataclass(frozen=True)
class Kind:
    """One way of serving a folder's network: a built ``file`` in ``format``, or a setting of the model."""

    name: str
    file: str | None = None  # the built file the archive serves (None: the folder's own model)
    format: str | None = None  # handler.model.format of that file
    precision: str = "fp32"
    compile: bool = False
    int8: bool = False

    def describe(self) -> str:
        if self.file:
            return f"{self.file} ({self.format}" + (", torch.compile at load)" if self.compile else ")")
        return (
            "the folder's model"
            + (f", {self.precision}" if self.precision != "fp32" else "")
            + (", torch.compile" if self.compile else "")
        )


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("eager"),
        Kind("onnx", "model.onnx", "onnx"),
        Kind("onnx_int8", "model.int8.onnx", "onnx", int8=True),
        Kind("openvino", "model.onnx", "openvino"),
        Kind("openvino_int8", "model.ov-int8.onnx", "openvino", int8=True),
        Kind("bf16", precision="bf16"),
        Kind("aoti", "model.pt2", "aoti"),
        Kind("torch_int8", "model.int8.pt2", "exported", compile=True, int8=True),
        Kind("executorch", "model.pte", "executorch"),
        Kind("executorch_int8", "model.int8.pte", "executorch", int8=True),
        Kind("compile", compile=True),
    )
}


def kind_of(name: str) -> Kind:
    if name not in KINDS:
        raise ConfigError(f"unknown variant {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name]


def kind_document(document: Mapping[str, Any], kind: Kind, file: Path | None = None) -> dict[str, Any]:
    """The model-config that serves ``kind`` of the folder ``document`` describes (``file``: its built file)."""
    handler = dict(document["handler"])
    out = dict(document)
    if kind.file:
        if file is None:
            raise ConfigError(f"variant {kind.name} serves a built {kind.file}; none was given")
        model: dict[str, Any] = {"file": file.name, "format": kind.format}
        if kind.format == "aoti":
            model["max_batch"] = min(int(document.get("batchSize", 1)), AOTI_MAX_BATCH)
        handler["model"] = model
        handler.pop("compile", None)
    if kind.precision != "fp32":
        handler["model"] = {**handler["model"], "precision": kind.precision}
    if kind.compile:
        handler["compile"] = dict(INT8_COMPILE) if kind.int8 else {"mode": "default", "dynamic": False}
        out["startupTimeout"] = max(600, int(document.get("startupTimeout", 0)))
    out["handler"] = handler
    return out


@dataclass(frozen=True)
class Choice:
    """What ``make variants`` chose for a folder, and why."""

    kind: Kind
    file: Path | None  # the chosen file inside the folder (under variant/), or None
    evidence: Mapping[str, Any]

    def line(self, name: str) -> str:
        """The one line ``make archive`` prints when it builds the choice."""
        ev = self.evidence
        if "value" not in ev:
            return f"{name}: archiving the variant {self.kind.name} ({self.kind.describe()}) as VARIANT= asks"
        value, baseline = float(ev.get("value", "nan")), float(ev.get("baseline", "nan"))
        why = (
            f"{ev.get('metric')} {value:.4f} against eager {baseline:.4f}, budget {ev.get('budget')}, "
            f"{float(ev.get('speedup', 'nan')):.2f}x eager's req/s"
        )
        return (
            f"{name}: archiving the variant make variants chose, {self.kind.name} ({self.kind.describe()}; {why}; "
            f"{ev.get('report')}); VARIANT=eager builds the folder's model"
        )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_choice(folder: Path) -> Choice | None:
    """The folder's recorded choice, or None; a choice whose file is gone or changed is an error."""
    path = folder / CHOICE_FILE
    if not path.is_file():
        return None
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kind = kind_of(str(document.get("kind", "")))
    file = None
    if kind.file:
        file = folder / str(document.get("file", ""))
        if not file.is_file():
            raise ConfigError(f"{path} chose {kind.name} but {file} is missing; run make variants or use VARIANT=eager")
        if document.get("sha256") and sha256_of(file) != document["sha256"]:
            raise ConfigError(f"{file} is not the file make variants chose (sha256 differs); run make variants again")
    return Choice(kind, file, dict(document.get("evidence", {})))


def write_choice(folder: Path, kind: Kind, built: Path | None, evidence: Mapping[str, Any]) -> Path:
    """Record ``kind`` as the folder's choice; its built file is copied to ``<folder>/variant/``."""
    import shutil

    document: dict[str, Any] = {"kind": kind.name}
    target = folder / CHOICE_DIR
    shutil.rmtree(target, ignore_errors=True)
    if kind.file:
        if built is None:
            raise ConfigError(f"variant {kind.name} has no built file to record")
        target.mkdir()
        shutil.copy2(built, target / kind.file)
        document["file"] = f"{CHOICE_DIR}/{kind.file}"
        document["sha256"] = sha256_of(target / kind.file)
    document["evidence"] = dict(evidence)
    header = (
        "# written by `make variants`: the fastest variant within the accuracy budget, with its evidence.\n"
        "# `make archive MODEL=<name>` builds it; `VARIANT=eager` (or another kind) overrides; delete this file\n"
        "# (and variant/) to go back to the folder's own model.\n"
    )
    path = folder / CHOICE_FILE
    path.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
