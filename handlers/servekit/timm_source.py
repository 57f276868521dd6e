"""timm networks: built by name with ``timm.create_model(pretrained=False)``; never a download.

A model folder names one as ``architecture: timm:<name>`` (a state_dict or safetensors file holds the
weights). timm is imported only when such a model loads; without it the load fails in one line.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from servekit.errors import ConfigError, require

PREFIX = "timm:"


def is_timm(architecture: str | None) -> bool:
    """Whether an ``architecture`` value names a timm model (``timm:<name>``)."""
    return bool(architecture) and str(architecture).startswith(PREFIX)


def check_name(name: str) -> None:
    """Fail with one line (and close names) when timm has no model of that name.

    Raises:
        ConfigError: an unknown timm model name.
    """
    timm = require("timm", f"timm model {name!r}")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; `python -c 'import timm; print(timm.list_models())'` lists them"
    )
    raise ConfigError(f"unknown timm model {name!r}{hint}")


def build_timm(architecture: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The untrained timm network ``timm:<name>`` with ``kwargs`` (``num_classes``, ...)."""
    name = architecture.removeprefix(PREFIX)
    check_name(name)
    timm = require("timm", f"timm model {name!r}")
    # a model whose default config is headless (EVA-02's MIM weights: num_classes 0) still gets a head to fit
    if "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": default_classes(architecture)}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"timm could not build {name!r} with {kwargs}: {exc}") from None


def default_classes(architecture: str) -> int:
    """The class count timm builds a model with when none is given (its pretrained config's, else 1000)."""
    name = architecture.removeprefix(PREFIX)
    check_name(name)
    timm = require("timm", f"timm model {name!r}")
    cfg = timm.models.get_pretrained_cfg(name)
    return int(getattr(cfg, "num_classes", 0) or 1000)
