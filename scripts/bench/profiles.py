"""Tuned serving keys belong to the machine they were measured on: per-machine profiles under ``build/tune/``.

``make tune`` measures on one machine; its choice (``batchSize``, ``maxBatchDelay``, workers, threads) is
written to ``build/tune/profiles/<machine id>.json``, keyed by the CPU model, the CPU flags that change
which kernels run (AVX2, AVX-512, VNNI, BF16, AMX) and the cores this process may use. ``make serve``
applies a profile only on a machine with the same key: the archive is repacked with the profile's keys
into the server's own store (TorchServe reads ``batchSize`` and workers from the archive's
model-config.yaml), and one line says which profile was applied, or that the shipped keys are used.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servekit.host import available_cores, cpu_flags, cpu_model

PROFILE_DIR = Path("build/tune/profiles")
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
FRONTEND_KEYS = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")


@dataclass(frozen=True)
class Machine:
    """What makes measured serving settings transferable: CPU model, kernel-relevant flags, usable cores."""

    cpu_model: str
    flags: tuple[str, ...]
    cores: int

    @property
    def key(self) -> str:
        """A file-name-safe id: a readable stem and a hash of every field."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        stem = re.sub(r"[^a-z0-9]+", "-", self.cpu_model.lower()).strip("-")[:40] or "cpu"
        return f"{stem}-{self.cores}c-{digest}"

    def describe(self) -> str:
        return f"{self.cpu_model}, {' '.join(self.flags) or 'no AVX2'}, {self.cores} cores"


def this_machine() -> Machine:
    """The machine this process runs on (in a container: the cores its CPU limit allows)."""
    flags = cpu_flags()
    return Machine(cpu_model() or "unknown CPU", tuple(f for f in KERNEL_FLAGS if f in flags), available_cores())


@dataclass
class Profile:
    """The keys ``make tune`` chose on one machine, per archive."""

    machine: Machine
    models: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"machine": asdict(self.machine), "models": self.models}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        machine = data["machine"]
        return cls(
            Machine(str(machine["cpu_model"]), tuple(machine["flags"]), int(machine["cores"])), dict(data["models"])
        )


def profile_path(machine: Machine, root: Path = PROFILE_DIR) -> Path:
    return root / f"{machine.key}.json"


def record_choice(archive: str, keys: Mapping[str, int], machine: Machine, root: Path = PROFILE_DIR) -> Path:
    """Add (or replace) one archive's tuned keys in this machine's profile."""
    path = profile_path(machine, root)
    profile = Profile.from_json(path.read_text(encoding="utf-8")) if path.is_file() else Profile(machine)
    profile.models[archive] = {k: int(v) for k, v in keys.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json(), encoding="utf-8")
    return path


def matching_profile(machine: Machine, root: Path = PROFILE_DIR) -> Profile | None:
    """This machine's profile, if ``make tune`` wrote one here; profiles of other machines never match."""
    path = profile_path(machine, root)
    if not path.is_file():
        return None
    profile = Profile.from_json(path.read_text(encoding="utf-8"))
    return profile if profile.machine == machine else None


def profile_root(machine: Machine, roots: Sequence[Path]) -> Path:
    """The first of ``roots`` that holds this machine's profile (the first root where none does)."""
    return next((root for root in roots if matching_profile(machine, root) is not None), roots[0])


def tuned_document(document: dict[str, Any], keys: Mapping[str, int]) -> dict[str, Any]:
    """A model-config document with the profile's frontend keys and ``handler.threads`` set."""
    updated = {**document, **{k: keys[k] for k in FRONTEND_KEYS if k in keys}}
    if "threads" in keys:
        updated["handler"] = {**document.get("handler", {}), "threads": keys["threads"]}
    return updated


def repack(source: Path, dest: Path, document: dict[str, Any]) -> Path:
    """A copy of the archive ``source`` whose model-config.yaml is ``document`` (the rest byte for byte)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "model-config.yaml":
                data = yaml.safe_dump(document, sort_keys=False).encode()
            out.writestr(item, data)
    return dest


def read_document(mar: Path) -> dict[str, Any]:
    """The model-config.yaml inside an archive."""
    with zipfile.ZipFile(mar) as archive:
        return yaml.safe_load(archive.read("model-config.yaml")) or {}


def profiled_store(
    store: Path, names: Sequence[str], dest: Path, machine: Machine, root: Path = PROFILE_DIR
) -> tuple[Path, list[str]]:
    """The store TorchServe should read: ``store`` itself when no profile applies, else ``dest`` holding the
    archives (links) with this machine's tuned archives repacked. Returns it and the lines to print."""
    profile = matching_profile(machine, root)
    if profile is None:
        return store, [f"no tuned profile for this machine ({machine.describe()}): serving the shipped keys"]
    tuned = [n for n in names if n in profile.models]
    if not tuned:
        return store, [f"profile {machine.key} has no entry for {', '.join(names)}: serving the shipped keys"]
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in names:
        target = dest / f"{name}.mar"
        target.unlink(missing_ok=True)
        source = (store / f"{name}.mar").resolve()
        if name in profile.models:
            keys = profile.models[name]
            repack(source, target, tuned_document(read_document(source), keys))
            shown = ", ".join(f"{k} {v}" for k, v in keys.items())
            lines.append(f"applied tuned profile {machine.key} ({machine.describe()}) to {name}: {shown}")
        else:
            target.symlink_to(source)
    return dest, lines
