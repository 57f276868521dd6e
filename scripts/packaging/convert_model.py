"""Convert a whole pickled model (``torch.save(model)``) into a file the kit loads safely (``make convert``).

Unpickling such a file runs code from it, so the kit refuses it at load. This command loads it once,
only with ``--trust`` (the user vouches for the file), and writes either a plain state_dict, when the
model is a torchvision class (scaffold it with ``ARCH=<name>``), or else a ``torch.export`` program
with a dynamic batch (scaffold it as it is).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

from cli import report
from servekit.checkpoint import misfit
from servekit.errors import ConfigError


def find_module(obj: Any) -> torch.nn.Module:
    """The network in a loaded object: the object itself, or a module under a checkpoint's usual keys."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "ema", "model_ema", "module", "net"):
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key]
    raise ConfigError(f"the file holds a {type(obj).__name__}, not a torch.nn.Module")


def head_classes(model: torch.nn.Module) -> int | None:
    """The class count of a torchvision classifier (last Linear) or R-CNN detector (box predictor)."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None:
        return int(predictor.cls_score.out_features)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def torchvision_architecture(model: torch.nn.Module) -> tuple[str, int | None] | None:
    """The torchvision builder name whose network has exactly this model's keys and shapes, if any."""
    module = type(model).__module__
    if not module.startswith("torchvision.models"):
        return None
    classes = head_classes(model)
    state = model.state_dict()
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != module:
            continue
        kwargs: dict[str, Any] = {"weights": None}
        if classes is not None:
            kwargs["num_classes"] = classes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidate = builder(**kwargs)
        except (TypeError, ValueError):
            continue
        if type(candidate) is type(model) and misfit(state, candidate.state_dict(), name) is None:
            return name, classes
    return None


def convert(source: Path, out: Path, size: int) -> str:
    """Write ``out`` from the pickled model in ``source``; return the line that says what was written."""
    obj = torch.load(str(source), map_location="cpu", weights_only=False)  # trusted by the user (--trust)
    model = find_module(obj).float().eval()
    found = torchvision_architecture(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if found is not None:
        name, classes = found
        torch.save(model.state_dict(), out)
        task = "detection" if hasattr(model, "roi_heads") else "classification"
        return (
            f"wrote {out}: the state_dict of torchvision {name} ({classes} classes); scaffold it with: "
            f"make scaffold NAME=<name> TASK={task} PT={out} ARCH={name}"
        )
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))
    return (
        f"wrote {out}: a torch.export program of {type(model).__name__} (input N x 3 x {size} x {size}, batch 1-256); "
        f"scaffold it with: make scaffold NAME=<name> TASK=classification PT={out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trust", action="store_true", help="you vouch for the file: unpickling runs its code")
    parser.add_argument("--size", type=int, default=224, help="input height and width of a custom model's export")
    parser.add_argument("--code", type=Path, help="folder holding the Python modules the pickled model's class needs")
    args = parser.parse_args(argv)
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))

    def run() -> str:
        if not args.pt.is_file():
            raise ConfigError(f"{args.pt} does not exist")
        if not str(args.out) or str(args.out) == ".":
            raise ConfigError("OUT=<file to write> is required")
        if not args.trust:
            raise ConfigError(
                f"loading {args.pt.name} runs code from the file; add TRUST=1 only if you vouch for where it came from"
            )
        try:
            return convert(args.pt, args.out, args.size)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"the pickled model's class needs module {exc.name!r}, which is not importable: "
                f"add CODE=<folder holding {exc.name}.py>"
            ) from None

    return report(run, f"convert {args.pt}")


if __name__ == "__main__":
    sys.exit(main())
