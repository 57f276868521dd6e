"""Weights as training code saves them, made to fit an architecture: pure functions on tensor dicts.

Training loops save ``{"epoch": 3, "model": state_dict, "optimizer": ...}``, wrap the network in
``DataParallel`` (``module.`` prefix) or ``torch.compile`` (``_orig_mod.``), or keep an EMA copy. These
functions find the state_dict inside such an object, strip wrapper prefixes when that makes the keys
match the architecture, read the number of classes off the final layer, and describe any misfit in
one line (never a key dump).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from servekit.errors import ConfigError

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema", "model_ema", "module")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Unwrapped:
    """A plain state_dict and the steps that got it out of the saved object."""

    state: dict[str, torch.Tensor]
    steps: tuple[str, ...] = ()


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def nested_state_dicts(obj: Any, path: tuple[str, ...] = (), depth: int = 3) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Every state_dict in ``obj``: itself, then under the usual checkpoint keys, in that order."""
    if is_state_dict(obj):
        yield path, obj if isinstance(obj, OrderedDict) else dict(obj)  # an OrderedDict keeps its _metadata
        return
    if not isinstance(obj, Mapping) or depth == 0:
        return
    for key in NESTED_KEYS:
        if key in obj:
            yield from nested_state_dicts(obj[key], (*path, key), depth - 1)


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove the wrapper or attribute prefix (``module.``, ``_orig_mod.module.``, a Lightning module's
    ``net.``) that makes the most keys match ``expected``; keep the keys as they are when none does better.

    The prefix is found by matching the architecture's keys, not from a fixed list: every dotted head
    of a key whose rest is an expected key is a candidate, and the one matching most wins (the shortest
    on a tie). When the network's keys all sit under that prefix, keys outside it (a loss's weights,
    metrics) belong to no layer and are dropped, and the returned steps say which.
    """
    counts: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in expected:
                counts[".".join(parts[:i]) + "."] += 1
    plain = len(expected.intersection(state))
    best = min(counts, key=lambda p: (-counts[p], len(p)), default="")
    if not best or counts[best] <= plain:
        return state, []
    inside = {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}
    outside = [k for k in state if not k.startswith(best)]
    steps = [f"prefix {best!r} stripped"]
    if outside and expected <= set(inside):
        shown = ", ".join(repr(k) for k in outside[:3]) + (", ..." if len(outside) > 3 else "")
        keys = "key" if len(outside) == 1 else "keys"
        steps.append(f"{len(outside)} {keys} outside {best!r} dropped, not layers of the network: {shown}")
        return inside, steps
    return {**{k: state[k] for k in outside}, **inside}, steps


def unwrap_checkpoint(obj: Any, expected: set[str]) -> Unwrapped:
    """The state_dict in ``obj`` that best fits the keys ``expected``, with wrapper prefixes stripped.

    Raises:
        ConfigError: ``obj`` holds no mapping of tensors at the top or under the usual keys.
    """
    best: tuple[int, Unwrapped] | None = None
    for path, found in nested_state_dicts(obj):
        state, stripped = strip_prefixes(found, expected)
        steps = [f"weights under {'/'.join(repr(p) for p in path)}"] if path else []
        steps += stripped
        score = len(expected.intersection(state))
        if best is None or score > best[0]:
            best = (score, Unwrapped(state, tuple(steps)))
    if best is None:
        raise ConfigError(f"holds no state_dict: {describe_object(obj)}")
    return best[1]


def describe_object(obj: Any) -> str:
    """A short description of a loaded object (its type, and a few keys of a mapping)."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:8]]
        more = f", ... ({len(obj)} keys)" if len(obj) > 8 else ""
        return f"a {type(obj).__name__} with keys {keys}{more[:40]}"
    return f"a {type(obj).__name__}"


def shape_of(tensor: torch.Tensor) -> Shape:
    return tuple(int(d) for d in tensor.shape)


def head_key(reference: Mapping[str, torch.Tensor], classes: int) -> str | None:
    """The final layer's weight: the last ``*.weight`` whose first dimension is ``classes``."""
    keys = [k for k, v in reference.items() if k.endswith(".weight") and v.dim() >= 1 and v.shape[0] == classes]
    return keys[-1] if keys else None


def infer_num_classes(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], default: int
) -> int | None:
    """The class count the weights were trained for, when only the class-sized layers differ from ``reference``.

    ``reference`` is the architecture built with ``default`` classes. A layer sized k x ``default`` there
    (k = 1 for a linear head, 4 for R-CNN box regression, the anchors per location for SSD, SSDlite,
    RetinaNet and FCOS classification heads) is k x C in the file. Returns None when the weights already
    fit, or when the misfits do not agree on one C.
    """
    found: set[int] = set()
    for key, tensor in reference.items():
        if key not in state or tensor.dim() < 1 or shape_of(state[key]) == shape_of(tensor):
            continue
        rows, file_rows = int(tensor.shape[0]), shape_of(state[key])[0]
        if rows % default or shape_of(state[key])[1:] != shape_of(tensor)[1:] or file_rows % (rows // default):
            return None
        found.add(file_rows // (rows // default))
    return found.pop() if len(found) == 1 else None


def misfit(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], arch: str) -> str | None:
    """One line saying how the weights fail to fit ``arch``, or None when every key and shape fits."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(reference)} keys are missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys are not in it (first: {unexpected[0]!r})")
        return f"the weights do not fit {arch}: " + "; ".join(parts)
    for key, tensor in reference.items():
        if shape_of(state[key]) != shape_of(tensor):
            return (
                f"the weights do not fit {arch}: layer {key!r} is {list(shape_of(state[key]))} in the file "
                f"but {list(shape_of(tensor))} in the architecture"
            )
    return None


def check_labels(count: int, classes: int, layer: str | None, shape: Sequence[int] | None) -> None:
    """Fail with one line when the labels file and the final layer disagree on the class count."""
    if count and count != classes:
        where = f"the final layer {layer!r} has shape {list(shape or [])}" if layer else "the model has"
        raise ConfigError(f"the labels file has {count} names but {where}: {classes} classes")
