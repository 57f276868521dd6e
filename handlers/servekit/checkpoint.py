"""Weights as training code saves them, made to fit an architecture: pure functions on tensor dicts.

Training loops save ``{"epoch": 3, "model": state_dict, "optimizer": ...}``, wrap the network in
``DataParallel`` (``module.`` prefix) or ``torch.compile`` (``_orig_mod.``), or keep an EMA copy. These
functions find the state_dict inside such an object, strip wrapper prefixes when that makes the keys
match the architecture, read the number of classes off the final layer, and describe any misfit in
one line (never a key dump).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from servekit.errors import ConfigError

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "ema", "model_ema", "module")
PREFIXES = ("module.", "_orig_mod.", "model.")
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
        yield path, dict(obj)
        return
    if not isinstance(obj, Mapping) or depth == 0:
        return
    for key in NESTED_KEYS:
        if key in obj:
            yield from nested_state_dicts(obj[key], (*path, key), depth - 1)


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes shared by every key (``_orig_mod.module.`` too) if that matches more keys.

    Each step strips one known prefix that all keys share; the step matching the most ``expected``
    keys wins, the fewest strips on a tie, so a prefix that is part of the architecture's names stays.
    """
    chain: list[tuple[dict[str, torch.Tensor], list[str]]] = [(state, [])]
    while True:
        current, stripped = chain[-1]
        prefix = next((p for p in PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            break
        chain.append(({k[len(prefix) :]: v for k, v in current.items()}, [*stripped, prefix]))
    return max(chain, key=lambda step: len(expected.intersection(step[0])))


def unwrap_checkpoint(obj: Any, expected: set[str]) -> Unwrapped:
    """The state_dict in ``obj`` that best fits the keys ``expected``, with wrapper prefixes stripped.

    Raises:
        ConfigError: ``obj`` holds no mapping of tensors at the top or under the usual keys.
    """
    best: tuple[int, Unwrapped] | None = None
    for path, found in nested_state_dicts(obj):
        state, stripped = strip_prefixes(found, expected)
        steps = [f"weights under {'/'.join(repr(p) for p in path)}"] if path else []
        steps += [f"prefix {p!r} stripped" for p in stripped]
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
    """The class count the weights were trained for, when only the head differs from ``reference``.

    ``reference`` is the architecture built with ``default`` classes. Returns None when the weights
    already fit, or when the misfit is not a head of another size.
    """
    found = {
        shape_of(state[k])[0]
        for k, v in reference.items()
        if k in state and v.dim() >= 1 and v.shape[0] == default and shape_of(state[k]) != shape_of(v)
    }
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
