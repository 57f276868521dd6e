"""ExecuTorch (`make pte`, `format: executorch`): the trained digits model lowered to XNNPACK, run through the
ExecuTorch runtime by the kit's own backend against eager, the app's recipe against the parsed config, the .pte
found from its bytes and scaffolded, what is refused, and the program served by a real TorchServe."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scaffold_model
import torch
import yaml

import demo_models
import export_pte
import reference
from client import KeyRing, RestClient
from kit import REPO, Server
from servekit.config import ModelSource, read_model_config
from servekit.errors import ConfigError
from servekit.loading import load_labels, load_model
from servekit.sniff import sniff_model_file

MODELS = REPO / "models"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``make pte MODEL=digits`` and ``INT8=1`` into a temporary build folder: the reports and the files."""
    if not (MODELS / "digits" / "model.pt").is_file():
        pytest.fail("models/digits/model.pt is missing: run the tests with `make test` (it runs `make models`)")
    out = tmp_path_factory.mktemp("pte")
    fp32, recipe = export_pte.build_pte("digits", MODELS, out)
    int8, _ = export_pte.build_pte("digits", MODELS, out, int8=True)
    return {"fp32": fp32, "int8": int8, "recipe": recipe, "folder": out / "digits"}


def eager_digits() -> torch.nn.Module:
    config = read_model_config(MODELS / "digits")
    return load_model(MODELS / "digits", config.model, torch.device("cpu"))


def test_the_program_answers_as_eager_through_the_kit_backend(built: dict[str, Any]) -> None:
    """Batch 1, and a batch of 11 over the exported maximum of 8 (run in two chunks), within 1e-4 of eager."""
    report = built["fp32"]
    assert report.batch == (1, 8) and report.input == (32, 32)
    assert report.fidelity.max_abs <= 1e-4 * max(1.0, report.fidelity.largest), report
    assert report.fidelity.accuracy[0] == report.fidelity.accuracy[1] >= 0.95, report
    served = load_model(built["folder"], ModelSource(file="model.pte", format="executorch"), torch.device("cpu"))
    assert (served.spec.min_batch, served.spec.max_batch) == (1, 8)
    network = eager_digits()
    torch.manual_seed(0)
    for size in (1, 11):
        x = torch.randn(size, 3, 32, 32)
        with torch.inference_mode():
            got, want = served(x), network(x)
        assert got.shape == want.shape == (size, 10)
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    with pytest.raises(ConfigError, match="takes 32x32 images, the recipe gives 28x28"):
        served(torch.zeros(1, 3, 28, 28))


def test_int8_keeps_the_digits_accuracy_in_a_quarter_of_the_size(built: dict[str, Any]) -> None:
    fp32, int8 = built["fp32"], built["int8"]
    sys.stderr.write(f"\n[pte] {fp32.describe()}\n[pte] {int8.describe()}\n")
    assert int8.program.endswith("model.int8.pte") and int8.size_bytes < fp32.size_bytes / 3
    eager, program = int8.fidelity.accuracy
    assert eager - program <= 0.01 and int8.fidelity.agreement >= 0.98, int8.fidelity


def test_the_recipe_is_the_parsed_config(built: dict[str, Any]) -> None:
    config = read_model_config(MODELS / "digits")
    recipe = json.loads(built["recipe"].read_text())
    assert recipe["resize"] == config.resize and recipe["crop"] == list(config.input_size)
    assert (recipe["mean"], recipe["std"]) == (list(config.mean), list(config.std))
    assert (recipe["interpolation"], recipe["crop_rounding"]) == (config.interpolation, config.crop_rounding)
    assert recipe["labels"] == load_labels(MODELS / "digits" / config.labels)
    assert recipe["input"] == {"shape": ["N", 3, 32, 32], "batch": [1, 8], "dtype": "float32", "layout": "NCHW"}
    assert recipe["scale"] == pytest.approx(1 / 255) and recipe["output"]["topk"] == config.topk
    saved = json.loads((built["folder"] / "report.json").read_text())
    assert saved["fidelity"]["max_abs"] == built["fp32"].fidelity.max_abs and "avx" in saved["machine"]


def test_a_pte_is_found_from_its_bytes_and_scaffolds(built: dict[str, Any], tmp_path: Path) -> None:
    renamed = tmp_path / "exported.bin"
    shutil.copyfile(built["folder"] / "model.pte", renamed)
    assert sniff_model_file(renamed).format == "executorch"
    args = scaffold_model.parse_args(
        ["--name", "edge", "--task", "classification", "--pt", str(renamed), "--root", str(tmp_path / "models"),
         "--labels", str(MODELS / "digits" / "labels.json")]
    )  # fmt: skip
    folder, line = scaffold_model.scaffold(args)
    assert "an ExecuTorch program (ET12): format executorch" in line and "input 32x32 read from the graph" in line
    handler = yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]
    assert handler["model"] == {"file": "model.pte", "format": "executorch"} and handler["crop"] == 32


def test_what_make_pte_refuses_is_said_in_one_line() -> None:
    assert "torchvision detector" in export_pte.refusal("fasterrcnn", read_model_config(MODELS / "fasterrcnn"))
    assert "resize to [height, width]" in export_pte.refusal("lraspp", read_model_config(MODELS / "lraspp"))
    assert export_pte.refusal("shapes_seg", read_model_config(MODELS / "shapes_seg")) == ""


def test_a_worker_without_executorch_fails_its_load_in_one_line(
    built: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # import executorch.runtime now raises
    with pytest.raises(ConfigError, match=r"needs the Python package 'executorch'.*requirements-executorch\.txt"):
        load_model(built["folder"], ModelSource(file="model.pte", format="executorch"), torch.device("cpu"))


@pytest.mark.e2e
def test_torchserve_serves_the_program_as_the_raw_model(server: Server, photos: dict[str, np.ndarray]) -> None:
    """``model_store/digits_pte.mar`` (``make pte MODEL=digits``) in the shared TorchServe."""
    rest = RestClient(server.endpoints, KeyRing(server.key_file))
    for name in ("chelsea", "rocket"):
        reply = rest.predict("digits_pte", demo_models.encode(photos[name], "PNG"))
        assert reply.status == 200, reply.body
        reference.assert_classification_matches(reply.body, reference.class_probabilities("digits", photos[name]))
