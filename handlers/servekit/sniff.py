"""What a model file is, found from its bytes (zip entries, magic numbers), never from its name.

A ``.pt`` may be a state_dict, a training checkpoint, a TorchScript archive or a whole pickled model;
a ``.pt2`` may be a ``torch.export`` program or an AOTInductor package; a ``.pte`` is an ExecuTorch program
(a flatbuffer whose file identifier, at offset 4, is ``ET`` and two digits: ``ET12`` today).
:func:`sniff_model_file` looks inside once (at scaffold time) and returns the ``handler.model.format`` to write.
Nothing here unpickles: :func:`pickled_classes` lists the classes a pickle would import by reading its opcodes.
"""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from servekit.errors import ConfigError

FORMATS = ("state_dict", "safetensors", "torchscript", "exported", "aoti", "onnx", "executorch")
# File names the kit gives each format inside a model folder.
FILE_NAMES = {
    "state_dict": "model.pt",
    "safetensors": "model.safetensors",
    "torchscript": "model.pt",
    "exported": "model.pt2",
    "aoti": "model.pt2",
    "onnx": "model.onnx",
    "executorch": "model.pte",
}
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class Sniffed:
    """A file's format and one line saying what it is."""

    format: str
    description: str


def sniff_model_file(path: Path) -> Sniffed:
    """Tell the format of a model file (or folder, see :func:`sniff_model_folder`) from its content.

    Raises:
        ConfigError: the file is missing, empty, truncated, or none of the known formats.
    """
    if path.is_dir():
        return sniff_model_folder(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{path.name} is empty")
    with path.open("rb") as handle:
        head = handle.read(16)
    if head.startswith(_ZIP_MAGIC):
        return _sniff_zip(path)
    if _is_pte(head):
        return Sniffed("executorch", f"an ExecuTorch program ({head[4:8].decode()})")
    if _is_safetensors(path, head, size):
        return Sniffed("safetensors", "a safetensors file of tensors")
    if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return Sniffed("state_dict", "a torch.save file in the legacy (non-zip) format")
    if _is_onnx(path, head):
        return Sniffed("onnx", "an ONNX graph")
    raise ConfigError(
        f"cannot tell what {path.name} is ({size} bytes starting {head[:8]!r}): it is none of a torch.save "
        "file, TorchScript, a torch.export or AOTInductor .pt2, safetensors, ONNX or an ExecuTorch .pte"
    )


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm hub or Hugging Face folder's weights


def sniff_model_folder(path: Path) -> Sniffed:
    """Tell what a model folder holds from its ``config.json``: a timm hub folder (``architecture``,
    ``pretrained_cfg``; format ``timm``) or a Hugging Face ``save_pretrained`` folder (``model_type``;
    format ``transformers``), each with its weights file.

    Raises:
        ConfigError: neither, or the weights are missing.
    """
    config_path = path / "config.json"
    config: object = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
    files = sorted(p.name for p in path.iterdir())
    weights = [name for name in WEIGHT_FILES if name in files]
    if isinstance(config, dict) and ("architecture" in config or "model_type" in config):
        if not weights:
            raise ConfigError(
                f"{path} has a config.json but no weights file (one of {list(WEIGHT_FILES)}); files: {files[:8]}"
            )
        if "architecture" in config:
            return Sniffed("timm", f"a timm hub folder ({config['architecture']}, {weights[0]})")
        named = ", ".join(str(a) for a in config.get("architectures") or []) or str(config["model_type"])
        return Sniffed("transformers", f"a Hugging Face save_pretrained folder ({named}, {weights[0]})")
    raise ConfigError(
        f"{path} is a folder holding neither a timm hub folder (config.json with 'architecture') nor a Hugging Face "
        f"save_pretrained folder (config.json with 'model_type'); files: {files[:8]}; for a single file pass PT=<file>"
    )


def _sniff_zip(path: Path) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"{path.name} is a damaged or truncated zip archive ({exc})") from None
    entries = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if any(e.startswith("data/aotinductor/") for e in entries):
        return Sniffed("aoti", "an AOTInductor package (compiled native code)")
    if any(e.startswith("models/") and e.endswith(".json") for e in entries):
        return Sniffed("exported", "a torch.export program (ExportedProgram)")
    if "constants.pkl" in entries or any(e.startswith("code/") for e in entries):
        return Sniffed("torchscript", "a TorchScript archive")
    if "data.pkl" in entries:
        return Sniffed("state_dict", "a torch.save file")
    raise ConfigError(f"{path.name} is a zip archive but not one torch writes (entries: {sorted(entries)[:5]})")


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object of that length."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= size - 8:
        return False
    with path.open("rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return False
    return isinstance(header, dict)


def _is_onnx(path: Path, head: bytes) -> bool:
    """ONNX ModelProto: field 1 (ir_version, a varint) first; confirmed by parsing with ``onnx``."""
    if head[:1] != b"\x08":
        return False
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx ships with the kit's requirements
        return True
    try:
        onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return False
    return True


def _is_pte(head: bytes) -> bool:
    """An ExecuTorch flatbuffer: a 4-byte root offset, then the file identifier ``ET`` and two digits (its
    schema version, ``ET12`` in ExecuTorch 1.x); the root table lies within the file's first bytes."""
    if len(head) < 8 or head[4:6] != b"ET" or not head[6:8].isdigit():
        return False
    (root,) = struct.unpack("<I", head[:4])
    return 8 <= root


def pickled_classes(path: Path, limit: int = 5) -> list[str]:
    """The non-torch classes a torch.save file's pickle would import, read from its opcodes (nothing runs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(pickle_name)
    except (zipfile.BadZipFile, StopIteration, OSError):
        with path.open("rb") as handle:
            data = handle.read(1 << 20)
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            name = _global_name(opcode.name, arg, strings)
            if name and _is_user_class(name) and name not in found:
                found.append(name)
    except Exception:
        pass
    return found[:limit]


def _is_user_class(name: str) -> bool:
    """A class a pickle imports that is not one of torch's storage/tensor helpers or a builtin."""
    if name.startswith(("collections.", "builtins.", "__builtin__.", "_codecs.", "numpy.", "copyreg.")):
        return False
    return not name.startswith("torch.") or name.startswith("torch.nn.")


def _global_name(opcode: str, arg: object, strings: list[str]) -> str | None:
    if opcode == "GLOBAL" and isinstance(arg, str):
        return arg.replace(" ", ".")
    if opcode == "STACK_GLOBAL" and len(strings) >= 2:
        return f"{strings[-2]}.{strings[-1]}"
    return None
