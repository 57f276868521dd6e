"""`make prune` and `make distill` on the letters classifier: the pure parts (the distillation loss against its
definition, the refusals, the vector width), then the real commands on images as users hold them (class folders,
or a flat folder with a broken file), the folders they write served by the kit's own loader and, for the pruned
model, measured by `make variants` through a real TorchServe (eager, ONNX and the torch-native int8 variant);
`make qat` on a small share of the letters, PTQ and QAT side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from distill import kd_loss, shifted
from eval_data import load_dataset, split
from kit import REPO, demo_data, run_make
from prune import classifier_layer, refusal, vector_width
from servekit.config import read_model_config, read_model_document
from servekit.loading import load_model
from servekit.program_backend import holds_quantized_ops
from variant_kinds import KINDS, kind_document
from variants import inprocess_metric


def test_kd_loss_is_hintons_soft_target_loss() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 26), torch.randn(4, 26)
    t = 3.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert float(kd_loss(student, teacher, t)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_shift_keeps_the_shape_and_the_pixels() -> None:
    batch = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    moved = shifted(batch, 2, torch.Generator().manual_seed(1))
    assert moved.shape == batch.shape
    assert set(moved.unique().tolist()) <= set(batch.unique().tolist())
    assert torch.equal(shifted(batch, 0, torch.Generator()), batch)


def test_vector_width_and_refusals() -> None:
    assert vector_width({"avx2", "avx512f"}) == 16 and vector_width({"avx2"}) == 8

    attention = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    assert "attention layers" in refusal("m", "state_dict", attention)
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    assert "needs the network as a torch module" in refusal("m", "torchscript", scripted)
    assert "Hugging Face" in refusal("m", "transformers", torch.nn.Linear(2, 2))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 5), torch.nn.Linear(5, 5)
    )
    assert classifier_layer(net, 5) is net[3]
    assert refusal("m", "state_dict", net) == ""


def flat_images(root: Path) -> Path:
    """A user's unlabeled folder: images straight from the letters' training side, no class folders, one broken."""
    root.mkdir(parents=True)
    for i, path in enumerate(sorted(demo_data("letters/train").rglob("*.jpg"))[::6]):
        shutil.copy(path, root / f"img_{i:04d}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.e2e
def test_make_prune_recovers_by_distillation_and_make_variants_serves_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "letters", models / "letters", ignore=shutil.ignore_patterns("variant*"))
    done = run_make("prune", MODEL="letters", DATA=demo_data("letters/train"), MODELS=models, EPOCHS=10)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith(f"wrote {models}/letters_pruned: MACs")
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]
    folder = models / "letters_pruned"
    config = read_model_config(folder)
    assert config.model.format == "exported" and (folder / "labels.json").is_file()
    report = json.loads((REPO / "build" / "compress" / "letters_pruned" / "report.json").read_text())
    rows = report["networks"]
    unpruned, raw, distilled = rows["letters (unpruned)"], rows["pruned, not fine-tuned"], rows["pruned + distilled"]
    assert raw["top1"] < 0.5 * unpruned["top1"], rows  # pruning half the MACs away breaks it...
    assert distilled["top1"] > raw["top1"] + 0.25, rows  # ...and distillation brings it back
    assert "ImageFolder with labels" in report["facts"]["data"]
    network = load_model(folder, config.model, torch.device("cpu"))
    assert network(torch.zeros(3, 3, 64, 64)).shape == (3, 26)

    out = tmp_path / "variants"
    measured = run_make(
        "variants", MODEL="letters_pruned", DATA=demo_data("letters/test"), MODELS=models, VARIANTS_OUT=out,
        KINDS="eager onnx torch_int8", SECONDS=2,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert "Warning" not in measured.stderr, measured.stderr[-2000:]
    table = {row["kind"]: row for row in json.loads((out / "letters_pruned" / "variants.json").read_text())["rows"]}
    assert all(row["status"] == "measured" for row in table.values()), table
    assert table["onnx"]["metric"] == pytest.approx(table["eager"]["metric"], abs=0.005)
    assert table["eager"]["metric"] > raw["top1"] + 0.2
    # torch_int8, compiled in the worker, answers as its program does in process (oneDNN's int8 kernels against
    # the reference ops: one image of the 624 may differ), and loses at most 2 points of fp32's
    int8 = table["torch_int8"]
    built = (out / "letters_pruned" / "torch_int8" / "model.int8.pt2").resolve()
    labels = json.loads((folder / "labels.json").read_text())
    scored = split(load_dataset(demo_data("letters/test"), "classification", labels))[1]
    document = kind_document(read_model_document(folder), KINDS["torch_int8"], built)
    document["handler"].pop("compile")
    document["handler"]["model"]["file"] = str(built)
    assert int8["metric"] == pytest.approx(inprocess_metric(folder, document, scored), abs=2 / len(scored.samples))
    assert int8["metric"] >= table["eager"]["metric"] - 0.02, table


@pytest.mark.e2e
def test_make_distill_on_unlabeled_images_counts_the_broken_file(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "letters", models / "letters", ignore=shutil.ignore_patterns("variant*"))
    images = flat_images(tmp_path / "photos")
    done = run_make(
        "distill",
        TEACHER="letters",
        ARCH="timm:mobilenetv3_small_050",
        DATA=images,
        MODELS=models,
        EPOCHS=1,
        NAME="letters_small",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = models / "letters_small"
    document = yaml.safe_load((folder / "model-config.yaml").read_text())
    assert document["handler"]["model"] == {
        "file": "model.safetensors",
        "format": "safetensors",
        "architecture": "timm:mobilenetv3_small_050",
        "kwargs": {"num_classes": 26},
    }
    assert document["handler"]["resize"] == 64 and document["batchSize"] == 16
    config = read_model_config(folder)
    assert load_model(folder, config.model, torch.device("cpu"))(torch.zeros(1, 3, 64, 64)).shape == (1, 26)
    report = json.loads((REPO / "build" / "compress" / "letters_small" / "report.json").read_text())
    assert report["facts"]["data"].endswith("(images without labels)")
    assert report["facts"]["files left out"].startswith("1 (") and "broken.jpg" in report["facts"]["files left out"]
    student = report["networks"]["student timm:mobilenetv3_small_050"]
    assert student["top1"] is None and 0 <= student["agreement"] <= 1


def test_prune_refuses_in_one_line(tmp_path: Path) -> None:
    done = run_make("prune", MODEL="shapes", DATA=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("make: ***")]
    assert lines == ["error: make prune works on classifiers; shapes is a detection model"], done.stderr


def labeled_share(root: Path, every: int) -> Path:
    """Every ``every``-th image of each class folder of the letters' training side, as class folders."""
    for path in sorted(demo_data("letters/train").rglob("*.jpg"))[::every]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    return root


@pytest.mark.e2e
def test_make_qat_reports_ptq_and_qat_side_by_side_and_writes_an_int8_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "letters", models / "letters", ignore=shutil.ignore_patterns("variant*"))
    data = labeled_share(tmp_path / "share", 4)
    done = run_make("qat", MODEL="letters", DATA=data, MODELS=models, EPOCHS=1, NAME="letters_qat_test")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith(f"wrote {models}/letters_qat_test: held out: fp32 top-1")
    report = json.loads((REPO / "build" / "compress" / "letters_qat_test" / "report.json").read_text())
    rows = report["networks"]
    assert list(rows) == ["letters fp32", "post-training int8 (PTQ)", "quantization-aware int8 (QAT)"]
    assert all(row["top1"] > 0.5 for row in rows.values()), rows
    folder = models / "letters_qat_test"
    document = read_model_document(folder)
    assert document["handler"]["model"] == {"file": "model.int8.pt2", "format": "exported"}
    assert document["handler"]["compile"] == {"mode": "default", "dynamic": True, "freezing": True}
    assert holds_quantized_ops(folder / "model.int8.pt2")
    network = load_model(folder, read_model_config(folder).model, torch.device("cpu"))
    assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 26)
