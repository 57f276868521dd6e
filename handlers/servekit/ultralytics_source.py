"""What an ultralytics export says about itself: class names, input size and stride, read from its metadata.

Their exporter writes the metadata as JSON into a TorchScript file's ``extra/config.txt`` and as
Python literals into an ONNX graph's ``metadata_props``. Both are read here as data (``json`` and
``ast.literal_eval``), never executed. The layouts and metadata keys are their published contract;
no code of theirs is used.
"""

from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExportMetadata:
    """The parts of an ultralytics export's metadata that serving needs."""

    names: list[str]
    imgsz: tuple[int, int]
    stride: int
    task: str

    def describe(self) -> str:
        """One line for scaffold."""
        return (
            f"ultralytics {self.task} export metadata: {len(self.names)} class names, imgsz "
            f"{self.imgsz[0]}x{self.imgsz[1]}, stride {self.stride}"
        )


def read_export_metadata(path: Path, fmt: str) -> ExportMetadata | None:
    """The metadata of a TorchScript or ONNX file exported by ultralytics, or None when it has none."""
    raw = _torchscript_metadata(path) if fmt == "torchscript" else _onnx_metadata(path) if fmt == "onnx" else {}
    return parse_metadata(raw)


def parse_metadata(raw: dict[str, Any]) -> ExportMetadata | None:
    """Names, imgsz, stride and task from the metadata mapping (values may be Python literals as text)."""
    if "names" not in raw or "imgsz" not in raw:
        return None
    values = {k: _literal(v) if isinstance(v, str) and k in ("names", "imgsz", "stride") else v for k, v in raw.items()}
    names, imgsz = values["names"], values["imgsz"]
    if isinstance(names, dict):
        indexed = {int(k): str(v) for k, v in names.items()}
        names = [indexed.get(i, f"class{i}") for i in range(max(indexed, default=-1) + 1)]
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    if not isinstance(names, list) or not isinstance(imgsz, (list, tuple)) or len(imgsz) != 2:
        return None
    return ExportMetadata(
        [str(n) for n in names],
        (int(imgsz[0]), int(imgsz[1])),
        int(values.get("stride", 32)),
        str(values.get("task", "detect")),
    )


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _torchscript_metadata(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            entry = next((n for n in archive.namelist() if n.endswith("/extra/config.txt")), None)
            text = archive.read(entry).decode("utf-8") if entry else ""
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError):
        return {}
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _onnx_metadata(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
