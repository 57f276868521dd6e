"""The ``state_dict`` and ``safetensors`` formats: tensors read safely, fitted to the network, loaded.

``torch.load`` always runs with ``weights_only=True`` and an allow-list of the plain objects training
code stores beside the weights (``argparse.Namespace``, ``pathlib`` paths, numpy scalars and arrays,
Lightning's ``AttributeDict``): nothing in the file is executed. A whole pickled model, or metadata of a
class outside that list, is refused with one line naming what was found and the command that converts
it (``make convert ... TRUST=1``). The network comes from a torchvision architecture name, a timm name
(``timm:<name>``) or a Python file in the model folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import pathlib
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from servekit import timm_source
from servekit.checkpoint import infer_num_classes, misfit, unwrap_checkpoint
from servekit.config import ModelSource
from servekit.errors import ConfigError, plain_line
from servekit.sniff import pickled_classes


class AttributeDict(dict):  # type: ignore[type-arg]
    """Stands in for Lightning's ``AttributeDict`` (a plain dict of hyperparameters) while unpickling."""


_NUMPY_SCALAR = np.core.multiarray.scalar  # type: ignore[attr-defined]
_NUMPY_RECONSTRUCT = np.core.multiarray._reconstruct  # type: ignore[attr-defined]
# What a checkpoint may hold beside its tensors: plain data classes that run no code of the file's.
METADATA_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
    np.dtype,
    np.ndarray,
    _NUMPY_SCALAR,
    _NUMPY_RECONSTRUCT,
    (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    *(type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")),
    (AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
]
ALLOWED_NAMES = ("argparse.Namespace", "pathlib paths", "numpy scalars and arrays", "Lightning's AttributeDict")


def read_weights(path: Path, fmt: str) -> Any:
    """The object a weights file holds: tensors only (``weights_only=True`` or safetensors).

    Raises:
        ConfigError: the file is damaged, or holds pickled code (a whole model) that is refused.
    """
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"cannot read {path.name} as safetensors: {plain_line(str(exc))}") from None
    try:
        with torch.serialization.safe_globals(METADATA_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError, OSError) as exc:
        raise ConfigError(f"cannot read {path.name}: it is damaged or truncated ({plain_line(str(exc))})") from None


def refusal(path: Path, exc: BaseException) -> ConfigError:
    """The one-line refusal of a file that ``weights_only=True`` and the allow-list would not unpickle:
    a whole model (``torch.save(model)``), or a checkpoint whose metadata holds another class."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in METADATA_GLOBALS}
    classes = [c for c in pickled_classes(path, limit=20) if c not in allowed]
    convert = f"if you trust it, convert it once with: make convert PT={path} OUT=<new file> TRUST=1"
    modules = [c for c in classes if c.startswith("torch.nn.")]
    others = [c for c in classes if not c.startswith("torch.nn.")]
    if modules or not others:
        named = f" ({', '.join(classes[:2])})" if classes else ""
        return ConfigError(
            f"refused to load {path.name}: it holds pickled Python objects{named}, as torch.save(model) writes for "
            f"a whole model, not only tensors, and unpickling them would run code from the file; {convert}"
        )
    return ConfigError(
        f"refused to load {path.name}: it is a checkpoint whose metadata holds {', '.join(others[:2])}, which is not "
        f"one of the plain types the kit reads ({', '.join(ALLOWED_NAMES)}), and unpickling it would import and run "
        f"that code; save only the tensors (torch.save(model.state_dict(), ...)), or {convert}"
    )


def builder_default_classes(architecture: str) -> int:
    """The class count torchvision (or timm, for ``timm:<name>``) builds an architecture with when none is given."""
    if timm_source.is_timm(architecture):
        return timm_source.default_classes(architecture)
    detection = set(torchvision.models.list_models(module=torchvision.models.detection))
    if architecture in detection:
        return 2 if architecture.startswith("keypointrcnn") else 91
    if architecture in set(torchvision.models.list_models(module=torchvision.models.segmentation)):
        return 21
    return 1000


def build_network(model_dir: Path, source: ModelSource, **overrides: Any) -> torch.nn.Module:
    """The untrained network named by ``source`` (torchvision or timm architecture, or model_file class)."""
    kwargs: dict[str, Any] = {**source.kwargs, **overrides}
    if timm_source.is_timm(source.architecture):
        return timm_source.build_timm(str(source.architecture), kwargs)
    if source.architecture is not None:
        try:
            builder = torchvision.models.get_model_builder(source.architecture)
        except ValueError:
            raise ConfigError(f"unknown torchvision architecture {source.architecture!r}") from None
        kwargs.setdefault("weights", None)  # never download: the weights are in the file
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)
        if source.architecture in AUX_HEADS:  # GoogLeNet, Inception: no scipy initialisation of weights about
            kwargs.setdefault("init_weights", False)  # to be overwritten (and no FutureWarning about its default)
        return builder(**kwargs)
    return user_class(model_dir, source)(**kwargs)


def user_class(model_dir: Path, source: ModelSource) -> type:
    """The network class defined in the model folder's ``model_file``."""
    assert source.model_file is not None and source.model_class is not None
    module_path = model_dir / source.model_file
    if not module_path.is_file():
        raise ConfigError(f"model_file {source.model_file} is missing from the model folder")
    spec = importlib.util.spec_from_file_location(f"servekit_user_model_{module_path.stem}", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, source.model_class, None)
    if not isinstance(cls, type):
        raise ConfigError(f"model_class {source.model_class!r} is not a class defined in {source.model_file}")
    return cls


def default_classes(model_dir: Path, source: ModelSource) -> int | None:
    """The class count the network is built with, when it takes ``num_classes``."""
    if "num_classes" in source.kwargs:
        return int(source.kwargs["num_classes"])
    if source.architecture is not None:
        return builder_default_classes(source.architecture)
    parameter = inspect.signature(user_class(model_dir, source)).parameters.get("num_classes")
    if parameter is None or not isinstance(parameter.default, int):
        return None
    return parameter.default


@dataclass
class FittedWeights:
    """A network with the file's weights loaded, and how they were made to fit."""

    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    steps: tuple[str, ...]
    num_classes: int | None
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder keys the weights asked for (aux_logits)


def fit_weights(obj: Any, model_dir: Path, source: ModelSource) -> FittedWeights:
    """Unwrap the saved object, size the head from the weights when needed, and load them.

    Raises:
        ConfigError: one line naming the misfit (a layer and both shapes, or the missing keys).
    """
    name = source.architecture or source.model_class or "the network"
    model = build_network(model_dir, source)
    reference = model.state_dict()
    unwrapped = unwrap_checkpoint(obj, set(reference))
    state, steps = without_aux_head(unwrapped.state, reference, unwrapped.steps)
    extra = without_aux_logits(source, state, reference)
    if extra:
        model = build_network(model_dir, source, **extra)
        reference = model.state_dict()
        steps = (*steps, "no auxiliary heads in the weights (an eval-mode state_dict): built with aux_logits false")
    problem = misfit(state, reference, name)
    classes = default_classes(model_dir, source)
    if problem and classes is not None and "num_classes" not in source.kwargs:
        inferred = infer_num_classes(state, reference, classes)
        if inferred is not None:
            model = build_network(model_dir, source, num_classes=inferred, **extra)
            problem = misfit(state, model.state_dict(), f"{name} with {inferred} classes")
            classes = inferred
    if problem:
        raise ConfigError(problem)
    state = with_metadata(state, getattr(unwrapped.state, "_metadata", None) or getattr(reference, "_metadata", None))
    model.load_state_dict(state)
    return FittedWeights(model, state, steps, classes, extra)


# torchvision classifiers whose training-only auxiliary heads an eval-mode state_dict may leave out
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def without_aux_logits(
    source: ModelSource, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """``{"aux_logits": False}`` when a GoogLeNet or Inception v3's weights lack exactly its auxiliary heads."""
    prefixes = AUX_HEADS.get(str(source.architecture), ())
    if not prefixes or "aux_logits" in source.kwargs:
        return {}
    missing = [k for k in reference if k not in state]
    return {"aux_logits": False} if missing and all(k.startswith(prefixes) for k in missing) else {}


def with_metadata(state: Mapping[str, torch.Tensor], metadata: Any) -> dict[str, torch.Tensor]:
    """The weights as an ``OrderedDict`` carrying ``_metadata`` (each module's version, which
    ``load_state_dict`` reads: MNASNet refuses weights without it): the file's own, or, when unwrapping lost
    it (a prefix stripped, safetensors), the built network's, whose layout the weights were just checked to fit."""
    carried: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    if metadata is not None:
        carried._metadata = metadata  # type: ignore[attr-defined]
    return carried


AUX_PREFIX = "aux_classifier."  # torchvision FCN / DeepLabV3: a second head used only by the training loss


def without_aux_head(
    state: dict[str, torch.Tensor], reference: Mapping[str, torch.Tensor], steps: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The weights without a segmentation model's auxiliary head when the served network has none."""
    aux = [k for k in state if k.startswith(AUX_PREFIX) and k not in reference]
    if not aux:
        return state, steps
    kept = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
    return kept, (*steps, f"dropped aux_classifier ({len(aux)} tensors; a head only the training loss uses)")


def load_weights(path: Path, model_dir: Path, source: ModelSource) -> torch.nn.Module:
    """The network of a ``state_dict`` or ``safetensors`` model folder, weights loaded, on the CPU."""
    try:
        return fit_weights(read_weights(path, source.format), model_dir, source).model
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(("refused", "cannot")) else f"{path.name}: {message}") from None
