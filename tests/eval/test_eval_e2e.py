"""`make eval` and `make variants` through real servers, each metric recomputed here by code apart from the kit's:
the digits network run raw with torchvision's transforms, pycocotools on the COCO file and the served answers, the
IoU from the mask PNGs; Triton answering as TorchServe does; a broken int8 refused and the choice archived."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kit import REPO, archive, demo_data, run_make

pytestmark = pytest.mark.e2e


def evaluated(model: str, split: Path, **variables: str) -> tuple[dict, list[dict]]:
    done = run_make("eval", MODEL=model, DATA=split, **variables)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{model}: " in done.stdout and "report.md" in done.stdout
    folder = REPO / "build" / "eval" / (model if "SERVER" not in variables else f"{model}-{variables['SERVER']}")
    answers = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    return json.loads((folder / "metrics.json").read_text()), answers


def test_make_eval_digits_equals_the_raw_network_and_triton_answers_alike(tmp_path: Path) -> None:
    import importlib.util

    from torchvision.transforms import v2

    archive("digits")
    split = tmp_path / "test"
    shutil.copytree(demo_data("digits/test"), split)
    (split / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # rejected alone, named
    served, _ = evaluated("digits", split)
    assert [r["file"] for r in served["rejected"]] == [str(split / "3" / "corrupt.png")]
    assert served["rejected"][0]["status"] == 400
    (split / "3" / "corrupt.png").unlink()
    spec = importlib.util.spec_from_file_location("digits_net", REPO / "models" / "digits" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.DigitsNet(num_classes=10)
    net.load_state_dict(torch.load(REPO / "models" / "digits" / "model.pt", weights_only=True))
    net.eval()
    prepare = v2.Compose([v2.PILToTensor(), v2.Resize(32), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize([0.5] * 3, [0.5] * 3)])  # fmt: skip
    files = sorted(split.rglob("*.png"))
    truth = [int(f.parent.name) for f in files]
    with torch.inference_mode():
        batch = torch.stack([prepare(Image.open(f).convert("RGB")) for f in files])
        predicted = net(batch).argmax(1).tolist()
    reference = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    assert served["answered"] == len(files) == 450
    assert abs(served["metrics"]["top1"] - reference) <= 1 / len(files)
    assert served["metrics"]["top1"] >= 0.95
    assert served["archive"]["sha256"] and served["data"]["sha256"] and "flags:" in served["machine"]
    report = (REPO / "build" / "eval" / "digits" / "report.md").read_text()
    assert "TorchServe 0.12.0" in report and "model_store/digits.mar" in report and served["data"]["sha256"] in report
    assert "## Rejected by the server (1)" in report and "corrupt.png" in report

    on_triton, _ = evaluated("digits", split, SERVER="triton")
    assert "tritonserver" in on_triton["server"]
    assert on_triton["metrics"]["top1"] == pytest.approx(served["metrics"]["top1"], abs=1 / len(files))


def test_make_eval_detection_ap_is_pycocotools_on_the_served_answers() -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    archive("shapes")
    split = demo_data("shapes/val")
    served, answers = evaluated("shapes", split)
    document = json.loads((split / "annotations.json").read_text())
    ids = {im["file_name"]: im["id"] for im in document["images"]}
    names = {c["name"]: c["id"] for c in document["categories"]}
    results = [
        {"image_id": ids[Path(a["file"]).name], "category_id": names[d["label"]], "score": d["score"],
         "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
        for a in answers for d in a["answer"]
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = document
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert [served["metrics"][k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(evaluator.stats[:3]))
    assert served["metrics"]["AP50"] >= 0.9


def test_make_eval_segmentation_miou_from_the_mask_pngs() -> None:
    from pycocotools import mask as coco_mask

    archive("shapes_seg")
    split = demo_data("shapes_seg/val")
    served, answers = evaluated("shapes_seg", split)
    inter, union = np.zeros(4), np.zeros(4)
    for item in answers:
        truth = np.asarray(Image.open(split / "masks" / (Path(item["file"]).stem + ".png")))
        found = np.full(truth.shape, -1)
        for c in item["answer"]["classes"]:
            rle = {"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()}
            found[coco_mask.decode(rle).astype(bool)] = c["index"]
        for k in range(4):
            inter[k] += ((truth == k) & (found == k)).sum()
            union[k] += ((truth == k) | (found == k)).sum()
    assert served["metrics"]["mIoU"] == pytest.approx(float(np.mean(inter / union)))
    assert served["metrics"]["mIoU"] >= 0.85


def test_make_variants_refuses_a_broken_int8_and_make_archive_builds_the_choice(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "digits", models / "digits", ignore=shutil.ignore_patterns("variant*"))
    out = tmp_path / "variants"
    done = run_make(
        "variants", MODEL="digits", DATA=demo_data("digits/test"), MODELS=models, VARIANTS_OUT=out,
        KINDS="eager onnx onnx_int8", SECONDS=2, BLANK_CALIBRATION=1, ACCURACY_CONTROL=0,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "digits" / "variants.json").read_text())
    rows = {row["kind"]: row for row in report["rows"]}
    assert set(rows) == {"eager", "onnx", "onnx_int8"}
    assert all(row["status"] == "measured" for row in rows.values()), rows
    broken = rows["onnx_int8"]
    assert broken["metric"] < report["floor"] and not broken["within"], broken  # calibrated on blank images
    assert report["chosen"] in ("eager", "onnx") and rows[report["chosen"]]["within"]
    assert (out / "digits" / "pareto.png").stat().st_size > 0
    assert "| onnx_int8 |" in (out / "digits" / "report.md").read_text()
    choice = yaml.safe_load((models / "digits" / "variant.yaml").read_text())
    assert choice["kind"] == report["chosen"] and choice["evidence"]["metric"] == "top1"

    store = tmp_path / "store"
    built = run_make("archive", MODEL="digits", MODELS=models, STORE=store, VARIANTS_OUT=out)
    assert built.returncode == 0, built.stderr[-2000:]
    line = [x for x in built.stderr.splitlines() if x.startswith("digits: archiving the variant make variants chose")]
    assert len(line) == 1 and report["chosen"] in line[0], built.stderr[-2000:]
    fmt = {"eager": "state_dict", "onnx": "onnx"}[report["chosen"]]
    assert served_format(store / "digits.mar") == fmt

    again = run_make("archive", MODEL="digits", MODELS=models, STORE=store, VARIANT="eager", VARIANTS_OUT=out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert served_format(store / "digits.mar") == "state_dict"
    assert "archiving the variant" not in again.stderr


def served_format(mar: Path) -> str:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))["handler"]["model"]["format"]
