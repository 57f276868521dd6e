"""DETR-family detectors in process: the scoring and box conventions (pure), and served boxes against Hugging
Face's own ``post_process_object_detection(..., target_sizes=...)`` for a DETR (softmax), an RT-DETR (sigmoid)
and an ONNX export of the RT-DETR, photos of mixed sizes in one batch."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scaffold_model
import torch
import yaml
from PIL import Image

import demo_models
from servekit.config import DetectorConfig, read_model_config
from servekit.detr import detr_detections, detr_outputs
from servekit.errors import ConfigError
from servekit.service import DetrDetectorService, build_service
from servekit.transforms import aspect_size

transformers = pytest.importorskip("transformers")
LABELS = ["cat", "dog", "car", "tree", "person"]


def test_resize_shape_is_hugging_faces() -> None:
    from transformers.image_transforms import get_size_with_aspect_ratio

    for height in (1, 240, 300, 451, 800, 1080, 3024, 4032):
        for width in (1, 200, 451, 640, 800, 1333, 1920, 4032):
            for short, cap in ((800, 1333), (640, 0), (512, 512)):
                want = get_size_with_aspect_ratio((height, width), short, cap or None)
                assert aspect_size(height, width, short, cap) == want, (height, width, short, cap)


class Outputs:
    def __init__(self, logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
        self.logits, self.pred_boxes = logits, pred_boxes


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_scoring_equals_the_processors_post_process(scoring: str) -> None:
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 30, 6) * 3, torch.rand(2, 30, 4) * 0.5 + 0.25
    sizes = [(300, 451), (1080, 1920)]
    if scoring == "softmax":
        theirs = transformers.DetrImageProcessor().post_process_object_detection(
            Outputs(logits, boxes), threshold=0.0, target_sizes=sizes
        )
    else:
        theirs = transformers.RTDetrImageProcessor().post_process_object_detection(
            Outputs(logits, boxes), threshold=0.0, target_sizes=sizes
        )
    for i, (height, width) in enumerate(sizes):
        mine = detr_detections(logits[i], boxes[i], (width, height), scoring, 20)
        order = torch.argsort(theirs[i]["scores"], descending=True, stable=True)[:20]
        assert torch.allclose(mine["scores"], theirs[i]["scores"][order], atol=1e-6)
        assert torch.equal(mine["labels"], theirs[i]["labels"][order])
        assert torch.allclose(mine["boxes"], theirs[i]["boxes"][order], atol=1e-3)


def test_outputs_are_read_from_each_form_and_anything_else_refused() -> None:
    logits, boxes = torch.zeros(1, 5, 3), torch.zeros(1, 5, 4)
    for form in ((logits, boxes), {"logits": logits, "pred_boxes": boxes}, Outputs(logits, boxes)):
        assert detr_outputs(form)[0] is logits
    with pytest.raises(ConfigError, match=r"returns class logits \[N, Q, C\] and boxes \[N, Q, 4\]"):
        detr_outputs(torch.zeros(1, 5, 3))


# ------------------------------------------------------------------ served boxes against Hugging Face's


def tiny_detr() -> tuple[Any, Any]:
    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], out_features=["stage4"]
    )
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=20,
        id2label=dict(enumerate(LABELS)),
    )
    return transformers.DetrForObjectDetection(config).eval(), transformers.DetrImageProcessor()


def tiny_rt_detr() -> tuple[Any, Any]:
    backbone = transformers.RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
        layer_type="basic",
    )
    config = transformers.RTDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        encoder_in_channels=[32, 48, 64],
        encoder_hidden_dim=32,
        encoder_ffn_dim=64,
        encoder_layers=1,
        encoder_attention_heads=2,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        num_feature_levels=3,
        num_queries=30,
        id2label=dict(enumerate(LABELS)),
    )
    return transformers.RTDetrForObjectDetection(config).eval(), transformers.RTDetrImageProcessor()


def photos() -> dict[str, bytes]:
    found = demo_models.sample_photos(("astronaut", "chelsea", "coffee"))
    payloads = {name: demo_models.encode(image, "JPEG", quality=92) for name, image in found.items()}
    payloads["1080p"] = demo_models.user_image("frame_1920x1080.jpg")
    return payloads


def scaffolded(tmp_path: Path, pt: Path, *extra: str) -> Path:
    args = ["--name", "det", "--task", "detection", "--pt", str(pt), "--root", str(tmp_path), *extra]
    assert scaffold_model.main(args) == 0
    folder = tmp_path / "det"
    document = yaml.safe_load((folder / "model-config.yaml").read_text())
    document["handler"]["score_threshold"] = 0.0  # compare every query, not only confident ones of a seeded net
    (folder / "model-config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


def check_served(folder: Path, reference: Callable[[Image.Image], dict[str, torch.Tensor]]) -> None:
    config = read_model_config(folder)
    assert isinstance(config, DetectorConfig) and config.output == "detr"
    service = build_service(config, folder, torch.device("cpu"), max_batch=4)
    assert isinstance(service, DetrDetectorService)
    payloads = photos()
    answers = service.handle([{"body": data} for data in payloads.values()]).answers
    for (name, data), answer in zip(payloads.items(), answers):
        assert not isinstance(answer, BaseException), answer
        image = Image.open(io.BytesIO(data)).convert("RGB")
        theirs = reference(image)
        order = torch.argsort(theirs["scores"], descending=True, stable=True)[:10]
        boxes = theirs["boxes"][order].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)  # the kit clips boxes to the image
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        mine = answer[:10]
        assert len(mine) == len(order), name
        assert [m["index"] for m in mine] == theirs["labels"][order].tolist(), name
        assert [m["label"] for m in mine] == [LABELS[i] for i in theirs["labels"][order].tolist()]
        np.testing.assert_allclose([m["score"] for m in mine], theirs["scores"][order].numpy(), atol=1e-4)
        np.testing.assert_allclose([m["box"] for m in mine], boxes.numpy(), atol=0.5)


def reference_of(model: Any, processor: Any) -> Callable[[Image.Image], dict[str, torch.Tensor]]:
    def reference(image: Image.Image) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outputs = model(**processor(images=image, return_tensors="pt"))
        target = [(image.height, image.width)]
        (found,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=target)
        return found

    return reference


@pytest.mark.parametrize("make", [tiny_detr, tiny_rt_detr], ids=["detr-softmax", "rt-detr-sigmoid"])
def test_hugging_face_detr_folders_answer_as_post_process(tmp_path: Path, make: Callable[[], Any]) -> None:
    torch.manual_seed(0)
    model, processor = make()
    source = tmp_path / "hf"
    model.save_pretrained(str(source))
    processor.save_pretrained(str(source))
    folder = scaffolded(tmp_path, source)
    config = read_model_config(folder)
    assert isinstance(config, DetectorConfig)
    assert config.scoring == ("softmax" if make is tiny_detr else "sigmoid")
    assert json.loads((folder / "labels.json").read_text()) == LABELS
    check_served(folder, reference_of(model, processor))


def test_rt_detr_onnx_export_answers_as_post_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, processor = tiny_rt_detr()
    source = tmp_path / "export"
    source.mkdir()
    processor.save_pretrained(str(source))

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(pixel_values=pixel_values)
            return out.logits, out.pred_boxes

    torch.onnx.export(
        Pair().eval(),
        (torch.rand(1, 3, 640, 640),),
        str(source / "model.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["pixel_values"],
        output_names=["logits", "pred_boxes"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "pred_boxes": {0: "batch"}},
    )
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    folder = scaffolded(tmp_path, source / "model.onnx", "--labels", str(tmp_path / "labels.txt"))
    config = read_model_config(folder)
    assert isinstance(config, DetectorConfig) and config.scoring == "sigmoid" and config.resize == (640, 640)
    check_served(folder, reference_of(model, processor))


def test_rf_detr_processors_float_resize_without_antialias_is_read_and_computed() -> None:
    """RF-DETR's processor rescales, then resizes floats with antialias off: the recipe says so
    (``antialias: false``) and the kit's pixels equal the processor's on a downscaled and an upscaled photo."""
    from servekit.config import parse_handler_config
    from servekit.recipes import hf_recipe
    from servekit.service import detr_item
    from servekit.transforms import classifier_batch

    processor = transformers.RfDetrImageProcessor(size={"height": 560, "width": 560})
    recipe = hf_recipe(processor.to_dict(), "rf", "detection")
    model = {"file": "model.safetensors", "format": "transformers"}
    section = {
        "task": "detection",
        "model": model,
        "output": "detr",
        "scoring": "sigmoid",
        **recipe.section("detection"),
    }
    assert section["antialias"] is False and "not antialiased" in recipe.describe()
    config = parse_handler_config(section)
    assert isinstance(config, DetectorConfig) and config.decode_side == 0  # no reduced JPEG decode
    for name, data in photos().items():  # 1080p and 512 down to 560, 300 x 451 up
        image = Image.open(io.BytesIO(data)).convert("RGB")
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        mine = classifier_batch([detr_item({"body": data}, config)[0]], config)
        assert torch.allclose(mine, theirs, atol=1e-4), name


def test_paddle_document_detectors_are_refused_in_one_line() -> None:
    from servekit.detr import scoring_of

    for model_type in ("pp_doclayout_v3", "pp_ocrv5_mobile_det"):
        with pytest.raises(ConfigError, match="PaddleOCR document-layout or text detector") as caught:
            scoring_of(model_type)
        assert "\n" not in str(caught.value)
